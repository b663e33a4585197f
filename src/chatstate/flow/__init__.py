"""Multi-step conversations: the Flow base class, the message router and screens.

Framework-neutral: a :class:`Message` goes in, screens come out; render them with
:func:`render_text` or :func:`render_whatsapp`. Each message is handled exactly
once: a step's end and everything its callables stage on the :class:`Context`
are one atomic write, recorded with the message id, so flows survive restarts,
and a message delivered twice or two messages at once never advance a flow twice.
"""

from chatstate.flow._context import Context, Translations, Turn
from chatstate.flow._delivery import AsyncDelivery, Delivery
from chatstate.flow._flow import DONE, Flow, Invalid, Step
from chatstate.flow._message import (
    Contact,
    Location,
    Media,
    Message,
    MessageKind,
    Reaction,
    Status,
    whatsapp_user_id,
)
from chatstate.flow._router import AsyncRouter, Menu, MenuItem, Router
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
    translate_screen,
)
from chatstate.flow._sending import BroadcastProgress, DeliveryMode, RateLimit
from chatstate.flow._whatsapp import parse_webhook

__all__ = [
    "DONE",
    "AsyncDelivery",
    "AsyncRouter",
    "BroadcastProgress",
    "Button",
    "Buttons",
    "Contact",
    "Context",
    "Delivery",
    "DeliveryMode",
    "Flow",
    "Invalid",
    "ListScreen",
    "Location",
    "Media",
    "Menu",
    "MenuItem",
    "Message",
    "MessageKind",
    "RateLimit",
    "Reaction",
    "Router",
    "Row",
    "Screen",
    "Section",
    "Status",
    "Step",
    "Text",
    "Translations",
    "Turn",
    "parse_webhook",
    "render_text",
    "render_whatsapp",
    "translate_screen",
    "whatsapp_user_id",
]
