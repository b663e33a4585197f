"""chatstate as aiogram 3's FSM storage, event isolation and update dedupe.

Switch a bot over with one line; handlers, ``FSMContext`` and scenes stay as
they are::

    from chatstate.integrations.aiogram import ChatstateStorage

    storage = ChatstateStorage.from_url("redis://localhost:6379/0")
    dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
    ChatstateDedupeMiddleware(storage.service).setup(dp)

Each :class:`~aiogram.fsm.storage.base.StorageKey` is one chatstate document
``{"state": ..., "data": {...}}`` (one Cluster slot), so
:meth:`ChatstateStorage.update_data` is a single atomic write where aiogram's
own storages read, merge in Python and write back (and lose concurrent updates).
Values are stored as JSON, as aiogram's ``RedisStorage`` stores them: enum
members as their values, tuples as lists (and read back so).

Under the event isolation an update owns its key, so it is handled as one
step: the isolation takes a chatstate claim on the key's document (with the
dedupe middleware set up, for the update's id: claim, dedupe and read in one
script), the handlers read that snapshot and their writes to the key are
staged on it (each call sees the ones before), and when they return, one
atomic write stores them, remembers the update and releases the key. If the
handlers raise, or the process dies, nothing of the update's writes to its key
lands and the update is not remembered: a redelivery runs against the state
as it was before. Writes to other keys, and writes outside the isolation, go
straight to the store as before.

Needs ``pip install 'chatstate[aiogram]'``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, Self, cast, overload
from urllib.parse import quote

from aiogram.dispatcher.event.bases import UNHANDLED
from aiogram.dispatcher.middlewares.base import BaseMiddleware
from aiogram.exceptions import DataNotDictLikeError
from aiogram.fsm.state import State
from aiogram.fsm.storage.base import (
    DEFAULT_DESTINY,
    BaseEventIsolation,
    BaseStorage,
    KeyBuilder,
    StateType,
    StorageKey,
)
from aiogram.types import Message, TelegramObject, Update
from aiogram.types.update import UpdateTypeLookupError

from chatstate._locks import AsyncKeyedLocks
from chatstate._plain import plain as _plain
from chatstate.exceptions import (
    ClaimLostError,
    ConfigurationError,
    LockLostError,
)
from chatstate.integrations._turns import claim_in_turn
from chatstate.state import AsyncClaim, AsyncRedisBackend, AsyncStateService
from chatstate.typing import JSONObject

if TYPE_CHECKING:
    from aiogram import Dispatcher

__all__ = [
    "DATA_FIELD",
    "STATE_FIELD",
    "ChatstateDedupeMiddleware",
    "ChatstateEventIsolation",
    "ChatstateKeyBuilder",
    "ChatstateStorage",
    "dedupe_key",
]

log = logging.getLogger("chatstate.integrations.aiogram")

STATE_FIELD = "state"
"""The document field that holds a key's FSM state (absent when it is ``None``)."""
DATA_FIELD = "data"
"""The document field that holds a key's FSM data (absent when it is empty)."""

LOCK_NAME = "aiogram"
DEDUPE_PURPOSE = "aiogram"
DEFAULT_LEASE = 5.0
"""Seconds a claim or lock outlives a holder that died (renewed while it lives), as the core's."""

_PartType = Literal["data", "state", "lock"]
_MESSAGE_EVENTS = frozenset(
    {
        "message",
        "edited_message",
        "channel_post",
        "edited_channel_post",
        "business_message",
        "edited_business_message",
    }
)


class ChatstateKeyBuilder(KeyBuilder):
    """Turns a whole :class:`~aiogram.fsm.storage.base.StorageKey` into one chatstate user id.

    The id reads like aiogram's keys (``fsm:<bot>:<chat>:<user>``, then
    ``t<thread>``, ``b<business connection>``, ``d<destiny>`` when present),
    and unlike :class:`~aiogram.fsm.storage.base.DefaultKeyBuilder` it is
    injective: two keys that differ in any field it includes give two ids.
    Text fields are percent-encoded, so a separator inside them cannot fake
    a boundary and Unicode normalisation cannot merge two of them. chatstate
    places the whole id in one Redis Cluster hash slot.

    Examples:
        >>> from aiogram.fsm.storage.base import StorageKey
        >>> build = ChatstateKeyBuilder().build
        >>> build(StorageKey(bot_id=1, chat_id=-100, user_id=7))
        'fsm:1:-100:7'
        >>> build(StorageKey(1, -100, 7, thread_id=0, destiny="a:b"))
        'fsm:1:-100:7:t0:da%3Ab'

    Args:
        prefix: What every id starts with.
        separator: Between the parts; only characters that percent-encoding
            always escapes (``":"``, ``"/"``, ``"|"``, ...), never ``"%"``.
        with_bot_id: Include the bot id (leave it off only to share state
            between bots on purpose).
        with_business_connection_id: Include the business connection id.
        with_destiny: Include the destiny; when off, a key with a destiny
            other than the default raises ``ValueError``, as aiogram's does.

    Raises:
        ConfigurationError: the separator could occur inside an encoded part.
    """

    def __init__(
        self,
        *,
        prefix: str = "fsm",
        separator: str = ":",
        with_bot_id: bool = True,
        with_business_connection_id: bool = True,
        with_destiny: bool = True,
    ) -> None:
        if not separator or any(quote(ch, safe="") == ch or ch == "%" for ch in separator):
            raise ConfigurationError(
                f"separator {separator!r} could occur inside an encoded part; "
                "use characters percent-encoding escapes, such as ':' or '/'"
            )
        self.prefix = prefix
        self.separator = separator
        self.with_bot_id = with_bot_id
        self.with_business_connection_id = with_business_connection_id
        self.with_destiny = with_destiny

    def build(self, key: StorageKey, part: _PartType | None = None) -> str:
        """Return the user id of ``key`` (with ``part`` appended when given).

        Raises:
            ValueError: ``with_destiny`` is off and ``key`` has another destiny.
        """
        parts = [self.prefix]
        if self.with_bot_id:
            parts.append(str(key.bot_id))
        parts += [str(key.chat_id), str(key.user_id)]
        # Optional parts carry a one-letter tag, so their presence is never ambiguous.
        if key.thread_id is not None:
            parts.append(f"t{key.thread_id}")
        if self.with_business_connection_id and key.business_connection_id is not None:
            parts.append("b" + quote(key.business_connection_id, safe=""))
        if key.destiny != DEFAULT_DESTINY:
            if not self.with_destiny:
                raise ValueError(
                    "this key builder is not configured to use a destiny other than the "
                    "default; pass with_destiny=True"
                )
            parts.append("d" + quote(key.destiny, safe=""))
        if part:
            parts.append(f"p{part}")
        return self.separator.join(parts)


class ChatstateStorage(BaseStorage):
    """aiogram's FSM storage over an :class:`~chatstate.AsyncStateService`.

    It answers every call as aiogram's ``MemoryStorage`` and ``RedisStorage``
    do: ``get_state`` of a new key is ``None``, ``update_data`` is a shallow
    ``dict.update`` (a ``None`` value is stored, a nested dict replaces the
    old one), ``set_data({})`` empties the data, ``set_data`` refuses a
    non-dict with :class:`~aiogram.exceptions.DataNotDictLikeError`. What
    differs: ``update_data`` is one atomic write, so concurrent updates of one
    key from many tasks or processes all land; values are stored as JSON, as
    ``RedisStorage`` stores them: an enum member as its value, a tuple as a
    list, and they are read back so (an ``IntEnum`` or ``StrEnum`` member
    equals its value; a plain ``Enum`` member does not); anything else that is
    not JSON raises :class:`~chatstate.exceptions.SerializationError` before anything is
    stored; the service's ``ttl`` expires a key's state and data together.

    Args:
        service: Where the documents live. Closed by :meth:`close` only if
            ``close_service`` is true (see :meth:`from_url`).
        key_builder: Turns a storage key into a chatstate user id; a
            :class:`ChatstateKeyBuilder` when omitted.
        close_service: Close ``service`` when aiogram closes the storage.
        close_wait: How long :meth:`close` lets running events finish.
    """

    def __init__(
        self,
        service: AsyncStateService,
        *,
        key_builder: KeyBuilder | None = None,
        close_service: bool = False,
        close_wait: float = 10.0,
    ) -> None:
        self.service = service
        self.key_builder = key_builder if key_builder is not None else ChatstateKeyBuilder()
        self._close_service = close_service
        self.close_wait = close_wait

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "aiogram",
        key_builder: KeyBuilder | None = None,
        ttl: float | timedelta | None = None,
        cluster: bool = False,
        **options: Any,
    ) -> Self:
        """A storage over a new Redis or Valkey service, closed with the storage.

        Args:
            url: The server (``redis://``, ``rediss://`` or ``unix://``).
            namespace: The prefix of every Redis key this storage writes.
            key_builder: See the class.
            ttl: Forget a key's state and data this long after its last write.
            cluster: The URL names a Redis Cluster node.
            **options: Passed to :meth:`chatstate.AsyncRedisBackend.from_url`.
        """
        backend = AsyncRedisBackend.from_url(url, namespace=namespace, cluster=cluster, **options)
        service = AsyncStateService(backend, ttl=ttl)
        return cls(service, key_builder=key_builder, close_service=True)

    def __repr__(self) -> str:
        return f"<ChatstateStorage service={self.service!r}>"

    def user_id(self, key: StorageKey) -> str:
        """The chatstate user id that holds ``key``'s state and data."""
        return self.key_builder.build(key)

    def create_isolation(
        self, *, lease: float | timedelta = DEFAULT_LEASE, wait: float | timedelta = 60.0
    ) -> ChatstateEventIsolation:
        """An event isolation over the same service and key builder.

        Args:
            lease: See :class:`ChatstateEventIsolation`.
            wait: See :class:`ChatstateEventIsolation`.
        """
        return ChatstateEventIsolation(
            self.service, key_builder=self.key_builder, lease=lease, wait=wait
        )

    def _held(self, key: StorageKey) -> _KeySession | None:
        """The open isolation session of ``key`` in this context, if there is one."""
        sessions = _SESSIONS.get()
        if not sessions:
            return None
        backend = self.service.manager.backend
        for session in reversed(sessions):  # the common case: the key the lock was taken for
            if session.key == key and session.builder is self.key_builder:
                return session if session.backend is backend and session.open else None
        return _find(sessions, self.service, self.service.manager.user_id(self.user_id(key)))

    async def set_state(self, key: StorageKey, state: StateType = None) -> None:
        """Set the key's state (``None`` clears it)."""
        value = state.state if isinstance(state, State) else _plain(state)
        session = self._held(key)
        if session is not None:
            session.set_state(value)
        elif value is None:
            await self.service.update(self.user_id(key), {STATE_FIELD: None})
        else:
            await self.service.assign(self.user_id(key), {STATE_FIELD: value})

    async def get_state(self, key: StorageKey) -> str | None:
        """Return the key's state, ``None`` when it has none."""
        session = self._held(key)
        if session is not None:
            return cast("str | None", session.state)
        doc = await self.service.get(self.user_id(key))
        return cast("str | None", doc.get(STATE_FIELD))

    async def set_data(self, key: StorageKey, data: Mapping[str, Any]) -> None:
        """Replace the key's data with ``data`` (``{}`` empties it).

        Raises:
            DataNotDictLikeError: ``data`` is not a dict (as in aiogram's storages).
            SerializationError: ``data`` is not JSON (enum members and tuples
                are: see the class); nothing was stored.
        """
        if not isinstance(data, dict):
            msg = f"Data must be a dict or dict-like object, got {type(data).__name__}"
            raise DataNotDictLikeError(msg)
        session = self._held(key)
        if session is not None:
            session.set_data(_plain(data))
        elif data:
            await self.service.assign(self.user_id(key), {DATA_FIELD: _plain(data)})
        else:
            await self.service.update(self.user_id(key), {DATA_FIELD: None})

    async def get_data(self, key: StorageKey) -> dict[str, Any]:
        """Return a copy of the key's data (``{}`` when it has none)."""
        session = self._held(key)
        if session is not None:
            return cast("dict[str, Any]", _copy(session.data))
        return _data_of(await self.service.get(self.user_id(key)))

    @overload
    async def get_value(self, storage_key: StorageKey, dict_key: str) -> Any | None: ...

    @overload
    async def get_value(self, storage_key: StorageKey, dict_key: str, default: Any) -> Any: ...

    async def get_value(
        self, storage_key: StorageKey, dict_key: str, default: Any | None = None
    ) -> Any | None:
        """Return one value of the key's data, or ``default``."""
        session = self._held(storage_key)
        if session is not None:
            return _copy(session.data.get(dict_key, default))
        return (await self.get_data(storage_key)).get(dict_key, default)

    async def update_data(self, key: StorageKey, data: Mapping[str, Any]) -> dict[str, Any]:
        """Set each item of ``data`` in the key's data, in one atomic write.

        As ``dict.update``: other keys stay, a ``None`` value is stored, a dict
        value replaces the old one whole. Concurrent calls never lose each
        other's keys. Under the key's event isolation the write is staged and
        stored with the update's other writes when its handlers return.

        Returns:
            The key's whole data after the write, as stored (an enum member as
            its value, a tuple as a list).

        Raises:
            SerializationError: a key is not a str or a value is not JSON
                (enum members and tuples are: see the class); nothing was stored.
        """
        items = _plain(dict(data))
        session = self._held(key)
        if session is not None:
            if items:
                session.update_data(items)
            return cast("dict[str, Any]", _copy(session.data))
        if not items:
            return await self.get_data(key)
        doc = await self.service.assign(
            self.user_id(key), {(DATA_FIELD, name): value for name, value in items.items()}
        )
        return _data_of(doc.to_dict())

    async def erase_user(self, user_id: int) -> list[str]:
        """Erase every key of one user (a data-protection erase): their state and data.

        Every document of this storage whose key has ``user_id`` as its user
        or its chat (their private chat) is erased with
        :meth:`AsyncStateService.erase <chatstate.AsyncStateService.erase>`
        (document, operation ids, claims), in every bot, thread and destiny.
        Group chats' keys of other users are left as they are.

        Args:
            user_id: The Telegram user id.

        Returns:
            The ids of the documents that held something and were erased.

        Raises:
            ConfigurationError: the key builder is not a
                :class:`ChatstateKeyBuilder` (its ids cannot be read back), or
                the service cannot list its documents (Redis with a
                ``key_secret``); nothing was erased.
        """
        builder = self.key_builder
        if not isinstance(builder, ChatstateKeyBuilder):
            raise ConfigurationError(
                f"erase_user() reads the ids of ChatstateKeyBuilder only, not of "
                f"{type(builder).__name__}; nothing was erased"
            )
        start = builder.prefix + builder.separator
        at = 2 if builder.with_bot_id else 1  # where the chat id is, then the user id
        wanted = str(user_id)
        try:
            found = [
                doc_id
                async for doc_id in self.service.users(prefix=start)
                if wanted in doc_id.removeprefix(start).split(builder.separator)[at - 1 : at + 1]
            ]
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"erase_user({user_id}) needs a service that lists its documents: {exc}; "
                "nothing was erased"
            ) from exc
        return sorted([doc_id for doc_id in found if await self.service.erase(doc_id)])

    async def close(self) -> None:
        """Close the service if this storage owns it (see ``close_service``).

        aiogram closes the storage when polling stops, while the last updates
        may still be running: events that hold a key of this service (see
        :class:`ChatstateEventIsolation`) get up to ``close_wait`` seconds to
        finish and store their writes first.
        """
        if not self._close_service:
            return
        backend = self.service.manager.backend
        running = [s.done for s in list(_LIVE) if s.backend is backend and not s.done.done()]
        if running:
            log.info("letting %d running update(s) finish before closing", len(running))
            await asyncio.wait(running, timeout=self.close_wait)
        await self.service.aclose()


def _data_of(doc: JSONObject) -> dict[str, Any]:
    """The data field of a document the caller owns (a private copy already)."""
    data = doc.get(DATA_FIELD)
    return data if isinstance(data, dict) else {}


def _copy(value: Any) -> Any:
    """A private copy of a JSON value (dicts and lists copied, scalars shared)."""
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value


class _KeySession:
    """One storage key held by the isolation for one event: its claim and its document.

    ``state`` and ``data`` are the document as the event's handlers see it: the
    claim's snapshot with their writes so far. Each write is staged on the
    claim first (so a value that is not JSON is refused before anything
    changes) and then applied here. :meth:`finish` stores them all in the
    claim's one commit.
    """

    __slots__ = (
        "__weakref__",
        "after",
        "backend",
        "builder",
        "claim",
        "data",
        "done",
        "key",
        "state",
        "user_id",
    )

    def __init__(
        self, service: AsyncStateService, claim: AsyncClaim, key: StorageKey, builder: KeyBuilder
    ) -> None:
        doc = claim.data  # the claim's own copy, which nothing else reads
        state = doc.get(STATE_FIELD)
        data = doc.get(DATA_FIELD)
        self.backend = service.manager.backend
        self.key, self.builder = key, builder  # claim.user_id is builder.build(key)
        self.user_id = claim.user_id
        self.claim = claim
        self.state: Any = state
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}
        self.after: list[AsyncClaim] = []  # dedupe claims committed once this one is
        self.done = asyncio.get_running_loop().create_future()
        _LIVE.add(self)

    @property
    def open(self) -> bool:
        return self.claim.open

    def set_state(self, value: Any) -> None:
        if value is None:
            self.claim.update({STATE_FIELD: None})
        else:
            self.claim.assign({STATE_FIELD: value})
        self.state = value

    def set_data(self, data: dict[str, Any]) -> None:
        if data:
            self.claim.assign({DATA_FIELD: data})
        else:
            self.claim.update({DATA_FIELD: None})
        self.data = data  # fresh from _plain: nobody else holds it

    def update_data(self, items: dict[str, Any]) -> None:
        self.claim.assign({(DATA_FIELD, name): value for name, value in items.items()})
        self.data.update(items)  # fresh from _plain

    async def finish(self, exc: BaseException | None) -> None:
        """Commit (``exc`` is None) or give up the key, then settle the claims that wait on it.

        Raises:
            LockLostError: the lease ran out and another event took the key:
                nothing of this one was written.
        """
        try:
            await self._finish(exc)
        finally:
            if not self.done.done():
                self.done.set_result(None)

    async def _finish(self, exc: BaseException | None) -> None:
        claim, after = self.claim, self.after
        if exc is not None:
            await _release_quietly(claim, *after)
            return
        try:
            await claim.commit()
        except ClaimLostError as lost:
            await _release_quietly(*after)
            raise LockLostError(
                "the key's lease ran out while its event was handled and another event "
                "took it over; nothing of this event was written"
            ) from lost
        except BaseException:
            await _release_quietly(claim, *after)
            raise
        for waiting in after:
            await waiting.commit()


async def _release_quietly(*claims: AsyncClaim) -> None:
    """Give claims up; a failure only delays them (they lapse after their lease)."""
    for claim in claims:
        if not claim.open:
            continue
        try:
            await claim.release()
        except Exception:
            log.warning("could not release the claim on %r", claim.user_id, exc_info=True)


_LIVE: weakref.WeakSet[_KeySession] = weakref.WeakSet()
"""Every key held now, so that closing a storage lets their events finish first."""

_SESSIONS: ContextVar[tuple[_KeySession, ...]] = ContextVar("chatstate_aiogram_keys", default=())
"""The keys the isolation holds in this context (a task and the tasks it starts)."""


def _find(
    sessions: tuple[_KeySession, ...], service: AsyncStateService, user_id: str
) -> _KeySession | None:
    backend = service.manager.backend
    for session in reversed(sessions):
        if session.user_id == user_id and session.backend is backend and session.open:
            return session
    return None


class _PendingUpdate:
    """An update the dedupe middleware passes to the isolation's lock (see ``setup``)."""

    __slots__ = ("backend", "op_id", "taken")

    def __init__(self, backend: object, op_id: str) -> None:
        self.backend = backend
        self.op_id = op_id
        self.taken = False  # by a lock (the fused path) or by the middleware's own claim


_PENDING: ContextVar[_PendingUpdate | None] = ContextVar("chatstate_aiogram_update", default=None)


class _DuplicateUpdate(Exception):  # noqa: N818 - a signal between our two middlewares, not an error
    """Raised by the lock when its claim finds the update handled; caught by the middleware."""


class ChatstateEventIsolation(BaseEventIsolation):
    """Handles the events of one storage key one at a time, across processes, each as one step.

    aiogram holds :meth:`lock` around each handler (``Dispatcher(...,
    events_isolation=...)``), so a handler that reads its data, decides and
    writes acts as one step. The lock is a chatstate claim on the key's
    document, taken together with a read of it; while it is held, the
    storage's calls on that key (from the event's handlers) read that snapshot
    and stage their writes on it, and the end of the block stores them in one
    atomic write that also releases the key (and, with
    :meth:`ChatstateDedupeMiddleware.setup`, remembers the update). An event
    whose handlers raise, or whose process dies, writes nothing to its key.
    The events of a key that one process received run in the order they came
    (first in, first out, as with aiogram's ``SimpleEventIsolation``); across
    processes, one at a time. On the memory backend it serialises the tasks of
    one process.

    Args:
        service: The service whose backend holds the documents and claims.
        key_builder: See :class:`ChatstateStorage`.
        lease: How long the key stays locked after its holder's process died:
            the lock is renewed every third of its lease while the event runs
            (on Redis and SQLite; the memory backend's locks live and die with
            the process), so a slow handler keeps it and a killed one frees it
            within one lease (5 s by default, as the core's claims).
        wait: How long an event waits for the key before
            :class:`~chatstate.exceptions.LockTimeoutError`.

    Any backend isolates events: a claim is a write, which every backend
    applies (no :class:`~chatstate.state.backend.Locking` is needed).
    """

    def __init__(
        self,
        service: AsyncStateService,
        *,
        key_builder: KeyBuilder | None = None,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = 60.0,
    ) -> None:
        self.service = service
        self.key_builder = key_builder if key_builder is not None else ChatstateKeyBuilder()
        self.lease = _seconds(lease)
        self.wait = _seconds(wait)
        self._turns = AsyncKeyedLocks()

    @asynccontextmanager
    async def lock(self, key: StorageKey) -> AsyncGenerator[None, None]:
        """Hold the key for the block; store the block's writes to it when it ends.

        Raises:
            LockTimeoutError: another event held the key for longer than ``wait``.
            LockLostError: the lease ran out while the block ran; nothing of
                the block's writes to the key was stored.
        """
        service = self.service
        user_id = service.manager.user_id(self.key_builder.build(key))
        pending = _PENDING.get()
        op_id = None
        if pending is not None and not pending.taken and pending.backend is service.manager.backend:
            pending.taken = True
            op_id = pending.op_id
        busy = f"another event held the key for longer than {self.wait:g} s"
        async with claim_in_turn(
            self._turns,
            service,
            user_id,
            op_id,
            purpose=DEDUPE_PURPOSE,
            lease=self.lease,
            wait=self.wait,
            busy=busy,
        ) as claim:
            if claim.duplicate:
                raise _DuplicateUpdate(op_id)
            session = _KeySession(service, claim, key, self.key_builder)
            token = _SESSIONS.set((*_SESSIONS.get(), session))
            try:
                yield
            except BaseException as exc:
                _SESSIONS.reset(token)
                await session.finish(exc)
                raise
            _SESSIONS.reset(token)
            await session.finish(None)

    async def close(self) -> None:
        """Nothing to release: the locks live in the store."""


def _seconds(value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ConfigurationError(f"a duration must be positive, got {value!r}")
    return seconds


def dedupe_key(update: Update, by: Literal["update_id", "message_id"] = "update_id") -> str:
    """What identifies ``update`` for :class:`ChatstateDedupeMiddleware`.

    ``"update_id"`` uses Telegram's update id. ``"message_id"`` uses the
    message for updates that carry one (chat id, message id, the kind of
    update and, for an edit, its date, so an edit is not a duplicate of the
    message it edits), the query id for callback and inline queries, and the
    update id for anything else.

    Examples:
        >>> dedupe_key(Update(update_id=5))
        'update:5'
    """
    if by == "message_id":
        try:
            kind = update.event_type
        except UpdateTypeLookupError:  # an update of a kind this aiogram does not know
            return f"update:{update.update_id}"
        event = getattr(update, kind, None)
        if kind in _MESSAGE_EVENTS and isinstance(event, Message):
            key = f"{kind}:{event.chat.id}:{event.message_id}"
            if event.business_connection_id is not None:
                key += ":b" + quote(event.business_connection_id, safe="")
            if event.edit_date is not None:
                key += f":e{_timestamp(event.edit_date)}"
            return key
        query_id = getattr(event, "id", None)
        if kind in {"callback_query", "inline_query"} and isinstance(query_id, str):
            return f"{kind}:{query_id}"
    return f"update:{update.update_id}"


def _timestamp(value: Any) -> int:
    return int(value.timestamp()) if hasattr(value, "timestamp") else int(value)


class ChatstateDedupeMiddleware(BaseMiddleware):
    """Handles each Telegram update once, even when Telegram delivers it again.

    Set it up on the dispatcher with :meth:`setup` (``ChatstateDedupeMiddleware(
    storage.service).setup(dp)``). The handlers run only for the first
    delivery of an update. A redelivery after it was handled runs nothing and
    sends nothing (the dispatcher sees it as unhandled); one that arrives while
    the first is being handled waits for it, then runs nothing if it succeeded.
    When a handler raises, or its process dies (within ``lease``), a
    redelivery is handled again. Update ids are remembered for the service's
    ``dedupe_window`` (10 minutes by default).

    With :meth:`setup` and a :class:`ChatstateEventIsolation` on the same
    backend, an update that has an FSM key is remembered in its key's
    document: the isolation's claim takes the key, checks the update and reads
    the document in one script, and the commit that stores the update's writes
    also remembers it, so an update is remembered exactly when its writes
    land. Any other update (no FSM key, another isolation, or the middleware
    registered with ``dp.update.outer_middleware(...)``, which runs it inside
    the isolation's lock) takes a chatstate claim of its own (its own
    purpose, so its ids never meet yours) on a record of its own; inside the
    lock that claim is committed right after the key's write.

    Args:
        service: Where the claims live (shared by every process of the bot).
        by: ``"update_id"`` or ``"message_id"`` (see :func:`dedupe_key`).
        prefix: The start of the user ids of the claim records.
        lease: How long an update stays claimed after its process died: the
            claim is renewed every third of its lease while the handlers run,
            so a slow handler keeps it and a redelivery after a crash is
            handled within one lease (5 s by default, as the core's claims).
            An update deduped by the isolation has the isolation's lease.
        wait: Passed to :meth:`~chatstate.AsyncStateService.claim` (an update
            deduped by the isolation waits for its key up to the isolation's
            ``wait``).
    """

    def __init__(
        self,
        service: AsyncStateService,
        *,
        by: Literal["update_id", "message_id"] = "update_id",
        prefix: str = "aiogram-update",
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = 10.0,
    ) -> None:
        if by not in {"update_id", "message_id"}:
            raise ConfigurationError(f"by must be 'update_id' or 'message_id', not {by!r}")
        self.service = service
        self.by = by
        self.prefix = prefix
        self.lease = lease
        self.wait = wait

    def setup(self, dispatcher: Dispatcher) -> Self:
        """Register the middleware on ``dispatcher``'s updates, around and inside its FSM.

        Its first half runs before aiogram's FSM middleware, so the event
        isolation's lock can take the update's id together with the key;
        its second half (this object) runs after it, for updates the lock
        did not take. Middlewares registered on ``dispatcher.update`` before
        this call stay where they were.

        Returns:
            This middleware.
        """
        manager = dispatcher.update.outer_middleware
        middlewares = list(manager)
        at = (
            middlewares.index(dispatcher.fsm) if dispatcher.fsm in middlewares else len(middlewares)
        )
        for middleware in middlewares[at:]:
            manager.unregister(middleware)
        manager.register(self._before_fsm)
        for middleware in middlewares[at:]:
            manager.register(middleware)
        manager.register(self)
        return self

    def _op_id(self, update: Update, data: dict[str, Any]) -> tuple[str, int]:
        bot = data.get("bot")
        return dedupe_key(update, self.by), (bot.id if bot is not None else 0)

    async def _before_fsm(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        """Offer the update's id to the isolation's lock; skip the update if it finds it handled."""
        if not isinstance(event, Update):
            return await handler(event, data)
        op_id, bot_id = self._op_id(event, data)
        # Update ids are per bot, and key builders may leave the bot id out.
        pending = _PendingUpdate(self.service.manager.backend, f"{bot_id}:{op_id}")
        token = _PENDING.set(pending)
        try:
            return await handler(event, data)
        except _DuplicateUpdate:
            log.info("update %s was handled already; skipping it", op_id)
            return UNHANDLED
        finally:
            _PENDING.reset(token)

    async def __call__(
        self,
        handler: Callable[[TelegramObject, dict[str, Any]], Awaitable[Any]],
        event: TelegramObject,
        data: dict[str, Any],
    ) -> Any:
        """Run ``handler`` unless the update was handled (or is being handled) already."""
        if not isinstance(event, Update):
            return await handler(event, data)
        pending = _PENDING.get()
        if pending is not None:
            if pending.taken:  # the key's lock deduped it, or a middleware of ours is in
                return await handler(event, data)
            pending.taken = True  # no lock of a handler takes it now
        op_id, bot_id = self._op_id(event, data)
        claim = await self.service.claim(
            f"{self.prefix}:{bot_id}:{op_id}",
            op_id,
            purpose=DEDUPE_PURPOSE,
            lease=self.lease,
            wait=self.wait,
        )
        if claim.duplicate:
            log.info("update %s was handled already; skipping it", op_id)
            return UNHANDLED
        try:
            result = await handler(event, data)
        except BaseException:
            await _release_quietly(claim)
            raise
        sessions = _SESSIONS.get()
        held = next((s for s in reversed(sessions) if s.open), None)
        if held is not None:
            held.after.append(claim)  # remembered once the key's writes are stored
        else:
            await claim.commit()
        return result
