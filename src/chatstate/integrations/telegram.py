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
Each conversation's state (one key of a persistent conversation handler) is a
document of its own.

:class:`ChatstateApplication` handles each update once across the processes
of a bot (a copy delivered to two of them, or delivered again, runs nothing)
and one user's updates one at a time, with one claim on the user's document,
as the aiogram integration: held with a 5 s lease renewed while the update
runs, so a process killed mid-update holds nothing for longer than that, and
committed with the user's data, so an update's changes are stored with it or
not at all.

Needs ``pip install 'chatstate[telegram]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import json
import logging
from collections import Counter
from collections.abc import (
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal, Self, TypeAlias
from urllib.parse import quote, unquote

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

from chatstate._locks import AsyncKeyedLocks
from chatstate._plain import plain as _plain
from chatstate.exceptions import (
    ChatstateError,
    ConfigurationError,
)
from chatstate.integrations._turns import claim_in_turn
from chatstate.state import AsyncClaim, AsyncRedisBackend, AsyncStateService
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
    data cache, and ``<prefix>:conversation:<name>:<key>`` one conversation's
    state (``{"state": 1}``; the key is its JSON text, ``[chat_id,user_id]``,
    URL-quoted). :class:`ChatstateApplication` adds to it the update that
    wrote it and the state before (``"update"``, ``"before"``), so that a
    redelivery of an update whose process died half way through its writes
    runs from where it started. Releases before this one kept all of a
    handler's states in one document, ``<prefix>:conversation:<name>``: it
    is still read, and each state moves to its own document when next
    written. Over a service that cannot list its documents (Redis with a
    ``key_secret``) that document also keeps every state, so that start-up
    finds them.

    What differs from ``PicklePersistence``:

    - Values are stored as JSON with str keys. An enum member is stored as
      its value and a tuple as a list, and they are read back so (an
      ``IntEnum`` or ``StrEnum`` member equals its value, a plain ``Enum``
      member does not); a conversation state comes back as the handler's own
      state object when :meth:`register_states` was told the handler's states
      (:class:`ChatstateApplication` tells it). A write of anything else (a
      set, a datetime, an int key) raises :class:`~chatstate.exceptions.SerializationError`
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
    __slots__ = (
        "_close_service",
        "_conversations",
        "_legacy",
        "_lists",
        "_states",
        "_synced",
        "prefix",
        "service",
    )

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
        # Conversation name -> each key's state as this process last read or wrote it
        # (JSON, None: no conversation).
        self._conversations: dict[str, dict[str, Any]] = {}
        # Conversation name -> the states still in the old one-document layout.
        self._legacy: dict[str, dict[str, Any]] = {}
        # False once the service could not list documents: the old layout's document
        # then stays the index of the states, so that start-up finds them.
        self._lists = True

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
        """The id of the document that held all of one handler's states before this release.

        Read at start-up; each state moves to :meth:`conversation_key_doc` when
        it is next written. The ids of the new documents start with this id
        and a colon.
        """
        return f"{self.prefix}:conversation:{quote(name, safe='')}"

    def conversation_key_doc(self, name: str, key: ConversationKey) -> str:
        """The id of the document holding one conversation's state."""
        return _key_doc(self.prefix, name, _encode_key(key))

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
        """Return the stored states of the conversation handler ``name``.

        Over a backend that cannot list its documents (Redis with a
        ``key_secret``) only the states of the old one-document layout are
        found; :class:`ChatstateApplication` reads each conversation's own
        document before its updates, so it still finds them all.
        """
        legacy_id = self.conversation_doc(name)
        legacy = await self.service.get(legacy_id)
        self._legacy[name] = dict(legacy)
        values: dict[str, Any] = dict(legacy)
        prefix = legacy_id + ":"
        try:
            doc_ids = [doc_id async for doc_id in self.service.users(prefix=prefix)]
        except ConfigurationError as exc:
            log.info("%s: conversation states are listed in %s too", exc, legacy_id)
            self._lists = False
            doc_ids = []
        for start in range(0, len(doc_ids), _LOAD_BATCH):
            batch = doc_ids[start : start + _LOAD_BATCH]
            docs = await asyncio.gather(*(self.service.get(doc_id) for doc_id in batch))
            for doc_id, doc in zip(batch, docs, strict=True):
                if doc:  # the document of a key wins over the old layout's field
                    values[unquote(doc_id.removeprefix(prefix))] = doc.get("state")
        self._conversations[name] = values
        return {
            _decode_key(field): self._state(name, value)
            for field, value in values.items()
            if value is not None
        }

    def _state(self, name: str, value: Any) -> object:
        """A stored state as the handler's own state object, when it was registered."""
        return self._states.get(name, {}).get(_state_text(value) or "", value)

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
        await self._write_conversation(name, key, new_state)

    async def _write_conversation(
        self,
        name: str,
        key: ConversationKey,
        new_state: object | None,
        *,
        update: str | None = None,
        before: Any = None,
    ) -> None:
        """Store a state; with ``update``, mark it as that update's (``before``: what it found)."""
        field = _encode_key(key)
        value = None if new_state is None else _plain(new_state)
        known = self._conversations.get(name, {})
        if field in known and _same(value, known[field]):
            return  # as stored when this process last looked: nothing to write
        doc_id = self.conversation_key_doc(name, key)
        writes: list[Coroutine[Any, Any, object]] = []
        if update is None and value is None:
            writes.append(self.service.delete(doc_id))
        else:
            writes.append(
                self.service.update(doc_id, {"state": value, "update": update, "before": before})
            )
        legacy = self._legacy.setdefault(name, {})
        if not self._lists:  # the index start-up reads, as the states' own documents cannot be
            if value is None:
                writes.append(self.service.update(self.conversation_doc(name), {field: None}))
            else:
                writes.append(self.service.assign(self.conversation_doc(name), {field: value}))
        elif field in legacy:  # moved to its own document
            writes.append(self.service.update(self.conversation_doc(name), {field: None}))
        await asyncio.gather(*writes)
        if self._lists or value is None:
            legacy.pop(field, None)
        else:
            legacy[field] = value
        self._conversations.setdefault(name, {})[field] = value

    async def drop_user_data(self, user_id: int) -> None:
        """Delete one user's data."""
        await self._drop(self.user_doc(user_id))

    async def drop_chat_data(self, chat_id: int) -> None:
        """Delete one chat's data."""
        await self._drop(self.chat_doc(chat_id))

    async def erase_user(self, user_id: int) -> list[str]:
        """Erase everything this persistence stores of one user (a data-protection erase).

        Erased with :meth:`AsyncStateService.erase <chatstate.AsyncStateService.erase>`
        (documents, operation ids, claims, deadlines): the user's document, the
        data of their private chat (its id is the user's), and the state of
        every conversation whose key holds the user's id (their private chat,
        or them in a group); in a handler's old one-document layout their
        fields are removed. Group chats' data and the bot data are left as
        they are: what they hold of the user is yours to find.

        python-telegram-bot keeps its own copies in memory: call
        ``application.drop_user_data(user_id)`` and
        ``application.drop_chat_data(user_id)`` too. A running
        ``ConversationHandler`` keeps the user's state in memory until the
        process restarts, and writes it again if the user writes again.

        Args:
            user_id: The Telegram user id.

        Returns:
            The ids of the documents that held something and were erased.

        Raises:
            ConfigurationError: the service cannot list its documents (Redis
                with a ``key_secret``), so not every conversation state can be
                found; nothing was erased.
        """
        erase, legacy = await self._documents_of(user_id)
        conversations = f"{self.prefix}:conversation:"
        for legacy_id in legacy:
            fields = [f for f in await self.service.get(legacy_id) if _holds(f, user_id)]
            if fields:
                await self.service.update(legacy_id, dict.fromkeys(fields))
                name = unquote(legacy_id.removeprefix(conversations))
                for field in fields:
                    self._legacy.get(name, {}).pop(field, None)
                    self._conversations.get(name, {}).pop(field, None)
        erased = []
        for doc_id in erase:
            if await self.service.erase(doc_id):
                erased.append(doc_id)
            self._synced.pop(doc_id, None)
            name, _, field = doc_id.removeprefix(conversations).partition(":")
            self._conversations.get(unquote(name), {}).pop(unquote(field), None)
        return sorted(erased)

    async def _documents_of(self, user_id: int) -> tuple[list[str], list[str]]:
        """The documents to erase for a user, and the old-layout conversation documents."""
        try:
            doc_ids = [doc_id async for doc_id in self.service.users(prefix=f"{self.prefix}:")]
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"erase_user({user_id}) needs a service that lists its documents, to find "
                f"every conversation state of the user: {exc}; nothing was erased"
            ) from exc
        own = {self.user_doc(user_id), self.chat_doc(user_id)}
        conversations = f"{self.prefix}:conversation:"
        erase: list[str] = []
        legacy: list[str] = []
        for doc_id in doc_ids:
            if doc_id in own:
                erase.append(doc_id)
            elif doc_id.startswith(conversations):
                _, colon, field = doc_id.removeprefix(conversations).partition(":")
                if not colon:
                    legacy.append(doc_id)
                elif _holds(unquote(field), user_id):
                    erase.append(doc_id)
        return erase, legacy

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
        read = _read_ahead.get()
        stored = read.pop(doc_id) if read and doc_id in read else await self.service.get(doc_id)
        self._synced[doc_id] = _copy(stored)
        fresh = apply_changes(stored, pending)
        target.clear()
        target.update(fresh)

    async def read_ahead(self, doc_ids: Iterable[str]) -> dict[str, JSONObject]:
        """Read several documents at once (one round trip on Redis: they are pipelined).

        :class:`ChatstateApplication` reads an update's user, chat and bot
        documents so before its handlers run; ``refresh_*_data`` then use them
        instead of reading each on its own.
        """
        ids = list(dict.fromkeys(doc_ids))
        docs = await asyncio.gather(*(self.service.get(doc_id) for doc_id in ids))
        return dict(zip(ids, docs, strict=True))

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

    async def refresh_conversation_keys(
        self,
        conversations: Mapping[str, MutableMapping[ConversationKey, object]],
        keys: Mapping[str, ConversationKey],
        *,
        update: str | None = None,
    ) -> dict[str, Any]:
        """Reload one key's state in each named conversation (an update's own), in one round trip.

        As :meth:`refresh_conversations`, for the keys an update will read:
        what :class:`ChatstateApplication` does before each update, so that the
        cost does not grow with the number of live conversations.

        Args:
            conversations: Conversation handler name to its states.
            keys: Conversation handler name to the key to reload.
            update: The update about to run (its dedupe key): a state that
                update wrote before its process died is read as the state it
                found, so that it runs again from there.

        Returns:
            Each name's state as stored (JSON, ``None``: no conversation).
        """
        doc_ids = {name: self.conversation_key_doc(name, keys[name]) for name in keys}
        read = await self.read_ahead(doc_ids.values())
        return self._found_conversations(conversations, keys, doc_ids, read, update)

    def _found_conversations(
        self,
        conversations: Mapping[str, MutableMapping[ConversationKey, object]],
        keys: Mapping[str, ConversationKey],
        doc_ids: Mapping[str, str],
        read: Mapping[str, JSONObject],
        update: str | None,
    ) -> dict[str, Any]:
        """Sync each key from its document as read (see :meth:`refresh_conversation_keys`)."""
        found: dict[str, Any] = {}
        for name, doc_id in doc_ids.items():
            if name not in conversations:
                continue
            doc = read[doc_id]
            key = keys[name]
            field = _encode_key(key)
            if not doc:
                value = self._legacy.get(name, {}).get(field)
            elif update is not None and doc.get("update") == update:
                value = doc.get("before")  # that update's own write, from a run that died
            else:
                value = doc.get("state")
            self._conversations.setdefault(name, {})[field] = value
            found[name] = value
            _sync_key(conversations[name], key, None if value is None else self._state(name, value))
        return found

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


# Documents read ahead for the update this task processes (see ChatstatePersistence.read_ahead).
_read_ahead: contextvars.ContextVar[dict[str, JSONObject] | None] = contextvars.ContextVar(
    "chatstate_telegram_read_ahead", default=None
)


def _sync_key(
    states: MutableMapping[ConversationKey, object], key: ConversationKey, stored: object | None
) -> None:
    """Set one key of ``states`` to its stored state (``None``: none), unless ours is pending."""
    if isinstance(states.get(key), PendingState):
        return
    if isinstance(states, TrackingDict):
        accessed = states.pop_accessed_keys()
        for other in accessed:
            states.mark_as_accessed(other)
        if key in accessed:
            return  # a change of ours not written yet
        if stored is None:
            states.data.pop(key, None)  # not a change of ours: nothing to write back
        else:
            states.update_no_track({key: stored})
    elif stored is None:
        states.pop(key, None)
    else:
        states[key] = stored


def _restore_key(
    states: MutableMapping[ConversationKey, object], key: ConversationKey, state: object | None
) -> None:
    """Set one key of ``states`` back to ``state`` (``None``: none), as not changed here."""
    if isinstance(states, TrackingDict):
        for other in states.pop_accessed_keys() - {key}:  # forget the change, keep the rest
            states.mark_as_accessed(other)
    _sync_key(states, key, state)


@dataclass
class _Processing:
    """The update a task is processing, and whether it failed (see ``process_error``)."""

    update: object
    writing: bool = False
    failed: bool = False
    # The claimed document (the user's, else the chat's) and its claim, and what is staged.
    claimed: tuple[str, AsyncClaim] | None = None
    key: str | None = None  # its dedupe key, when it has a claim on its user's document
    staged: dict[str, JSONObject] = field(default_factory=dict)
    # Each persistent conversation's key for the update, and its state (JSON) as found.
    keys: dict[str, ConversationKey] = field(default_factory=dict)
    before: dict[str, Any] = field(default_factory=dict)


_processing: contextvars.ContextVar[_Processing | None] = contextvars.ContextVar(
    "chatstate_telegram_processing", default=None
)


class ChatstateApplication(Application[Any, Any, Any, Any, Any, Any]):
    """An ``Application`` that lets several processes serve one bot as one.

    With a :class:`ChatstatePersistence`, each update is handled so:

    1. **Once, one at a time per user.** The update takes one chatstate claim
       on its user's document (the chat's when it has no user) with its
       :func:`dedupe_key` as the op id: the claim reads the document, holds
       the user so that one user's updates never overlap across processes,
       and remembers the key when it commits. A copy that arrives after the
       update was handled, in this process or another, runs no handler and
       sends nothing; a copy that arrives while it is being handled waits for
       it, then does nothing. A user's updates that one process received run
       in the order they came (first in, first out). When a handler raises
       (or the update's data cannot be written), the claim is released, so a
       redelivery is handled again, and the user's and chat's data and the
       update's conversation states are put back, in memory, as they were
       stored (the bot data, shared by every update, keeps its change). When
       the commit fails after the conversation states, chat and bot data were
       written, those stay written (the states marked as the update's, so its
       redelivery runs from the states before). An update with neither user
       nor chat takes its claim on a record of its own
       (:meth:`ChatstatePersistence.dedupe_doc`).
    2. **Fresh.** Before the handlers, the update's chat and bot data and
       its persistent conversation states are read, in one round trip
       (python-telegram-bot reads conversations only at start-up).
    3. **Written before the next.** After the handlers, the conversation
       states, chat and bot data the update changed are written in one round
       trip; then the user's data is written with the claim's commit, in the
       same atomic write that remembers the update and lets the user go. No
       write waits for another update's (python-telegram-bot's own
       ``update_persistence`` takes one lock for the whole application).

    The claim is renewed every third of ``lease`` while the update runs, so
    a slow handler keeps it and a process killed mid-update frees its update
    and its user within one lease (5 s by default): a copy of the update
    waiting in another process is then handled there. Nothing a killed
    handler changed is stored (writes start when the handlers are done).

    An error of the store (a user busy for longer than ``isolation_wait``,
    an unreachable server) goes to the error handlers, as a handler's would,
    and the update is not handled here. Handlers with ``block=False`` run
    after the claim is let go; drops and chat migrations are written by
    python-telegram-bot's own ``update_persistence``.

    Build it with ``ApplicationBuilder().application_class(ChatstateApplication)``,
    options as ``application_class(ChatstateApplication, kwargs={...})``. With
    any other persistence it is a plain ``Application``.

    Args:
        dedupe_by: ``"update_id"``, ``"message_id"`` (see :func:`dedupe_key`),
            or ``None`` to handle every copy of an update.
        isolate: Run one user's updates one at a time (``False``: as they come).
        lease: How long an update's claim outlives a process that died.
        dedupe_wait: With ``isolate=False``, how long a copy of an update waits
            for the copy being handled before :class:`~chatstate.exceptions.UserBusyError`.
        isolation_wait: How long an update (or a copy of it) waits for the
            user's previous one before :class:`~chatstate.exceptions.LockTimeoutError`.
        **kwargs: Passed to ``Application`` (the builder passes them).

    Raises:
        ConfigurationError: an option is out of range.
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
        seconds = _seconds(lease), _seconds(dedupe_wait), _seconds(isolation_wait)
        super().__init__(**kwargs)
        self.dedupe_by = dedupe_by
        self.isolate = isolate
        self.lease, self.dedupe_wait, self.isolation_wait = seconds
        self._persistent: list[tuple[str, ConversationHandler[Any]]] = []
        # The users and chats of the updates being processed (each one's data is theirs to write).
        self._busy_users: Counter[int | None] = Counter()
        self._busy_chats: Counter[int | None] = Counter()
        self._turns = AsyncKeyedLocks()  # this process's updates of a user, in order

    async def initialize(self) -> None:
        """Tell the persistence each conversation handler's states, then initialize."""
        persistence = self.persistence
        if isinstance(persistence, ChatstatePersistence):
            self._persistent = []
            for handler in itertools.chain.from_iterable(self.handlers.values()):
                _register_states(persistence, handler, self._persistent)
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
        key = None
        if self.dedupe_by is not None and isinstance(update, Update):
            key = dedupe_key(update, self.dedupe_by)
        doc = _isolation_doc(persistence, update) if self.isolate else None
        if doc is None and key is None:
            await self._process_and_write(persistence, update, processing)
            return
        service = persistence.service
        if doc is None:
            assert key is not None
            claim = await service.claim(
                persistence.dedupe_doc(self.bot.id, key),
                key,
                purpose=DEDUPE_PURPOSE,
                lease=self.lease,
                wait=self.dedupe_wait,
            )
            await self._process_claimed(persistence, update, processing, claim)
            return
        busy = f"another update of this user ran for longer than {self.isolation_wait:g} s"
        # One claim on the user's document: the update once (its key is remembered in the
        # document's log), the user's updates one at a time (in this process, in the order
        # they came), and the document read.
        async with claim_in_turn(
            self._turns,
            service,
            doc,
            key,
            purpose=DEDUPE_PURPOSE,
            lease=self.lease,
            wait=self.isolation_wait,
            busy=busy,
        ) as claim:
            processing.claimed = (doc, claim)
            processing.key = key
            await self._process_claimed(persistence, update, processing, claim)

    async def _process_claimed(
        self,
        persistence: ChatstatePersistence,
        update: object,
        processing: _Processing,
        claim: AsyncClaim,
    ) -> None:
        async with claim:  # an exception releases it
            if claim.duplicate:
                log.info("update %s was handled already; skipping it", claim.op_id)
                return
            await self._process_and_write(persistence, update, processing)
            if processing.failed:  # its changes are put back already
                await claim.release()  # a redelivery is handled again
                return
            # The claimed document's changes, the update's key and the release: one write.
            try:
                await claim.commit()
            except BaseException:
                self._forget_changes(persistence, update, processing)
                raise
            persistence._synced.update(processing.staged)  # noqa: SLF001 - its own module

    def _forget_changes(
        self, persistence: ChatstatePersistence, update: object, processing: _Processing
    ) -> None:
        """Put back, in memory, what a failed update changed and did not store.

        Left as they were, its changes would count as this process's unwritten
        ones, and a later update (or python-telegram-bot's own run) would store
        them over newer data. The user's and chat's data go back to what was last
        stored (unless another update of theirs is running in this process:
        their changes are mixed in; or the kind is not stored); the update's
        conversation states to the states it found. The bot data, shared by
        every update, keeps the change.
        """
        user, chat = _ids(update)
        synced = persistence._synced  # noqa: SLF001 - its own module
        store = persistence.store_data
        for ident, stored, busy, kept, doc_of in (
            (user, store.user_data, self._busy_users, self.user_data, persistence.user_doc),
            (chat, store.chat_data, self._busy_chats, self.chat_data, persistence.chat_doc),
        ):
            if ident is None or not stored or busy[ident] or doc_of(ident) not in synced:
                continue
            data = kept.get(ident)
            if data is not None:
                data.clear()
                data.update(_copy(synced[doc_of(ident)]))
        conversations = self._conversation_handler_conversations
        for name, key in processing.keys.items():
            states = conversations.get(name)
            if states is not None and name in processing.before:
                before = processing.before[name]
                found = None if before is None else persistence._state(name, before)  # noqa: SLF001 - its own module
                _restore_key(states, key, found)

    async def _process_and_write(
        self, persistence: ChatstatePersistence, update: object, processing: _Processing
    ) -> None:
        user, chat = _ids(update)
        self._busy_users[user] += 1
        self._busy_chats[chat] += 1
        try:
            docs = _data_docs(persistence, user, chat)
            claimed = processing.claimed
            if claimed is not None:  # read with the claim
                docs = [doc for doc in docs if doc != claimed[0]]
            # The update's documents and conversations in one round trip. python-telegram-bot
            # keeps the conversations only privately: the very dicts its handlers read.
            keys = processing.keys = self._keys(update)
            key_docs = {name: persistence.conversation_key_doc(name, keys[name]) for name in keys}
            read = await persistence.read_ahead([*docs, *key_docs.values()])
            processing.before = persistence._found_conversations(  # noqa: SLF001 - its own module
                self._conversation_handler_conversations, keys, key_docs, read, processing.key
            )
            if claimed is not None:
                read[claimed[0]] = claimed[1].data
            token = _read_ahead.set(read)
            try:
                await super().process_update(update)
            finally:
                _read_ahead.reset(token)
            if not processing.failed:  # a handler raised: nothing of the update is stored
                processing.writing = True
                await self._write_update(persistence, user, chat, processing)
        finally:
            _discard(self._busy_users, user)
            _discard(self._busy_chats, chat)
        if processing.failed:  # a handler raised, or a write failed
            self._forget_changes(persistence, update, processing)

    def _keys(self, update: object) -> dict[str, ConversationKey]:
        """Each persistent conversation handler's key for ``update`` (where it has one)."""
        keys: dict[str, ConversationKey] = {}
        if isinstance(update, Update):
            for name, handler in self._persistent:
                with contextlib.suppress(Exception):  # not an update this handler keys
                    keys.setdefault(name, handler._get_key(update))  # noqa: SLF001 - its own key
        return keys

    async def _write_update(
        self,
        persistence: ChatstatePersistence,
        user: int | None,
        chat: int | None,
        processing: _Processing,
    ) -> None:
        """Write what the update changed, in one round trip, without python-telegram-bot's lock.

        ``update_persistence()`` would write every update's data under one lock
        for the whole application (one update's writes at a time). This writes
        the update's user, chat and conversation states, the bot and callback
        data, and what handlers marked for users and chats no update is
        processing; drops and migrations take python-telegram-bot's own run.
        """
        if (
            self._user_ids_to_be_deleted_in_persistence
            or self._chat_ids_to_be_deleted_in_persistence
        ):
            await self.update_persistence()
            return
        store = persistence.store_data
        writes: list[_Write] = []
        if store.callback_data and getattr(self.bot, "callback_data_cache", None) is not None:
            cache = self.bot.callback_data_cache.persistence_data
            writes.append((persistence.update_callback_data(cache), _nothing))
        if store.bot_data:
            writes.append((persistence.update_bot_data(self.bot_data), _nothing))
        if store.user_data:
            writes += _marked_writes(
                self._user_ids_to_be_updated_in_persistence,
                self.user_data,
                _staging(
                    persistence, persistence.user_doc, persistence.update_user_data, processing
                ),
                user,
                self._busy_users,
            )
        if store.chat_data:
            writes += _marked_writes(
                self._chat_ids_to_be_updated_in_persistence,
                self.chat_data,
                _staging(
                    persistence, persistence.chat_doc, persistence.update_chat_data, processing
                ),
                chat,
                self._busy_chats,
            )
        conversations = self._conversation_handler_conversations
        writes += [
            write
            for name in processing.keys
            if (
                write := _conversation_write(persistence, name, conversations.get(name), processing)
            )
            is not None
        ]
        results = await asyncio.gather(*(w for w, _ in writes), return_exceptions=True)
        for (_, undo), result in zip(writes, results, strict=True):
            if isinstance(result, Exception):
                undo()  # python-telegram-bot's next run tries again
                await self.process_error(update=None, error=result)

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
    persistence: ChatstatePersistence,
    handler: BaseHandler[Any, Any, Any],
    found: list[tuple[str, ConversationHandler[Any]]],
) -> None:
    if not isinstance(handler, ConversationHandler):
        return
    if handler.persistent and handler.name:
        persistence.register_states(handler.name, handler.states)
        found.append((handler.name, handler))
    for child in itertools.chain(handler.entry_points, handler.fallbacks, *handler.states.values()):
        _register_states(persistence, child, found)


_Write: TypeAlias = tuple[Coroutine[Any, Any, None], Callable[[], None]]
_DataWrite: TypeAlias = Callable[[int, Data], Coroutine[Any, Any, None]]


def _staging(
    persistence: ChatstatePersistence,
    doc_of: Callable[[int], str],
    write: _DataWrite,
    processing: _Processing,
) -> _DataWrite:
    """``write``, except for the claimed document: its changes are staged on the claim."""
    claimed = processing.claimed
    if claimed is None:
        return write
    doc_id, claim = claimed

    async def stage_or_write(key: int, data: Data) -> None:
        if doc_of(key) != doc_id:
            await write(key, data)
            return
        plain = _plain(dict(data))
        changes = changes_between(persistence._synced.get(doc_id, {}), plain)  # noqa: SLF001
        sets = {path: value for path, value in changes if value is not DELETE}
        if sets:
            claim.assign(sets)
        if len(sets) < len(changes):
            claim.update(_deletion_patch([c for c in changes if c[1] is DELETE]))
        processing.staged[doc_id] = _copy(plain)

    return stage_or_write


"""A write, and how to undo taking its mark when it fails."""


def _marked_writes(
    marked: set[int],
    data: Mapping[int, Data],
    write: _DataWrite,
    own: int | None,
    busy: Counter[int | None],
) -> list[_Write]:
    """Writes of the marked users' (or chats') data: this update's, and no other update's."""
    writes: list[_Write] = []
    for key in [k for k in marked if k == own or not busy[k]]:
        marked.discard(key)
        value = data.get(key)
        if value is not None:
            writes.append((write(key, value), functools.partial(marked.add, key)))
    return writes


def _conversation_write(
    persistence: ChatstatePersistence,
    name: str,
    states: TrackingDict[ConversationKey, object] | None,
    processing: _Processing,
) -> _Write | None:
    """The write of the update's state in one conversation handler, if it changed it.

    Handlers that do not key the update are left to python-telegram-bot's run.
    """
    if states is None:
        return None
    key = processing.keys[name]
    accessed = states.pop_accessed_keys()
    for other in accessed - {key}:  # other updates' states: theirs to write
        states.mark_as_accessed(other)
    if key not in accessed:
        return None
    state = states.get(key)
    if isinstance(state, PendingState):  # a block=False handler: python-telegram-bot's run
        states.mark_as_accessed(key)
        return None
    undo = functools.partial(states.mark_as_accessed, key)
    # Marked as this update's (with the state it found) while the update is not committed.
    write = persistence._write_conversation(  # noqa: SLF001 - its own module
        name, key, state, update=processing.key, before=processing.before.get(name)
    )
    return write, undo


def _ids(update: object) -> tuple[int | None, int | None]:
    """The user and the chat of ``update`` (``None`` when it has none)."""
    if not isinstance(update, Update):
        return None, None
    user, chat = update.effective_user, update.effective_chat
    return (user.id if user else None), (chat.id if chat else None)


def _data_docs(persistence: ChatstatePersistence, user: int | None, chat: int | None) -> list[str]:
    """The documents ``refresh_data`` will read for an update of ``user`` in ``chat``."""
    store = persistence.store_data
    docs = [persistence.bot_doc] if store.bot_data else []
    if store.chat_data and chat is not None:
        docs.append(persistence.chat_doc(chat))
    if store.user_data and user is not None:
        docs.append(persistence.user_doc(user))
    return docs


def _discard(counter: Counter[int | None], key: int | None) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def _nothing() -> None:
    pass


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


@functools.lru_cache(maxsize=4096)
def _key_doc(prefix: str, name: str, field: str) -> str:
    return f"{prefix}:conversation:{quote(name, safe='')}:{quote(field, safe=',-')}"


def _encode_key(key: ConversationKey) -> str:
    if all(type(part) is int for part in key):  # the usual key: as json.dumps writes it, faster
        return f"[{','.join(map(str, key))}]"
    return json.dumps(list(key), separators=(",", ":"))


def _decode_key(text: str) -> ConversationKey:
    return tuple(json.loads(text))


def _holds(field: str, user_id: int) -> bool:
    """Whether a conversation key's JSON text holds ``user_id`` (an unreadable one: no)."""
    try:
        key = json.loads(field)
    except ValueError:
        return False
    return isinstance(key, list) and any(type(part) is int and part == user_id for part in key)
