"""Screens: what a bot sends, checked against WhatsApp's limits when they are built.

Three kinds: :class:`Text`, :class:`Buttons` (reply buttons) and :class:`ListScreen`
(a list message with sections of rows). Each renders to plain text
(:func:`render_text`, for tests, logs and web chats) and to a WhatsApp Cloud API
message payload (:func:`render_whatsapp`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias

import attrs

from chatstate.exceptions import InvalidScreenError

__all__ = [
    "Button",
    "Buttons",
    "ListScreen",
    "Row",
    "Screen",
    "Section",
    "Text",
    "render_text",
    "render_whatsapp",
    "translate_screen",
]

# WhatsApp Cloud API limits for interactive and text messages.
TEXT_BODY_MAX: Final = 4096
INTERACTIVE_BODY_MAX: Final = 1024
HEADER_MAX: Final = 60
FOOTER_MAX: Final = 60
BUTTONS_MAX: Final = 3
BUTTON_TITLE_MAX: Final = 20
BUTTON_ID_MAX: Final = 256
LIST_BUTTON_MAX: Final = 20
LIST_ROWS_MAX: Final = 10
LIST_SECTIONS_MAX: Final = 10
SECTION_TITLE_MAX: Final = 24
ROW_ID_MAX: Final = 200
ROW_TITLE_MAX: Final = 24
ROW_DESCRIPTION_MAX: Final = 72


def _limit(what: str, text: str | None, most: int, *, required: bool = True) -> None:
    if text is None:
        if required:
            raise InvalidScreenError(f"{what} is required")
        return
    if not isinstance(text, str):
        raise InvalidScreenError(f"{what} must be a str, not {type(text).__name__}")
    if required and not text.strip():
        raise InvalidScreenError(f"{what} must not be empty")
    if len(text) > most:
        raise InvalidScreenError(f"{what} is {len(text)} characters; WhatsApp allows {most}")


def _unique(what: str, values: Sequence[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise InvalidScreenError(f"{what} {value!r} appears twice")
        seen.add(value)


def _buttons(items: Iterable[Button]) -> tuple[Button, ...]:
    return tuple(items)


def _rows(items: Iterable[Row]) -> tuple[Row, ...]:
    return tuple(items)


def _sections(items: Iterable[Section]) -> tuple[Section, ...]:
    return tuple(items)


@attrs.frozen
class Text:
    """A plain text message."""

    body: str

    def __attrs_post_init__(self) -> None:
        _limit("a text body", self.body, TEXT_BODY_MAX)


@attrs.frozen
class Button:
    """One reply button: ``id`` comes back as the reply id when it is tapped."""

    id: str
    title: str

    def __attrs_post_init__(self) -> None:
        _limit("a button id", self.id, BUTTON_ID_MAX)
        _limit(f"button title {self.title!r}", self.title, BUTTON_TITLE_MAX)


@attrs.frozen
class Buttons:
    """A message with up to three reply buttons."""

    body: str
    buttons: tuple[Button, ...] = attrs.field(converter=_buttons)
    header: str | None = None
    footer: str | None = None

    def __attrs_post_init__(self) -> None:
        _limit("an interactive body", self.body, INTERACTIVE_BODY_MAX)
        _limit("a header", self.header, HEADER_MAX, required=False)
        _limit("a footer", self.footer, FOOTER_MAX, required=False)
        if not 1 <= len(self.buttons) <= BUTTONS_MAX:
            raise InvalidScreenError(
                f"a buttons message has {len(self.buttons)} buttons; WhatsApp allows 1 to 3"
            )
        _unique("button id", [b.id for b in self.buttons])
        _unique("button title", [b.title for b in self.buttons])


@attrs.frozen
class Row:
    """One row of a list section."""

    id: str
    title: str
    description: str | None = None

    def __attrs_post_init__(self) -> None:
        _limit("a row id", self.id, ROW_ID_MAX)
        _limit(f"row title {self.title!r}", self.title, ROW_TITLE_MAX)
        _limit("a row description", self.description, ROW_DESCRIPTION_MAX, required=False)


@attrs.frozen
class Section:
    """A titled group of rows in a list message."""

    rows: tuple[Row, ...] = attrs.field(converter=_rows)
    title: str | None = None

    def __attrs_post_init__(self) -> None:
        _limit("a section title", self.title, SECTION_TITLE_MAX, required=False)
        if not self.rows:
            raise InvalidScreenError("a list section needs at least one row")


@attrs.frozen
class ListScreen:
    """A list message: a button that opens sections of rows (at most 10 rows in all)."""

    body: str
    button: str
    sections: tuple[Section, ...] = attrs.field(converter=_sections)
    header: str | None = None
    footer: str | None = None

    def __attrs_post_init__(self) -> None:
        _limit("an interactive body", self.body, INTERACTIVE_BODY_MAX)
        _limit("the list button text", self.button, LIST_BUTTON_MAX)
        _limit("a header", self.header, HEADER_MAX, required=False)
        _limit("a footer", self.footer, FOOTER_MAX, required=False)
        if not 1 <= len(self.sections) <= LIST_SECTIONS_MAX:
            raise InvalidScreenError(
                f"a list has {len(self.sections)} sections; WhatsApp allows 1 to 10"
            )
        if len(self.sections) > 1 and any(not s.title for s in self.sections):
            raise InvalidScreenError("every section needs a title when a list has several")
        rows = [row for section in self.sections for row in section.rows]
        if len(rows) > LIST_ROWS_MAX:
            raise InvalidScreenError(
                f"a list has {len(rows)} rows across its sections; WhatsApp allows 10"
            )
        _unique("row id", [r.id for r in rows])

    @property
    def rows(self) -> tuple[Row, ...]:
        """Every row, section by section."""
        return tuple(row for section in self.sections for row in section.rows)


Screen: TypeAlias = Text | Buttons | ListScreen
"""Anything a bot can send."""


def render_text(screen: Screen) -> str:
    """Render a screen as plain text (buttons and rows become a numbered menu)."""
    if isinstance(screen, Text):
        return screen.body
    lines = [screen.header] if screen.header else []
    lines.append(screen.body)
    if isinstance(screen, Buttons):
        lines.extend(f"[{b.title}]" for b in screen.buttons)
    else:
        for section in screen.sections:
            if section.title:
                lines.append(f"-- {section.title} --")
            for row in section.rows:
                suffix = f": {row.description}" if row.description else ""
                lines.append(f"* {row.title}{suffix}")
    if screen.footer:
        lines.append(screen.footer)
    return "\n".join(lines)


def render_whatsapp(screen: Screen, to: str) -> dict[str, Any]:
    """The WhatsApp Cloud API ``/messages`` payload that sends ``screen`` to ``to``."""
    base: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
    }
    if isinstance(screen, Text):
        return {**base, "type": "text", "text": {"preview_url": False, "body": screen.body}}
    interactive: dict[str, Any] = {"body": {"text": screen.body}}
    if screen.header:
        interactive["header"] = {"type": "text", "text": screen.header}
    if screen.footer:
        interactive["footer"] = {"text": screen.footer}
    if isinstance(screen, Buttons):
        interactive["type"] = "button"
        interactive["action"] = {
            "buttons": [
                {"type": "reply", "reply": {"id": b.id, "title": b.title}} for b in screen.buttons
            ]
        }
    else:
        interactive["type"] = "list"
        sections = []
        for section in screen.sections:
            rows = []
            for row in section.rows:
                item = {"id": row.id, "title": row.title}
                if row.description:
                    item["description"] = row.description
                rows.append(item)
            entry: dict[str, Any] = {"rows": rows}
            if section.title:
                entry["title"] = section.title
            sections.append(entry)
        interactive["action"] = {"button": screen.button, "sections": sections}
    return {**base, "type": "interactive", "interactive": interactive}


def translate_screen(screen: Screen, translate: Callable[[str], str]) -> Screen:
    """``screen`` with every text a person reads passed through ``translate`` (ids stay).

    Raises:
        InvalidScreenError: a translation breaks one of WhatsApp's limits.
    """
    if isinstance(screen, Text):
        return Text(translate(screen.body))
    header = translate(screen.header) if screen.header else screen.header
    footer = translate(screen.footer) if screen.footer else screen.footer
    if isinstance(screen, Buttons):
        return Buttons(
            translate(screen.body),
            [Button(b.id, translate(b.title)) for b in screen.buttons],
            header=header,
            footer=footer,
        )
    sections = [
        Section(
            [
                Row(r.id, translate(r.title), translate(r.description) if r.description else None)
                for r in section.rows
            ],
            translate(section.title) if section.title else None,
        )
        for section in screen.sections
    ]
    return ListScreen(
        translate(screen.body), translate(screen.button), sections, header=header, footer=footer
    )


def screen_to_json(screen: Screen) -> dict[str, Any]:
    """A screen as a JSON object (how the router keeps replies until they are sent).

    :func:`screen_from_json` makes the same screen of it again.
    """
    if isinstance(screen, Text):
        return {"text": screen.body}
    extra = {k: v for k, v in (("header", screen.header), ("footer", screen.footer)) if v}
    if isinstance(screen, Buttons):
        buttons = [[b.id, b.title] for b in screen.buttons]
        return {"buttons": screen.body, "items": buttons, **extra}
    sections = [
        {"title": s.title, "rows": [[r.id, r.title, r.description] for r in s.rows]}
        for s in screen.sections
    ]
    return {"list": screen.body, "button": screen.button, "sections": sections, **extra}


def screen_from_json(obj: Any) -> Screen:
    """The screen :func:`screen_to_json` made ``obj`` of.

    Raises:
        InvalidScreenError: ``obj`` is not such an object, or breaks WhatsApp's limits.
    """
    try:
        if "text" in obj:
            return Text(obj["text"])
        header, footer = obj.get("header"), obj.get("footer")
        if "buttons" in obj:
            items = [Button(i, t) for i, t in obj["items"]]
            return Buttons(obj["buttons"], items, header=header, footer=footer)
        sections = [
            Section([Row(i, t, d) for i, t, d in s["rows"]], s.get("title"))
            for s in obj["sections"]
        ]
        return ListScreen(obj["list"], obj["button"], sections, header=header, footer=footer)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidScreenError(f"not a stored screen ({type(exc).__name__})") from None
