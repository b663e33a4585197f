"""chatstate as python-telegram-bot 22's persistence.

Switch a bot over with one line; handlers, ``context.user_data`` and
persistent conversation handlers stay as they are::

    from chatstate.integrations.telegram import ChatstateApplication, ChatstatePersistence

    app = (
        ApplicationBuilder()
        .token(TOKEN)
        .persistence(ChatstatePersistence.from_url("redis://localhost:6379/0"))
        .application_class(ChatstateApplication)  # optional: several processes, one bot
        .build()
    )

User, chat and bot data live in chatstate documents as JSON (nothing is
pickled: enum members are stored as their values, tuples as lists); a write
sends only what changed since this process last synced the document, so two
processes never overwrite each other's keys; before each update the data is
reloaded from the store, keeping the changes this process has not written yet.
Each persistent conversation is one document with one field per conversation
key.

:class:`ChatstateApplication` handles each update once across the processes
of a bot (a copy delivered to two of them, or delivered again, runs nothing)
and one user's updates one at a time, with the same claims and locks as the
aiogram integration: each held with a 5 s lease renewed while the update runs,
so a process killed mid-update holds nothing for longer than that.

Needs ``pip install 'chatstate[telegram]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal, Self, TypeAlias
from urllib.parse import quote

from telegram import CallbackQuery, InlineQuery, Message, Update
from telegram.ext import (
    Application,
    BaseHandler,
    BasePersistence,
    ConversationHandler,
    PersistenceInput,
)
from telegram.ext._handlers.conversationhandler import PendingState
from telegram.ext._utils.trackingdict import TrackingDict
from telegram.ext._utils.types import CDCData, ConversationDict, ConversationKey

from chatstate._plain import plain as _plain
from chatstate.exceptions import ChatstateError, ConfigurationError, UsageError
from chatstate.state import AsyncRedisBackend, AsyncStateService
from chatstate.typing import JSONObject

__all__ = [
    "DELETE",
    "ChatstateApplication",
    "ChatstatePersistence",
    "apply_changes",
    "changes_between",
    "dedupe_key",
]

log = logging.getLogger("chatstate.integrations.telegram")

LOCK_NAME = "telegram"
DEDUPE_PURPOSE = "telegram"
DEFAULT_LEASE = 5.0
"""Seconds a claim or lock outlives a holder that died (renewed while it lives), as the core's."""

_LOAD_BATCH = 256
"""Documents read at once by the start-up load."""

_MESSAGE_KINDS = (
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_message",
    "edited_business_message",
)

Data: TypeAlias = dict[Any, Any]
Path: TypeAlias = tuple[str, ...]


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE: Final = _Delete()
"""In a change list: the path is removed."""

Change: TypeAlias = tuple[Path, Any]


class ChatstatePersistence(BasePersistence[Data, Data, Data]):
    """python-telegram-bot's persistence over an :class:`~chatstate.AsyncStateService`.

    Documents (ids under ``prefix``): ``<prefix>:user:<id>`` and
    ``<prefix>:chat:<id>`` hold one user's and one chat's data as they are,
    ``<prefix>:bot`` the bot data, ``<prefix>:callback_data`` the callback
    data cache, and ``<prefix>:conversation:<name>`` one field per
    conversation key (its JSON text, ``"[chat_id,user_id]"``) holding the
    state.

    What differs from ``PicklePersistence``:

    - Values are stored as JSON with str keys. An enum member is stored as
      its value and a tuple as a list, and they are read back so (an
      ``IntEnum`` or ``StrEnum`` member equals its value, a plain ``Enum``
      member does not); a conversation state comes back as the handler's own
      state object when :meth:`register_states` was told the handler's states
      (:class:`ChatstateApplication` tells it). A write of anything else (a
      set, a datetime, an int key) raises :class:`~chatstate.SerializationError`
      (python-telegram-bot hands it to your error handlers) and stores nothing.
    - ``update_*_data`` writes the difference between the data and what this
      process last read or wrote, as one atomic write, so concurrent writers
      keep each other's keys (the same key: the last write wins).
    - ``refresh_*_data`` (called before each update) reloads the document
      and re-applies this process's unwritten changes on top.
    - ``get_user_data`` and ``get_chat_data`` read every stored user's and
      chat's document at start-up (as ``PicklePersistence`` loads its file),
      so ``application.user_data`` and ``migrate_chat_data`` see them. Over a
      backend that cannot list (Redis with a ``key_secret``) they return
      ``{}`` and each user's and chat's data is loaded when its first update
      arrives.

    Args:
        service: Where the documents live; closed by :meth:`flush` only if
            ``close_service`` is true (see :meth:`from_url`).
        prefix: The start of every document id this persistence uses.
        store_data: Which kinds of data to keep (all by default).
        update_interval: Seconds between python-telegram-bot's periodic
            writes. :class:`ChatstateApplication` also writes after each update.
        close_service: Close ``service`` when the application shuts down.
    """

    # As python-telegram-bot's own persistences (its test suite checks the slots).
    __slots__ = ("_close_service", "_states", "_synced", "prefix", "service")

    def __init__(
        self,
        service: AsyncStateService,
        *,
        prefix: str = "ptb",
        store_data: PersistenceInput | None = None,
        update_interval: float = 60,
        close_service: bool = False,
    ) -> None:
        super().__init__(store_data=store_data, update_interval=update_interval)
        self.service = service
        self.prefix = prefix
        self._close_service = close_service
        # What each document held when this process last read or wrote it.
        self._synced: dict[str, JSONObject] = {}
        # Conversation name -> the JSON text of each known state -> that state.
        self._states: dict[str, dict[str, object]] = {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "ptb",
        ttl: float | timedelta | None = None,
        cluster: bool = False,
        **kwargs: Any,
    ) -> Self:
        """A persistence over a new Redis or Valkey service it owns.

        Args:
            url: The server (``redis://``, ``rediss://`` or ``unix://``).
            namespace: The prefix of every Redis key it writes.
            ttl: Forget a document this long after its last write.
            cluster: The URL names a Redis Cluster node.
            **kwargs: Passed to the class (``prefix``, ``store_data``, ...).
        """
        backend = AsyncRedisBackend.from_url(url, namespace=namespace, cluster=cluster)
        return cls(AsyncStateService(backend, ttl=ttl), close_service=True, **kwargs)

    def __repr__(self) -> str:
        return f"<ChatstatePersistence prefix={self.prefix!r} service={self.service!r}>"

    # -- document ids --------------------------------------------------------------

    def user_doc(self, user_id: int) -> str:
        """The id of the document holding one user's data."""
        return f"{self.prefix}:user:{user_id}"

    def chat_doc(self, chat_id: int) -> str:
        """The id of the document holding one chat's data."""
        return f"{self.prefix}:chat:{chat_id}"

    @property
    def bot_doc(self) -> str:
        """The id of the document holding the bot data."""
        return f"{self.prefix}:bot"

    @property
    def callback_doc(self) -> str:
        """The id of the document holding the callback data cache."""
        return f"{self.prefix}:callback_data"

    def conversation_doc(self, name: str) -> str:
        """The id of the document holding one conversation handler's states."""
        return f"{self.prefix}:conversation:{quote(name, safe='')}"

    def dedupe_doc(self, bot_id: int, key: str) -> str:
        """The id of the record whose claim handles one update once (see :func:`dedupe_key`)."""
        return f"{self.prefix}:dedupe:{bot_id}:{key}"

    def register_states(self, name: str, states: Iterable[object]) -> None:
        """Tell the persistence the states of the conversation handler ``name``.

        A stored state that is one of them as JSON (an enum member's value)
        is read back as that very object, so a handler whose states are plain
        ``Enum`` members finds them again. :class:`ChatstateApplication` calls
        it for each named persistent conversation handler before loading them.
        """
        known = self._states.setdefault(name, {})
        for state in states:
            text = _state_text(state)
            if text is not None:
                known.setdefault(text, state)

    # -- loading ---------------------------------------------------------------------

    async def get_user_data(self) -> dict[int, Data]:
        """Return every stored user's data by user id (python-telegram-bot's start-up load).

        Over a backend that cannot list its documents (Redis with a
        ``key_secret``, a backend without ``users()``) it returns ``{}`` and
        each user's data is loaded by :meth:`refresh_user_data` when their
        first update arrives.
        """
        return await self._load_all(f"{self.prefix}:user:")

    async def get_chat_data(self) -> dict[int, Data]:
        """Return every stored chat's data by chat id (as :meth:`get_user_data`)."""
        return await self._load_all(f"{self.prefix}:chat:")

    async def _load_all(self, prefix: str) -> dict[int, Data]:
        ids: dict[int, str] = {}
        try:
            async for doc_id in self.service.users(prefix=prefix):
                with contextlib.suppress(ValueError):  # not one of ours: "<prefix>:user:x"
                    ids.setdefault(int(doc_id.removeprefix(prefix)), doc_id)
        except ConfigurationError as exc:
            log.info("%s: loading each user and chat with their first update instead", exc)
            return {}
        out: dict[int, Data] = {}
        items = list(ids.items())
        for start in range(0, len(items), _LOAD_BATCH):  # concurrent reads: pipelined on Redis
            batch = items[start : start + _LOAD_BATCH]
            docs = await asyncio.gather(*(self._load(doc_id) for _, doc_id in batch))
            out.update((key, doc) for (key, _), doc in zip(batch, docs, strict=True) if doc)
        return out

    async def get_bot_data(self) -> Data:
        """Return the stored bot data (``{}`` when there is none)."""
        return await self._load(self.bot_doc)

    async def get_callback_data(self) -> CDCData | None:
        """Return the stored callback data cache, or ``None``."""
        doc = await self._load(self.callback_doc)
        if not doc:
            return None
        buttons = [(str(b[0]), float(b[1]), dict(b[2])) for b in doc.get("buttons", [])]
        return buttons, dict(doc.get("queries", {}))

    async def get_conversations(self, name: str) -> ConversationDict:
        """Return the stored states of the conversation handler ``name``."""
        doc = await self._load(self.conversation_doc(name))
        known = self._states.get(name, {})
        return {
            _decode_key(key): known.get(_state_text(state) or "", state)
            for key, state in doc.items()
        }

    async def _load(self, doc_id: str) -> JSONObject:
        data = await self.service.get(doc_id)
        self._synced[doc_id] = _copy(data)
        return data

    # -- writing ---------------------------------------------------------------------

    async def update_user_data(self, user_id: int, data: Data) -> None:
        """Write what changed in one user's data since this process last synced it."""
        await self._write(self.user_doc(user_id), data)

    async def update_chat_data(self, chat_id: int, data: Data) -> None:
        """Write what changed in one chat's data since this process last synced it."""
        await self._write(self.chat_doc(chat_id), data)

    async def update_bot_data(self, data: Data) -> None:
        """Write what changed in the bot data since this process last synced it."""
        await self._write(self.bot_doc, data)

    async def update_callback_data(self, data: CDCData) -> None:
        """Store the callback data cache (only when it changed)."""
        buttons, queries = data
        doc = _plain({"buttons": [[u, t, d] for u, t, d in buttons], "queries": dict(queries)})
        if _same(doc, self._synced.get(self.callback_doc)):
            return
        await self.service.assign(self.callback_doc, doc)
        self._synced[self.callback_doc] = _copy(doc)

    async def update_conversation(
        self, name: str, key: ConversationKey, new_state: object | None
    ) -> None:
        """Store one conversation's state (``None`` removes it), leaving the others alone.

        An enum member is stored as its value, a tuple as a list.
        """
        field = _encode_key(key)
        if new_state is None:
            await self.service.update(self.conversation_doc(name), {field: None})
        else:
            await self.service.assign(self.conversation_doc(name), {field: _plain(new_state)})

    async def drop_user_data(self, user_id: int) -> None:
        """Delete one user's data."""
        await self._drop(self.user_doc(user_id))

    async def drop_chat_data(self, chat_id: int) -> None:
        """Delete one chat's data."""
        await self._drop(self.chat_doc(chat_id))

    async def _drop(self, doc_id: str) -> None:
        await self.service.delete(doc_id)
        self._synced[doc_id] = {}

    async def _write(self, doc_id: str, data: Mapping[Any, Any]) -> None:
        data = _plain(dict(data))  # compared and stored as it will be read back
        base = self._synced.get(doc_id, {})
        changes = changes_between(base, data)
        if not changes:
            return
        sets = {path: value for path, value in changes if value is not DELETE}
        if len(sets) == len(changes):
            await self.service.assign(doc_id, sets)
        elif not sets:
            await self.service.update(doc_id, _deletion_patch(changes))
        else:
            # Removals and exact values (JSON null among them) in one atomic step.
            await self.service.transaction(doc_id, lambda doc: apply_changes(doc, changes))
        self._synced[doc_id] = _copy(data)

    # -- refreshing ------------------------------------------------------------------

    async def refresh_user_data(self, user_id: int, user_data: Data) -> None:
        """Reload one user's data in place, keeping this process's unwritten changes."""
        await self._refresh(self.user_doc(user_id), user_data)

    async def refresh_chat_data(self, chat_id: int, chat_data: Data) -> None:
        """Reload one chat's data in place, keeping this process's unwritten changes."""
        await self._refresh(self.chat_doc(chat_id), chat_data)

    async def refresh_bot_data(self, bot_data: Data) -> None:
        """Reload the bot data in place, keeping this process's unwritten changes."""
        await self._refresh(self.bot_doc, bot_data)

    async def _refresh(self, doc_id: str, target: MutableMapping[Any, Any]) -> None:
        # Compared as stored, so a tuple this process wrote is not a change of its own.
        pending = changes_between(self._synced.get(doc_id, {}), _plain(dict(target)))
        stored = await self.service.get(doc_id)
        self._synced[doc_id] = _copy(stored)
        fresh = apply_changes(stored, pending)
        target.clear()
        target.update(fresh)

    async def refresh_conversations(
        self, conversations: Mapping[str, MutableMapping[ConversationKey, object]]
    ) -> None:
        """Reload the states of the named conversation handlers in place.

        States this process changed but has not written yet, and those of
        handlers still running, stay as they are. :class:`ChatstateApplication`
        calls it before each update.

        Args:
            conversations: Conversation handler name to its states.
        """
        for name, states in conversations.items():
            stored = await self.get_conversations(name)
            _sync_states(states, stored)

    async def flush(self) -> None:
        """Close the service if this persistence owns it (every write is already stored)."""
        if self._close_service:
            await self.service.aclose()


def _sync_states(
    states: MutableMapping[ConversationKey, object], stored: Mapping[ConversationKey, object]
) -> None:
    tracking = states if isinstance(states, TrackingDict) else None
    pending: set[ConversationKey] = set()
    if tracking is not None:
        pending = tracking.pop_accessed_keys()
        for key in pending:
            tracking.mark_as_accessed(key)
    for key in list(states):
        if key not in stored and key not in pending and not isinstance(states[key], PendingState):
            if tracking is not None:
                tracking.data.pop(key, None)  # not a change of ours: nothing to write back
            else:
                del states[key]
    fresh = {
        key: state
        for key, state in stored.items()
        if key not in pending and not isinstance(states.get(key), PendingState)
    }
    if tracking is not None:
        tracking.update_no_track(fresh)
    else:
        states.update(fresh)


@dataclass
class _Processing:
    """The update a task is processing, and whether it failed (see ``process_error``)."""

    update: object
    writing: bool = False
    failed: bool = False


_processing: contextvars.ContextVar[_Processing | None] = contextvars.ContextVar(
    "chatstate_telegram_processing", default=None
)


class ChatstateApplication(Application[Any, Any, Any, Any, Any, Any]):
    """An ``Application`` that lets several processes serve one bot as one.

    With a :class:`ChatstatePersistence`, each update is handled so:

    1. **Once.** The update takes a chatstate claim on a record of its own
       (:meth:`ChatstatePersistence.dedupe_doc`, keyed by :func:`dedupe_key`).
       A copy that arrives after it was handled, in this process or another,
       runs no handler and sends nothing; a copy that arrives while it is being
       handled waits for it (up to ``dedupe_wait``), then does nothing. When a
       handler raises (or the update's data cannot be written), the claim is
       released, so a redelivery is handled again.
    2. **One at a time per user.** The handlers run holding the backend's lock
       of the user's document (the chat's when the update has no user), so
       one user's updates never overlap, across processes; each finds the
       conversation and data the previous one wrote.
    3. **Fresh, then written.** Before the handlers, the persistent
       conversation states are reloaded from the store (python-telegram-bot
       reads them only at start-up); after them, what the update changed is
       written at once instead of on the next periodic run.

    The claim and the lock are renewed every third of ``lease`` while the
    update runs, so a slow handler keeps them and a process killed mid-update
    frees its update and its user within one lease (5 s by default): a copy of
    the update waiting in another process is then handled there.

    An error of the store (a copy that waited longer than ``dedupe_wait``, a
    user busy for longer than ``isolation_wait``, an unreachable server) goes
    to the error handlers, as a handler's would, and the update is not handled
    here. Handlers with ``block=False`` run after the claim and the lock are
    let go.

    Build it with ``ApplicationBuilder().application_class(ChatstateApplication)``,
    options as ``application_class(ChatstateApplication, kwargs={...})``. With
    any other persistence it is a plain ``Application``.

    Args:
        dedupe_by: ``"update_id"``, ``"message_id"`` (see :func:`dedupe_key`),
            or ``None`` to handle every copy of an update.
        isolate: Run one user's updates one at a time (``False``: as they come).
        lease: How long an update's claim and a user's lock outlive a
            process that died.
        dedupe_wait: How long a copy of an update waits for the copy being
            handled before :class:`~chatstate.UserBusyError`.
        isolation_wait: How long an update waits for the user's previous one
            before :class:`~chatstate.LockTimeoutError`.
        **kwargs: Passed to ``Application`` (the builder passes them).

    Raises:
        ConfigurationError: an option is out of range.
        UsageError: ``isolate`` over a backend that has no ``lock()``.
    """

    def __init__(
        self,
        *,
        dedupe_by: Literal["update_id", "message_id"] | None = "update_id",
        isolate: bool = True,
        lease: float | timedelta = DEFAULT_LEASE,
        dedupe_wait: float | timedelta = 10.0,
        isolation_wait: float | timedelta = 60.0,
        **kwargs: Any,
    ) -> None:
        if dedupe_by not in {"update_id", "message_id", None}:
            raise ConfigurationError(
                f"dedupe_by must be 'update_id', 'message_id' or None, not {dedupe_by!r}"
            )
        persistence = kwargs.get("persistence")
        if isolate and isinstance(persistence, ChatstatePersistence):
            backend = persistence.service.manager.backend
            if not callable(getattr(backend, "lock", None)):
                raise UsageError(
                    f"{type(backend).__name__} has no lock(): it cannot isolate updates "
                    "(pass isolate=False)"
                )
        seconds = _seconds(lease), _seconds(dedupe_wait), _seconds(isolation_wait)
        super().__init__(**kwargs)
        self.dedupe_by = dedupe_by
        self.isolate = isolate
        self.lease, self.dedupe_wait, self.isolation_wait = seconds

    async def initialize(self) -> None:
        """Tell the persistence each conversation handler's states, then initialize."""
        persistence = self.persistence
        if isinstance(persistence, ChatstatePersistence):
            for handler in itertools.chain.from_iterable(self.handlers.values()):
                _register_states(persistence, handler)
        await super().initialize()

    async def process_update(self, update: object) -> None:
        """Process ``update`` once across processes, one update of its user at a time."""
        persistence = self.persistence
        if not isinstance(persistence, ChatstatePersistence):
            await super().process_update(update)
            return
        self._check_initialized()
        processing = _Processing(update)
        token = _processing.set(processing)
        try:
            await self._process_once(persistence, update, processing)
        except ChatstateError as exc:
            error = exc
        else:
            return
        finally:
            _processing.reset(token)
        # As a handler's error: to the error handlers (raised, it would end
        # python-telegram-bot's update loop); the update was not handled here.
        await self.process_error(update=update, error=error)

    async def _process_once(
        self, persistence: ChatstatePersistence, update: object, processing: _Processing
    ) -> None:
        if self.dedupe_by is None or not isinstance(update, Update):
            async with self._isolated(persistence, update):
                await self._process_and_write(persistence, update, processing)
            return
        key = dedupe_key(update, self.dedupe_by)
        claim = await persistence.service.claim(
            persistence.dedupe_doc(self.bot.id, key),
            key,
            purpose=DEDUPE_PURPOSE,
            lease=self.lease,
            wait=self.dedupe_wait,
        )
        async with claim:  # leaving it commits; an exception releases
            if claim.duplicate:
                log.info("update %s was handled already; skipping it", key)
                return
            async with self._isolated(persistence, update):
                await self._process_and_write(persistence, update, processing)
            if processing.failed:
                await claim.release()  # a redelivery is handled again

    async def _process_and_write(
        self, persistence: ChatstatePersistence, update: object, processing: _Processing
    ) -> None:
        # python-telegram-bot keeps these only privately; they are the very dicts
        # its ConversationHandlers read (name -> states).
        await persistence.refresh_conversations(self._conversation_handler_conversations)
        await super().process_update(update)
        processing.writing = True
        await self.update_persistence()

    @contextlib.asynccontextmanager
    async def _isolated(
        self, persistence: ChatstatePersistence, update: object
    ) -> AsyncIterator[None]:
        doc = _isolation_doc(persistence, update) if self.isolate else None
        if doc is None:
            yield
            return
        manager = persistence.service.manager
        backend: Any = manager.backend
        lock = backend.lock(
            manager.user_id(doc), LOCK_NAME, lease=self.lease, wait=self.isolation_wait
        )
        async with lock:
            yield

    async def process_error(
        self,
        update: object | None,
        error: Exception,
        job: Any = None,
        coroutine: Any = None,
    ) -> bool:
        """Note a failure of the update being processed, then run the error handlers."""
        processing = _processing.get()
        if processing is not None and (
            update is processing.update or (update is None and processing.writing)
        ):
            processing.failed = True
        return await super().process_error(update, error, job, coroutine)


def _isolation_doc(persistence: ChatstatePersistence, update: object) -> str | None:
    """The document whose lock orders ``update``: its user's, else its chat's, else none."""
    if not isinstance(update, Update):
        return None
    if update.effective_user is not None:
        return persistence.user_doc(update.effective_user.id)
    if update.effective_chat is not None:
        return persistence.chat_doc(update.effective_chat.id)
    return None


def _register_states(
    persistence: ChatstatePersistence, handler: BaseHandler[Any, Any, Any]
) -> None:
    if not isinstance(handler, ConversationHandler):
        return
    if handler.persistent and handler.name:
        persistence.register_states(handler.name, handler.states)
    for child in itertools.chain(handler.entry_points, handler.fallbacks, *handler.states.values()):
        _register_states(persistence, child)


def dedupe_key(update: Update, by: Literal["update_id", "message_id"] = "update_id") -> str:
    """What identifies ``update`` for :class:`ChatstateApplication`'s dedupe.

    The same keys as :func:`chatstate.integrations.aiogram.dedupe_key`:
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
        for kind in _MESSAGE_KINDS:
            event = getattr(update, kind, None)
            if isinstance(event, Message):
                key = f"{kind}:{event.chat.id}:{event.message_id}"
                if event.business_connection_id is not None:
                    key += ":b" + quote(event.business_connection_id, safe="")
                if event.edit_date is not None:
                    key += f":e{int(event.edit_date.timestamp())}"
                return key
        if isinstance(update.callback_query, CallbackQuery):
            return f"callback_query:{update.callback_query.id}"
        if isinstance(update.inline_query, InlineQuery):
            return f"inline_query:{update.inline_query.id}"
    return f"update:{update.update_id}"


def _seconds(value: float | timedelta) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ConfigurationError(f"a duration must be positive, got {value!r}")
    return seconds


def changes_between(old: Mapping[Any, Any], new: Mapping[Any, Any]) -> list[Change]:
    """The paths whose value differs from ``old`` to ``new`` (``DELETE``: removed).

    Objects present on both sides are compared key by key, so a change deep
    inside one touches only that path; anything else is compared whole.

    Examples:
        >>> changes_between({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"x": 1, "y": 3}})
        [(('b',), DELETE), (('a', 'y'), 3)]
    """
    return _changes(old, new, ())


def _changes(old: Mapping[Any, Any], new: Mapping[Any, Any], path: Path) -> list[Change]:
    out: list[Change] = [((*path, key), DELETE) for key in old if key not in new]
    for key, value in new.items():
        if key in old:
            before = old[key]
            if isinstance(before, Mapping) and isinstance(value, Mapping):
                out += _changes(before, value, (*path, key))
                continue
            if _same(before, value):
                continue
        out.append(((*path, key), value))
    return out


def apply_changes(doc: JSONObject, changes: list[Change]) -> JSONObject:
    """Apply a change list to ``doc`` in place (missing parents are made) and return it."""
    for path, value in changes:
        node: Any = doc
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                if value is DELETE:
                    break
                child = node[key] = {}
            node = child
        else:
            if value is DELETE:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = _copy(value)
    return doc


def _deletion_patch(changes: list[Change]) -> JSONObject:
    patch: JSONObject = {}
    for path, _ in changes:
        node = patch
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = None
    return patch


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: 1, 1.0 and True differ; so do a list and a tuple."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _state_text(state: object) -> str | None:
    """A conversation state as the JSON text it is stored as (``None``: not JSON)."""
    try:
        return json.dumps(_plain(state), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _encode_key(key: ConversationKey) -> str:
    return json.dumps(list(key), separators=(",", ":"))


def _decode_key(text: str) -> ConversationKey:
    return tuple(json.loads(text))
