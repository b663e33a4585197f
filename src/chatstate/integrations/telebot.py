"""chatstate as pyTelegramBotAPI's state storage, and a guard against duplicate updates.

Switch a bot over with one line; handlers, ``StateContext`` and
``bot.add_data``/``retrieve_data`` stay as they are::

    from chatstate.integrations.telebot import ChatstateStateStorage, UpdateDedupeMiddleware

    storage = ChatstateStateStorage.from_url("redis://localhost:6379/0")
    bot = TeleBot(TOKEN, state_storage=storage, use_class_middlewares=True)
    bot.setup_middleware(UpdateDedupeMiddleware(bot, storage.service))  # optional, first
    bot.setup_middleware(StateMiddleware(bot))

:class:`AsyncChatstateStateStorage` and :class:`AsyncUpdateDedupeMiddleware`
are the twins for ``AsyncTeleBot``.

Each key telebot builds (``telebot:<bot>:<business connection>:<thread>:<chat>:<user>``,
the parts that are unset left out, exactly as its own storages build it) is
one chatstate document ``{"state": ..., "data": {...}}``; the key exists (for
``set_data``, ``reset_data``, ``save`` and ``delete_state``) while the
document has a ``"state"`` field, as telebot's record exists from
``set_state`` to ``delete_state``. ``set_data`` (what ``bot.add_data`` and
``StateContext.add_data`` call, once per keyword) writes only its field, in
one chatstate write, so concurrent handlers never lose each other's fields
where telebot's own storages read the whole data and write it back. Values
are stored as JSON, exactly (a tuple as a list, as telebot's Redis storage
stores it).

Needs ``pip install 'chatstate[telebot]'``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from telebot import asyncio_handler_backends, handler_backends
from telebot import asyncio_storage as telebot_async_storage
from telebot import storage as telebot_storage
from telebot.types import CallbackQuery, InlineQuery, Message, PreCheckoutQuery, ShippingQuery

from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.state import (
    AsyncClaim,
    AsyncRedisBackend,
    AsyncStateService,
    Claim,
    RedisBackend,
    StateService,
)
from chatstate.typing import JSONObject

__all__ = [
    "DATA_FIELD",
    "DEDUPE_UPDATE_TYPES",
    "STATE_FIELD",
    "AsyncChatstateStateStorage",
    "AsyncUpdateDedupeMiddleware",
    "ChatstateStateStorage",
    "UpdateDedupeMiddleware",
    "update_key",
]

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


# -- pure: documents, values, update keys ------------------------------------------------


def _exists(doc: JSONObject) -> bool:
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


# -- the sync storage --------------------------------------------------------------------


class ChatstateStateStorage(_Keys, telebot_storage.StateStorageBase):
    """telebot's state storage (for ``TeleBot``) over a :class:`~chatstate.StateService`.

    It answers every call as telebot's ``StateMemoryStorage`` does:
    ``get_state`` of a key never set is ``None`` and its data ``{}``;
    ``set_state`` creates the key (with empty data) or changes its state;
    ``set_data`` on a key that does not exist raises ``RuntimeError``;
    ``reset_data``, ``save`` and ``delete_state`` on one return ``False``.
    What differs: ``set_data`` writes its one field in one atomic write, so
    concurrent handlers of one user all keep their fields, across threads
    and processes; ``get_data`` returns a copy; values are JSON (see the
    module); ``retrieve_data`` blocks save only the fields they changed
    (see :meth:`get_interactive_data`).

    Args:
        service: Where the documents live. Closed by :meth:`close` only if
            ``close_service`` is true (see :meth:`from_url`).
        prefix: The first part of every key, as telebot's ``prefix``.
        separator: Between the key's parts, as telebot's ``separator``.
        close_service: Close ``service`` in :meth:`close`.

    Raises:
        UsageError: ``service`` is an :class:`~chatstate.AsyncStateService`
            (use :class:`AsyncChatstateStateStorage` with ``AsyncTeleBot``).
        ConfigurationError: ``prefix`` is empty.
    """

    def __init__(
        self,
        service: StateService,
        *,
        prefix: str = "telebot",
        separator: str = ":",
        close_service: bool = False,
    ) -> None:
        if not isinstance(service, StateService):
            raise UsageError(
                "ChatstateStateStorage needs a StateService; for AsyncTeleBot use "
                "AsyncChatstateStateStorage with an AsyncStateService"
            )
        self.service = service
        self.prefix = _check_prefix(prefix)
        self.separator = separator
        self._close_service = close_service

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "telebot",
        ttl: float | timedelta | None = None,
        cluster: bool = False,
        **options: Any,
    ) -> Self:
        """A storage over a new Redis or Valkey service, closed by :meth:`close`.

        Args:
            url: The server (``redis://``, ``rediss://`` or ``unix://``).
            namespace: The prefix of every Redis key this storage writes.
            ttl: Forget a key's state and data this long after its last write.
            cluster: The URL names a Redis Cluster node.
            **options: Passed to :meth:`chatstate.RedisBackend.from_url`.
        """
        backend = RedisBackend.from_url(url, namespace=namespace, cluster=cluster, **options)
        return cls(StateService(backend, ttl=ttl), close_service=True)

    def __repr__(self) -> str:
        return f"<ChatstateStateStorage service={self.service!r}>"

    __str__ = __repr__  # telebot's storages define __str__; the object's would show nothing else

    def set_state(  # noqa: PLR0917 - telebot's signature: it passes them by position
        self,
        chat_id: int,
        user_id: int,
        state: Any,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Set the key's state (a ``State`` as its name), creating the key with empty data."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        value = _json(_state_name(state))
        if _exists(self.service.get(uid)):
            self.service.assign(uid, {STATE_FIELD: value})
        else:  # create it with empty data, unless a concurrent call created it meanwhile
            self.service.transaction(uid, _create(value))
        return True

    def get_state(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> Any:
        """Return the key's state, ``None`` when the key does not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return self.service.get(uid).get(STATE_FIELD)

    def delete_state(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Delete the key, state and data; ``False`` when it did not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(self.service.get(uid)):
            return False
        self.service.delete(uid)
        return True

    def set_data(  # noqa: PLR0917 - telebot's signature: it passes them by position
        self,
        chat_id: int,
        user_id: int,
        key: str,
        value: Any,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Set one field of the key's data, in one atomic write of that field only.

        Raises:
            RuntimeError: the key does not exist (no ``set_state`` yet), as in
                telebot's storages.
            SerializationError: ``value`` is not JSON; nothing was stored.
        """
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(self.service.get(uid)):
            raise RuntimeError(f"ChatstateStateStorage: key {uid} does not exist.")
        self.service.assign(uid, {(DATA_FIELD, key): _json(value)})
        return True

    def get_data(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> dict[str, Any]:
        """Return a copy of the key's data (``{}`` when the key does not exist)."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return _data_of(self.service.get(uid))

    def reset_data(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Empty the key's data, keep its state; ``False`` when the key does not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(self.service.get(uid)):
            return False
        self.service.assign(uid, {DATA_FIELD: {}})
        return True

    def save(  # noqa: PLR0917 - telebot's signature: it passes them by position
        self,
        chat_id: int,
        user_id: int,
        data: Mapping[str, Any],
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Replace the key's data with ``data``; ``False`` when the key does not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(self.service.get(uid)):
            return False
        self.service.assign(uid, {DATA_FIELD: _json(dict(data))})
        return True

    def get_interactive_data(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> _DataBlock:
        """The block behind ``with bot.retrieve_data(...) as data:``.

        The block gets a copy of the key's data; when it ends, the fields it
        set, changed or deleted are written onto the key's current data in
        one write (other fields, which another handler may have set
        meanwhile, stay). Unlike telebot's, a block that raises saves
        nothing and its exception propagates (telebot's saves and, when the
        key exists, swallows the exception).
        """
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return _DataBlock(self.service, uid)

    def erase_user(self, user_id: int) -> list[str]:
        """Erase every key of one user (a data-protection erase): their states and data.

        Every document of this storage whose key has ``user_id`` as its user
        or its chat (their private chat) is erased with
        :meth:`StateService.erase <chatstate.StateService.erase>` (document,
        operation ids, claims), in every bot, business connection and thread.
        Group chats' keys of other users are left as they are.

        Returns:
            The ids of the documents that held something and were erased.

        Raises:
            ConfigurationError: the service cannot list its documents (Redis
                with a ``key_secret``); nothing was erased.
        """
        try:
            found = [
                doc_id
                for doc_id in self.service.users(prefix=self.prefix + self.separator)
                if _of_user(doc_id, self.separator, user_id)
            ]
        except ConfigurationError as exc:
            raise _cannot_list(user_id, exc) from exc
        return sorted(doc_id for doc_id in found if self.service.erase(doc_id))

    def close(self) -> None:
        """Close the service if this storage owns it (see ``close_service``)."""
        if self._close_service:
            self.service.close()


def _create(state: Any) -> _Transaction:
    """A transaction function: create the key with ``state`` and empty data, or set its state."""

    def create(doc: JSONObject) -> JSONObject:
        if _exists(doc):
            doc[STATE_FIELD] = state
            return doc
        return {STATE_FIELD: state, DATA_FIELD: {}}

    return create


class _DataBlock:
    """``with bot.retrieve_data(...) as data:`` over a :class:`~chatstate.StateService`."""

    def __init__(self, service: StateService, user_id: str) -> None:
        self.service = service
        self.user_id = user_id
        self.before: dict[str, Any] = {}
        self.data: dict[str, Any] = {}

    def __enter__(self) -> dict[str, Any]:
        self.before = _data_of(self.service.get(self.user_id))
        self.data = copy.deepcopy(self.before)
        return self.data

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            return
        changed, dropped = _changes(self.before, self.data)
        if not changed and not dropped:
            return
        if not dropped:
            if _exists(self.service.get(self.user_id)):
                self.service.assign(self.user_id, {(DATA_FIELD, k): v for k, v in changed.items()})
            return
        self.service.transaction(self.user_id, _apply_changes(changed, dropped))


# -- the async storage -------------------------------------------------------------------


class AsyncChatstateStateStorage(_Keys, telebot_async_storage.StateStorageBase):
    """telebot's asyncio state storage (``AsyncTeleBot``) over an ``AsyncStateService``.

    The twin of :class:`ChatstateStateStorage`: the same answers, the same
    documents (a sync and an async bot on one backend share their keys).

    Args:
        service: Where the documents live. Closed by :meth:`close` only if
            ``close_service`` is true (see :meth:`from_url`).
        prefix: The first part of every key, as telebot's ``prefix``.
        separator: Between the key's parts, as telebot's ``separator``.
        close_service: Close ``service`` in :meth:`close`.

    Raises:
        UsageError: ``service`` is a :class:`~chatstate.StateService` (use
            :class:`ChatstateStateStorage` with ``TeleBot``).
        ConfigurationError: ``prefix`` is empty.
    """

    def __init__(
        self,
        service: AsyncStateService,
        *,
        prefix: str = "telebot",
        separator: str = ":",
        close_service: bool = False,
    ) -> None:
        if not isinstance(service, AsyncStateService):
            raise UsageError(
                "AsyncChatstateStateStorage needs an AsyncStateService; for TeleBot use "
                "ChatstateStateStorage with a StateService"
            )
        self.service = service
        self.prefix = _check_prefix(prefix)
        self.separator = separator
        self._close_service = close_service

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "telebot",
        ttl: float | timedelta | None = None,
        cluster: bool = False,
        **options: Any,
    ) -> Self:
        """A storage over a new Redis or Valkey service, closed by :meth:`close`.

        Args:
            url: The server (``redis://``, ``rediss://`` or ``unix://``).
            namespace: The prefix of every Redis key this storage writes.
            ttl: Forget a key's state and data this long after its last write.
            cluster: The URL names a Redis Cluster node.
            **options: Passed to :meth:`chatstate.AsyncRedisBackend.from_url`.
        """
        backend = AsyncRedisBackend.from_url(url, namespace=namespace, cluster=cluster, **options)
        return cls(AsyncStateService(backend, ttl=ttl), close_service=True)

    def __repr__(self) -> str:
        return f"<AsyncChatstateStateStorage service={self.service!r}>"

    __str__ = __repr__

    async def set_state(  # noqa: PLR0917 - telebot's signature: it passes them by position
        self,
        chat_id: int,
        user_id: int,
        state: Any,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Set the key's state (a ``State`` as its name), creating the key with empty data."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        value = _json(_state_name(state))
        if _exists(await self.service.get(uid)):
            await self.service.assign(uid, {STATE_FIELD: value})
        else:
            await self.service.transaction(uid, _create(value))
        return True

    async def get_state(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> Any:
        """Return the key's state, ``None`` when the key does not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return (await self.service.get(uid)).get(STATE_FIELD)

    async def delete_state(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Delete the key, state and data; ``False`` when it did not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(await self.service.get(uid)):
            return False
        await self.service.delete(uid)
        return True

    async def set_data(  # noqa: PLR0917 - telebot's signature: it passes them by position
        self,
        chat_id: int,
        user_id: int,
        key: str,
        value: Any,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Set one field of the key's data, in one atomic write of that field only.

        Raises:
            RuntimeError: the key does not exist (no ``set_state`` yet), as in
                telebot's storages.
            SerializationError: ``value`` is not JSON; nothing was stored.
        """
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(await self.service.get(uid)):
            raise RuntimeError(f"AsyncChatstateStateStorage: key {uid} does not exist.")
        await self.service.assign(uid, {(DATA_FIELD, key): _json(value)})
        return True

    async def get_data(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> dict[str, Any]:
        """Return a copy of the key's data (``{}`` when the key does not exist)."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return _data_of(await self.service.get(uid))

    async def reset_data(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Empty the key's data, keep its state; ``False`` when the key does not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(await self.service.get(uid)):
            return False
        await self.service.assign(uid, {DATA_FIELD: {}})
        return True

    async def save(  # noqa: PLR0917 - telebot's signature: it passes them by position
        self,
        chat_id: int,
        user_id: int,
        data: Mapping[str, Any],
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> bool:
        """Replace the key's data with ``data``; ``False`` when the key does not exist."""
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        if not _exists(await self.service.get(uid)):
            return False
        await self.service.assign(uid, {DATA_FIELD: _json(dict(data))})
        return True

    def get_interactive_data(
        self,
        chat_id: int,
        user_id: int,
        business_connection_id: str | None = None,
        message_thread_id: int | None = None,
        bot_id: int | None = None,
    ) -> _AsyncDataBlock:
        """The block behind ``async with bot.retrieve_data(...) as data:``.

        See :meth:`ChatstateStateStorage.get_interactive_data`.
        """
        uid = self.user_id(chat_id, user_id, business_connection_id, message_thread_id, bot_id)
        return _AsyncDataBlock(self.service, uid)

    async def erase_user(self, user_id: int) -> list[str]:
        """Erase every key of one user; see :meth:`ChatstateStateStorage.erase_user`.

        Raises:
            ConfigurationError: the service cannot list its documents (Redis
                with a ``key_secret``); nothing was erased.
        """
        try:
            found = [
                doc_id
                async for doc_id in self.service.users(prefix=self.prefix + self.separator)
                if _of_user(doc_id, self.separator, user_id)
            ]
        except ConfigurationError as exc:
            raise _cannot_list(user_id, exc) from exc
        return sorted([doc_id for doc_id in found if await self.service.erase(doc_id)])

    async def close(self) -> None:
        """Close the service if this storage owns it (see ``close_service``)."""
        if self._close_service:
            await self.service.aclose()


class _AsyncDataBlock:
    """``async with bot.retrieve_data(...) as data:`` over an ``AsyncStateService``."""

    def __init__(self, service: AsyncStateService, user_id: str) -> None:
        self.service = service
        self.user_id = user_id
        self.before: dict[str, Any] = {}
        self.data: dict[str, Any] = {}

    async def __aenter__(self) -> dict[str, Any]:
        self.before = _data_of(await self.service.get(self.user_id))
        self.data = copy.deepcopy(self.before)
        return self.data

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            return
        changed, dropped = _changes(self.before, self.data)
        if not changed and not dropped:
            return
        if not dropped:
            if _exists(await self.service.get(self.user_id)):
                await self.service.assign(
                    self.user_id, {(DATA_FIELD, k): v for k, v in changed.items()}
                )
            return
        await self.service.transaction(self.user_id, _apply_changes(changed, dropped))


# -- the dedupe middlewares --------------------------------------------------------------


class _DedupeBase:
    """What both twins share: options, the claim's record, the repr."""

    update_sensitive = False  # one pre_process for every type: update_key tells them apart

    def __init__(
        self,
        bot: Any,
        service: Any,
        *,
        update_types: tuple[str, ...] | list[str] = DEDUPE_UPDATE_TYPES,
        prefix: str = "telebot-update",
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = 10.0,
    ) -> None:
        unknown = set(update_types) - set(DEDUPE_UPDATE_TYPES)
        if unknown:
            raise ConfigurationError(
                f"cannot tell copies of {sorted(unknown)} updates apart (Telegram gives their "
                f"content no id); choose among {list(DEDUPE_UPDATE_TYPES)}"
            )
        self.bot_id: int | None = bot.bot_id  # only the id: the bot (and its token) is not kept
        self.service = service
        self.update_types = list(update_types)
        self.prefix = _check_prefix(prefix)
        self.lease = _seconds(lease)
        self.wait = _seconds(wait)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} bot_id={self.bot_id} service={self.service!r}>"

    def _record(self, key: str) -> str:
        # Message and query ids are per bot: two bots sharing a backend never meet.
        return f"{self.prefix}:{self.bot_id}:{key}"


class UpdateDedupeMiddleware(_DedupeBase, handler_backends.BaseMiddleware):
    """Handles each Telegram update once, across every ``TeleBot`` sharing one backend.

    A class middleware (``TeleBot(..., use_class_middlewares=True)``, then
    ``bot.setup_middleware(UpdateDedupeMiddleware(bot, service))``, first of
    the middlewares). Before the handlers run it takes a chatstate claim for
    the update (keyed by :func:`update_key`); a copy of an update already
    handled is cancelled (no handler and no later middleware runs), and a
    copy that arrives while the first is being handled waits for it (up to
    ``wait``). When the handlers return, the claim is committed and the
    update is remembered for the service's ``dedupe_window`` (10 minutes by
    default); when a handler raised, the claim is released, so a
    redelivery runs again.

    Args:
        bot: The ``TeleBot`` (only its id is kept).
        service: Where the claims live (shared by every process of the bot).
        update_types: Which update types to guard (see :data:`DEDUPE_UPDATE_TYPES`).
        prefix: The start of the user ids of the claim records.
        lease: How long an update stays claimed after its process died: the
            claim is renewed every third of its lease while the handlers run.
        wait: How long a copy waits for the first delivery's handlers before
            :class:`~chatstate.exceptions.UserBusyError`.

    Raises:
        UsageError: ``service`` is an :class:`~chatstate.AsyncStateService`.
        ConfigurationError: an update type has no id to tell copies apart.
    """

    def __init__(
        self,
        bot: Any,
        service: StateService,
        *,
        update_types: tuple[str, ...] | list[str] = DEDUPE_UPDATE_TYPES,
        prefix: str = "telebot-update",
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = 10.0,
    ) -> None:
        if not isinstance(service, StateService):
            raise UsageError(
                "UpdateDedupeMiddleware needs a StateService; for AsyncTeleBot use "
                "AsyncUpdateDedupeMiddleware with an AsyncStateService"
            )
        super().__init__(
            bot, service, update_types=update_types, prefix=prefix, lease=lease, wait=wait
        )

    def pre_process(self, message: Any, data: dict[str, Any]) -> Any:
        """Claim the update; cancel it if it was handled already."""
        key = update_key(message)
        if key is None:
            return None
        claim = self.service.claim(
            self._record(key), key, purpose=DEDUPE_PURPOSE, lease=self.lease, wait=self.wait
        )
        if claim.duplicate:
            log.info("update %s was handled already; skipping it", key)
            return handler_backends.CancelUpdate()
        data[_CLAIM] = claim
        return None

    def post_process(self, message: Any, data: dict[str, Any], exception: Any) -> None:
        """Remember the update if its handlers returned; give it up if one raised."""
        del message
        claim: Claim | None = data.pop(_CLAIM, None)
        if claim is None:
            return
        if exception is None:
            claim.commit()
        else:
            claim.release()


class AsyncUpdateDedupeMiddleware(_DedupeBase, asyncio_handler_backends.BaseMiddleware):
    """Handles each Telegram update once, across every ``AsyncTeleBot`` sharing one backend.

    The twin of :class:`UpdateDedupeMiddleware`, with the same arguments:
    ``bot.setup_middleware(AsyncUpdateDedupeMiddleware(bot, service))``.

    Raises:
        UsageError: ``service`` is a :class:`~chatstate.StateService`.
        ConfigurationError: an update type has no id to tell copies apart.
    """

    def __init__(
        self,
        bot: Any,
        service: AsyncStateService,
        *,
        update_types: tuple[str, ...] | list[str] = DEDUPE_UPDATE_TYPES,
        prefix: str = "telebot-update",
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = 10.0,
    ) -> None:
        if not isinstance(service, AsyncStateService):
            raise UsageError(
                "AsyncUpdateDedupeMiddleware needs an AsyncStateService; for TeleBot use "
                "UpdateDedupeMiddleware with a StateService"
            )
        super().__init__(
            bot, service, update_types=update_types, prefix=prefix, lease=lease, wait=wait
        )

    async def pre_process(self, message: Any, data: dict[str, Any]) -> Any:
        """Claim the update; cancel it if it was handled already."""
        key = update_key(message)
        if key is None:
            return None
        claim = await self.service.claim(
            self._record(key), key, purpose=DEDUPE_PURPOSE, lease=self.lease, wait=self.wait
        )
        if claim.duplicate:
            log.info("update %s was handled already; skipping it", key)
            return asyncio_handler_backends.CancelUpdate()
        data[_CLAIM] = claim
        return None

    async def post_process(self, message: Any, data: dict[str, Any], exception: Any) -> None:
        """Remember the update if its handlers returned; give it up if one raised."""
        del message
        claim: AsyncClaim | None = data.pop(_CLAIM, None)
        if claim is None:
            return
        if exception is None:
            await claim.commit()
        else:
            await claim.release()
