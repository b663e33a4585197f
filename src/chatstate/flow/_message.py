"""Incoming messages: one framework-neutral type for text, taps, media, places and more."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from typing import Any, Final, Literal, TypeAlias

import attrs

from chatstate.exceptions import InvalidMessageError

__all__ = [
    "KINDS",
    "Contact",
    "Location",
    "Media",
    "Message",
    "MessageKind",
    "Reaction",
    "Status",
    "whatsapp_user_id",
]

MessageKind: TypeAlias = Literal[
    "text",
    "reply",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "reaction",
    "status",
    "unsupported",
]
"""What a message carries (see :class:`Message`)."""

KINDS: Final[frozenset[str]] = frozenset(MessageKind.__args__)  # type: ignore[attr-defined]
MEDIA_KINDS: Final = frozenset({"image", "audio", "video", "document", "sticker"})


def _hidden(text: str | None) -> str:
    """What a Message's repr shows of its text: never the text (it may be a PIN)."""
    return "None" if text is None else f"<{len(text)} characters>"


def _texts(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)


def _objects(items: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    return tuple(items)


def _contacts(items: Iterable[Contact]) -> tuple[Contact, ...]:
    return tuple(items)


@attrs.frozen
class Media:
    """A photo, voice note, video, file or sticker: the platform's id to download it by.

    Attributes:
        id: The platform's media id (WhatsApp: fetch ``/<id>`` for a download URL).
        mime_type: As the platform reports it, such as ``"image/jpeg"``.
        caption: The text sent with it, if any.
        filename: A document's file name, if any.
        sha256: The platform's checksum, if any.
    """

    id: str
    mime_type: str | None = None
    caption: str | None = None
    filename: str | None = None
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, as a JSON object (how a flow step stores it)."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class Location:
    """A shared place."""

    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields that are set, as a JSON object."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class Contact:
    """A shared contact card: a display name and phone numbers."""

    name: str
    phones: tuple[str, ...] = attrs.field(default=(), converter=_texts)

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return {"name": self.name, "phones": list(self.phones)}


@attrs.frozen
class Reaction:
    """An emoji reaction to an earlier message (an empty ``emoji`` removes one)."""

    message_id: str
    emoji: str

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return {"message_id": self.message_id, "emoji": self.emoji}


@attrs.frozen
class Status:
    """A delivery report about a message the bot sent: not something the user said.

    Attributes:
        message_id: The id of the bot's message.
        status: ``"sent"``, ``"delivered"``, ``"read"`` or ``"failed"``.
        errors: The platform's error objects when it failed.
    """

    message_id: str
    status: str
    errors: tuple[dict[str, Any], ...] = attrs.field(default=(), converter=_objects)

    def to_json(self) -> dict[str, Any]:
        """As a JSON object."""
        return {"message_id": self.message_id, "status": self.status, "errors": list(self.errors)}


Payload: TypeAlias = Media | Location | tuple[Contact, ...] | Reaction | Status | None


def _default_kind(message: Message) -> str:
    if message.media is not None:
        family = (message.media.mime_type or "").partition("/")[0]
        return family if family in ("image", "audio", "video") else "document"
    if message.location is not None:
        return "location"
    if message.contacts:
        return "contacts"
    if message.reaction is not None:
        return "reaction"
    if message.status is not None:
        return "status"
    return "reply" if message.reply_id is not None else "text"


_LATEST_SECONDS: Final = 1e11  # the year 5138: a larger timestamp is in milliseconds


def _check_fields(message: Message) -> None:
    """Every field of the right type, so a bad one fails here and not at a later message."""
    if not isinstance(message.user_id, str) or not message.user_id:  # type: ignore[redundant-expr]  # callers may be untyped
        raise InvalidMessageError("a message needs a non-empty str user_id")
    for name in ("text", "reply_id", "message_id", "sender_name"):
        value = getattr(message, name)
        if value is not None and not isinstance(value, str):
            raise InvalidMessageError(f"{name} must be a str or None, not {type(value).__name__}")
    if message.message_id == "":
        raise InvalidMessageError("message_id must not be empty (None when there is none)")
    stamp = message.timestamp
    if stamp is not None:
        if isinstance(stamp, bool) or not isinstance(stamp, int | float):
            raise InvalidMessageError(
                f"timestamp must be Unix seconds (a number), not {type(stamp).__name__}"
            )
        if not 0 <= stamp < _LATEST_SECONDS:  # NaN fails too
            raise InvalidMessageError(
                f"timestamp {stamp!r} is not Unix seconds"
                + (
                    " (it looks like milliseconds: divide by 1000)"
                    if stamp >= _LATEST_SECONDS
                    else ""
                )
            )
    for name, kind in (
        ("media", Media),
        ("location", Location),
        ("reaction", Reaction),
        ("status", Status),
    ):
        value = getattr(message, name)
        if value is not None and not isinstance(value, kind):
            raise InvalidMessageError(
                f"{name} must be a {kind.__name__}, not {type(value).__name__}"
            )


def _check_kind(message: Message, _attribute: attrs.Attribute[str], kind: str) -> None:
    _check_fields(message)
    if kind not in KINDS:
        raise InvalidMessageError(
            f"unknown message kind {kind!r}; one of: {', '.join(sorted(KINDS))}"
        )
    needs = _NEEDS.get(kind)
    if needs is not None and not getattr(message, needs):
        raise InvalidMessageError(f"a {kind!r} message needs {needs}=")


_NEEDS: Final = {
    **dict.fromkeys(("image", "audio", "video", "document", "sticker"), "media"),
    "location": "location",
    "contacts": "contacts",
    "reaction": "reaction",
    "status": "status",
}


@attrs.frozen
class Message:
    """A framework-neutral incoming message.

    Build one from any platform's update (:func:`~chatstate.flow.parse_webhook`
    does it for WhatsApp). Only ``user_id`` is required; ``kind`` follows from
    what is set (a ``reply_id`` makes a ``"reply"``, a ``location`` a
    ``"location"``, ...) unless you pass it.

    Attributes:
        user_id: Who sent it: a stable id per person (see :func:`whatsapp_user_id`).
        text: What they typed, or a media caption, or a tapped button's title.
        reply_id: The id of the button or list row they tapped, if any.
        message_id: The platform's message id: a redelivery of the same id is
            recognised and changes nothing. A message without one is never
            recognised as a redelivery (two identical messages, such as a PIN
            typed twice, are two messages): give messages an id.
        timestamp: When it was sent (Unix seconds); the router's clock when missing.
        kind: ``"text"``, ``"reply"`` (a tap), ``"image"``, ``"audio"``,
            ``"video"``, ``"document"``, ``"sticker"``, ``"location"``,
            ``"contacts"``, ``"reaction"``, ``"status"`` (a delivery report,
            which the router ignores) or ``"unsupported"``.
        media: The file of an image, audio, video, document or sticker.
        location: The place of a ``"location"`` message.
        contacts: The cards of a ``"contacts"`` message.
        reaction: The reaction of a ``"reaction"`` message.
        status: The report of a ``"status"`` message.
        sender_name: The sender's profile name, when the platform gives one.
        raw: The platform's own object, untouched (not compared, not shown).

    Its repr shows the text's length, never the text: what a user types may be
    a PIN, and messages end up in logs.
    """

    user_id: str
    text: str | None = attrs.field(default=None, repr=_hidden)
    reply_id: str | None = None
    message_id: str | None = None
    timestamp: float | None = None
    media: Media | None = attrs.field(default=None, kw_only=True)
    location: Location | None = attrs.field(default=None, kw_only=True)
    contacts: tuple[Contact, ...] = attrs.field(default=(), converter=_contacts, kw_only=True)
    reaction: Reaction | None = attrs.field(default=None, kw_only=True)
    status: Status | None = attrs.field(default=None, kw_only=True)
    sender_name: str | None = attrs.field(default=None, kw_only=True)
    kind: str = attrs.field(
        default=attrs.Factory(_default_kind, takes_self=True), validator=_check_kind, kw_only=True
    )
    raw: Any = attrs.field(default=None, eq=False, repr=False, kw_only=True)
    _own_key: str = attrs.field(
        factory=lambda: "msg-" + secrets.token_urlsafe(12), init=False, eq=False, repr=False
    )

    @property
    def answer(self) -> str:
        """The tapped reply id, else the typed text, stripped."""
        return (self.reply_id or self.text or "").strip()

    @property
    def is_text(self) -> bool:
        """True for typed text and taps: what a plain step accepts."""
        return self.kind in ("text", "reply")

    @property
    def payload(self) -> Payload:
        """What a non-text message carries: its media, location, contacts, reaction or status."""
        if self.kind in MEDIA_KINDS:
            return self.media
        if self.kind == "location":
            return self.location
        if self.kind == "contacts":
            return self.contacts
        if self.kind == "reaction":
            return self.reaction
        if self.kind == "status":
            return self.status
        return None

    @property
    def fingerprint(self) -> str:
        """What identifies the message's content: a redelivery has the same one."""
        parts = [self.user_id, self.kind, self.text or "", self.reply_id or ""]
        extra = self.payload
        if extra is not None:
            parts.append(repr(extra))
        return "\x1f".join(parts)

    @property
    def idempotency_key(self) -> str:
        """A key for calls to other services made while handling this message.

        The message id when there is one (a redelivery has the same key): pass
        it to a payment API's idempotency header, so that a failed handling
        that runs again does not charge twice. Without a message id, a random
        key made once for this object (nothing about the content can be read
        from it; a redelivery, a new object, gets another).
        """
        return self.message_id or self._own_key


_NOT_DIGITS = re.compile(r"[\s().\-]")


def whatsapp_user_id(number: str) -> str:
    """The one user id of a WhatsApp number: its digits, as the ``wa_id`` has them.

    WhatsApp's webhook gives ``wa_id`` as country code and number with no ``+``
    (``"34611111111"``); a number typed by a person or stored elsewhere may
    have a ``+``, a leading ``00``, spaces, dashes, dots or brackets. Keying
    state by this function's result keeps one person one user.

    Raises:
        ValueError: what is left is not 7 to 15 digits (E.164's range).

    Examples:
        >>> whatsapp_user_id("+34 611-11 11 11")
        '34611111111'
        >>> whatsapp_user_id("0034611111111")
        '34611111111'
    """
    if not isinstance(number, str):
        raise TypeError(f"a WhatsApp number must be a str, not {type(number).__name__}")
    digits = _NOT_DIGITS.sub("", number)
    if digits.startswith("+"):
        digits = digits[1:]
    elif digits.startswith("00"):
        digits = digits[2:]
    if not (digits.isascii() and digits.isdigit() and 7 <= len(digits) <= 15):
        raise ValueError(
            "not a WhatsApp number: expected a country code and number of 7 to 15 digits"
        )
    return digits
