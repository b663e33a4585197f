"""What the telebot twins share: the documents, the keys, :func:`update_key`, the checks.

Nothing here does I/O, so nothing here has a twin: ``_async/storage.py`` (the
one body of the storages, their data blocks and the dedupe middlewares) and
the ``_sync/storage.py`` generated from it both import it. Where the twins
truly differ, the ``*_async``/``*_sync`` pair is defined here (see
``tools/unasync.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from telebot.types import CallbackQuery, InlineQuery, Message, PreCheckoutQuery, ShippingQuery

from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.state import AsyncStateService, StateService
from chatstate.typing import JSONObject

log = logging.getLogger("chatstate.integrations.telebot")

STATE_FIELD = "state"
"""The document field that holds a key's state; the key exists while it is present."""
DATA_FIELD = "data"
"""The document field that holds a key's data."""

DEDUPE_PURPOSE = "telebot"
DEFAULT_LEASE = 5.0
"""Seconds an update stays claimed after its process died (renewed while it lives)."""

_MESSAGES = ("message", "channel_post", "business_message")
_EDITS = ("edited_message", "edited_channel_post", "edited_business_message")
_QUERIES = ("callback_query", "inline_query", "shipping_query", "pre_checkout_query")
DEDUPE_UPDATE_TYPES = (*_MESSAGES, *_EDITS, *_QUERIES)
"""The update types the dedupe middlewares guard: those whose content Telegram identifies."""

_QUERY_TYPES: tuple[tuple[str, type[Any]], ...] = (
    ("callback_query", CallbackQuery),
    ("inline_query", InlineQuery),
    ("shipping_query", ShippingQuery),
    ("pre_checkout_query", PreCheckoutQuery),
)
_CLAIM = "chatstate_update_claim"  # where pre_process leaves the claim for post_process

_Transaction = Callable[[JSONObject], JSONObject]


# -- the twins' differences: one pair each -----------------------------------------------


def _check_service_async(service: object, owner: str) -> None:
    """Refuse a sync service: ``owner`` (``Async...``) is an asyncio twin, for ``AsyncTeleBot``."""
    if not isinstance(service, AsyncStateService):
        raise UsageError(
            f"{owner} needs an AsyncStateService; for TeleBot use "
            f"{owner.removeprefix('Async')} with a StateService"
        )


def _check_service_sync(service: object, owner: str) -> None:
    """Refuse an asyncio service: ``owner`` is a sync twin, for ``TeleBot``."""
    if not isinstance(service, StateService):
        raise UsageError(
            f"{owner} needs a StateService; for AsyncTeleBot use "
            f"Async{owner} with an AsyncStateService"
        )


# -- pure: documents, values, update keys ------------------------------------------------


def _exists(doc: JSONObject) -> bool:
    """Whether a document is a key that exists (it has a state)."""
    return STATE_FIELD in doc


def _data_of(doc: JSONObject) -> dict[str, Any]:
    """The data of a document the caller owns (``{}`` when the key does not exist)."""
    data = doc.get(DATA_FIELD) if _exists(doc) else None
    return data if isinstance(data, dict) else {}


def _json(value: Any) -> Any:
    """``value`` with tuples as lists (as ``json.dumps`` stores them), everything else as is.

    Anything else that is not JSON is refused by the service with a
    :class:`~chatstate.exceptions.SerializationError`, before anything is stored.
    """
    if isinstance(value, list | tuple):
        return [_json(item) for item in value]
    if isinstance(value, dict):
        return {name: _json(item) for name, item in value.items()}
    return value


def _state_name(state: Any) -> Any:
    """What telebot's storages store for ``state``: a ``State``'s name, anything else as is."""
    return state.name if hasattr(state, "name") else state


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells ``1`` from ``1.0`` from ``True``, and ``0.0`` from ``-0.0``."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return repr(a) == repr(b)  # tells 0.0 from -0.0
    return bool(a == b)


def _changes(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The fields ``after`` sets (new or changed) and the ones it dropped, against ``before``."""
    changed = {k: _json(v) for k, v in after.items() if k not in before or not _same(before[k], v)}
    dropped = [k for k in before if k not in after]
    return changed, dropped


def _apply_changes(changed: dict[str, Any], dropped: list[str]) -> _Transaction:
    """A transaction function that applies a block's changes to the key's current data."""

    def apply(doc: JSONObject) -> JSONObject:
        if not _exists(doc):
            return doc  # deleted meanwhile: nothing to save, as telebot's save()
        data = _data_of(doc)
        for name in dropped:
            data.pop(name, None)
        data.update(changed)
        doc[DATA_FIELD] = data
        return doc

    return apply


def _create(state: Any) -> _Transaction:
    """A transaction function: create the key with ``state`` and empty data, or set its state."""

    def create(doc: JSONObject) -> JSONObject:
        if _exists(doc):
            doc[STATE_FIELD] = state
            return doc
        return {STATE_FIELD: state, DATA_FIELD: {}}

    return create


def update_key(event: Any) -> str | None:
    """What identifies an update's content for the dedupe middlewares, ``None`` if nothing does.

    telebot hands middlewares the update's content, not its ``update_id``; a
    redelivered update repeats its content, so a message (new, edited, a
    channel post, a business message) is keyed by its chat and message id,
    its business connection and its edit date (an edit is not a copy of the
    message it edits), and a callback, inline, shipping or pre-checkout
    query by its id.

    Examples:
        >>> from telebot.types import CallbackQuery
        >>> update_key(CallbackQuery.de_json(
        ...     {"id": "77", "from": {"id": 7, "is_bot": False, "first_name": "A"},
        ...      "chat_instance": "c"}))
        'callback_query:77'
        >>> update_key(object()) is None
        True
    """
    if isinstance(event, Message):
        key = f"message:{event.chat.id}:{event.message_id}"
        if event.business_connection_id is not None:
            key += f":b{event.business_connection_id}"
        if event.edit_date is not None:
            key += f":e{event.edit_date}"
        return key
    for kind, cls in _QUERY_TYPES:
        if isinstance(event, cls):
            return f"{kind}:{event.id}"
    return None


def _seconds(value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ConfigurationError(f"a duration must be positive, got {value!r}")
    return seconds


def _check_prefix(prefix: str | None) -> str:
    """``prefix``, refused when empty."""
    if not prefix:
        raise ConfigurationError("prefix cannot be empty (telebot's storages refuse it too)")
    return prefix


def _of_user(doc_id: str, separator: str, user_id: int) -> bool:
    """Whether a key's user, or its chat (the user's private chat), is ``user_id``.

    The chat and user ids are a key's last two parts, whatever comes before
    them (a business connection id may hold the separator).
    """
    return str(user_id) in doc_id.rsplit(separator, 2)[-2:]


def _cannot_list(user_id: int, exc: ConfigurationError) -> ConfigurationError:
    """The error of an ``erase_user`` whose service cannot list its documents."""
    return ConfigurationError(
        f"erase_user({user_id}) needs a service that lists its documents: {exc}; nothing was erased"
    )


class _Keys:
    """The key of a telebot call, as telebot's own storages build it (``_get_key``)."""

    prefix: str
    separator: str
    _get_key: Callable[..., str]

    def user_id(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> str:
        """The chatstate user id of a telebot key: the key telebot's own storages would use."""
        return str(
            self._get_key(
                chat_id,
                user_id,
                self.prefix,
                self.separator,
                business_connection_id,
                message_thread_id,
                bot_id,
            )
        )
