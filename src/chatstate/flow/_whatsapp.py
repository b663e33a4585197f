"""WhatsApp Cloud API webhook payloads in, framework-neutral messages out."""

from __future__ import annotations

from typing import Any

from chatstate.flow._message import (
    MEDIA_KINDS,
    Contact,
    Location,
    Media,
    Message,
    Reaction,
    Status,
    whatsapp_user_id,
)

__all__ = ["parse_webhook"]


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _user(raw: Any) -> str:
    text = str(raw or "")
    try:
        return whatsapp_user_id(text)
    except ValueError:
        return text  # a test number or a format WhatsApp adds later: keep it as sent


def _message(msg: dict[str, Any], names: dict[str, str]) -> Message | None:  # noqa: C901, PLR0911, PLR0912 - one branch per kind
    kind = msg.get("type")
    sender = _user(msg.get("from"))
    base: dict[str, Any] = {
        "user_id": sender,
        "message_id": _str(msg.get("id")),
        "timestamp": _float(msg.get("timestamp")),
        "sender_name": names.get(sender),
        "raw": msg,
    }
    if not base["user_id"]:
        return None
    if kind == "text":
        return Message(text=(msg.get("text") or {}).get("body"), kind="text", **base)
    if kind == "interactive":
        interactive = msg.get("interactive") or {}
        chosen = interactive.get("button_reply") or interactive.get("list_reply") or {}
        if not chosen.get("id"):
            return Message(kind="unsupported", **base)
        return Message(text=chosen.get("title"), reply_id=str(chosen["id"]), kind="reply", **base)
    if kind == "button":  # a tap on a template's quick-reply button
        button = msg.get("button") or {}
        return Message(text=button.get("text"), reply_id=_str(button.get("payload")), **base)
    if kind in MEDIA_KINDS:
        body = msg.get(kind) or {}
        if not body.get("id"):
            return Message(kind="unsupported", **base)
        media = Media(
            id=str(body["id"]),
            mime_type=_str(body.get("mime_type")),
            caption=_str(body.get("caption")),
            filename=_str(body.get("filename")),
            sha256=_str(body.get("sha256")),
        )
        return Message(text=media.caption, media=media, kind=kind, **base)
    if kind == "location":
        body = msg.get("location") or {}
        latitude, longitude = _float(body.get("latitude")), _float(body.get("longitude"))
        if latitude is None or longitude is None:
            return Message(kind="unsupported", **base)
        place = Location(latitude, longitude, _str(body.get("name")), _str(body.get("address")))
        return Message(location=place, kind="location", **base)
    if kind == "contacts":
        cards = []
        for card in msg.get("contacts") or []:
            name = (card.get("name") or {}).get("formatted_name") or ""
            phones = [p.get("wa_id") or p.get("phone") for p in card.get("phones") or []]
            cards.append(Contact(str(name), tuple(str(p) for p in phones if p)))
        return Message(contacts=tuple(cards), kind="contacts", **base)
    if kind == "reaction":
        body = msg.get("reaction") or {}
        if not body.get("message_id"):
            return Message(kind="unsupported", **base)
        reaction = Reaction(str(body["message_id"]), str(body.get("emoji") or ""))
        return Message(reaction=reaction, kind="reaction", **base)
    return Message(kind="unsupported", **base)


def parse_webhook(payload: dict[str, Any]) -> list[Message]:
    """Every message and delivery report in one WhatsApp Cloud API webhook notification.

    Each user message becomes a :class:`Message` of its kind: ``"text"``,
    ``"reply"`` (a button or list-row tap: ``reply_id`` is the id you gave it),
    ``"image"``, ``"audio"``, ``"video"``, ``"document"``, ``"sticker"`` (with
    ``media``), ``"location"``, ``"contacts"``, ``"reaction"``, or
    ``"unsupported"`` for anything else. Delivery reports become ``"status"``
    messages (``user_id`` is the recipient; the router ignores them). The
    ``wamid`` becomes ``message_id`` (a redelivered notification is
    recognised), the sender's profile name ``sender_name``, and ``user_id`` is
    the sender's ``wa_id`` through :func:`whatsapp_user_id`. Malformed entries
    are skipped; the untouched message object is ``raw``.
    """
    messages: list[Message] = []
    for entry in payload.get("entry") or []:
        for change in (entry or {}).get("changes") or []:
            value = (change or {}).get("value") or {}
            names = {
                _user(c.get("wa_id")): str((c.get("profile") or {}).get("name"))
                for c in value.get("contacts") or []
                if isinstance(c, dict) and (c.get("profile") or {}).get("name")
            }
            for msg in value.get("messages") or []:
                if isinstance(msg, dict):
                    parsed = _message(msg, names)
                    if parsed is not None:
                        messages.append(parsed)
            for report in value.get("statuses") or []:
                if not isinstance(report, dict) or not report.get("id"):
                    continue
                status = Status(
                    str(report["id"]),
                    str(report.get("status") or ""),
                    tuple(e for e in report.get("errors") or [] if isinstance(e, dict)),
                )
                messages.append(
                    Message(
                        _user(report.get("recipient_id")) or "unknown",
                        message_id=f"status:{report['id']}:{status.status}",
                        timestamp=_float(report.get("timestamp")),
                        status=status,
                        kind="status",
                        raw=report,
                    )
                )
    return messages
