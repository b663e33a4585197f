"""Multi-step conversations: the Flow base class, the message router and screens.

Framework-neutral: a :class:`Message` goes in, screens come out; render them with
:func:`render_text` or :func:`render_whatsapp`. Every step transition is one
conditional write of the user's state, so flows survive restarts, and a
message delivered twice (same ``message_id``) or two messages at once never
advance a flow twice.
"""

from chatstate.flow._flow import DONE, Flow, Invalid, Step
from chatstate.flow._router import AsyncRouter, Menu, MenuItem, Message, Router, Turn
from chatstate.flow._screens import (
    Button,
    Buttons,
    ListScreen,
    Row,
    Screen,
    Section,
    Text,
    render_text,
    render_whatsapp,
)
from chatstate.flow._whatsapp import parse_webhook

__all__ = [
    "DONE",
    "AsyncRouter",
    "Button",
    "Buttons",
    "Flow",
    "Invalid",
    "ListScreen",
    "Menu",
    "MenuItem",
    "Message",
    "Router",
    "Row",
    "Screen",
    "Section",
    "Step",
    "Text",
    "Turn",
    "parse_webhook",
    "render_text",
    "render_whatsapp",
]
