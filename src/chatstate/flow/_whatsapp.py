"""WhatsApp Cloud API webhook payloads in, framework-neutral messages out."""

from __future__ import annotations

from typing import Any

from chatstate.flow._router import Message

__all__ = ["parse_webhook"]


def parse_webhook(payload: dict[str, Any]) -> list[Message]:
    """The user messages in one WhatsApp Cloud API webhook notification.

    Text messages, reply-button taps and list-row picks become :class:`Message`
    objects (status updates and other kinds are skipped). The ``wamid`` becomes
    ``message_id``, so a redelivered notification is recognised.
    """
    messages: list[Message] = []
    for entry in payload.get("entry") or []:
        for change in entry.get("changes") or []:
            value = change.get("value") or {}
            for msg in value.get("messages") or []:
                kind = msg.get("type")
                text = reply_id = None
                if kind == "text":
                    text = (msg.get("text") or {}).get("body")
                elif kind == "interactive":
                    interactive = msg.get("interactive") or {}
                    chosen = interactive.get("button_reply") or interactive.get("list_reply") or {}
                    reply_id, text = chosen.get("id"), chosen.get("title")
                elif kind == "button":
                    text = (msg.get("button") or {}).get("text")
                else:
                    continue
                timestamp = msg.get("timestamp")
                messages.append(
                    Message(
                        user_id=str(msg.get("from")),
                        text=text,
                        reply_id=reply_id,
                        message_id=msg.get("id"),
                        timestamp=float(timestamp) if timestamp is not None else None,
                    )
                )
    return messages
