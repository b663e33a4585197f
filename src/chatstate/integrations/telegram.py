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
pickled); a write sends only what changed since this process last synced the
document, so two processes never overwrite each other's keys; before each
update the data is reloaded from the store, keeping the changes this process
has not written yet. Each persistent conversation is one document with one
field per conversation key.

Needs ``pip install 'chatstate[telegram]'``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from datetime import timedelta
from typing import Any, Final, Self, TypeAlias
from urllib.parse import quote

from telegram.ext import Application, BasePersistence, PersistenceInput
from telegram.ext._handlers.conversationhandler import PendingState
from telegram.ext._utils.trackingdict import TrackingDict
from telegram.ext._utils.types import CDCData, ConversationDict, ConversationKey

from chatstate.state import AsyncRedisBackend, AsyncStateService
from chatstate.typing import JSONObject

__all__ = [
    "DELETE",
    "ChatstateApplication",
    "ChatstatePersistence",
    "apply_changes",
    "changes_between",
]

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

    - Values must be JSON with str keys: a write of anything else raises
      :class:`~chatstate.SerializationError` (python-telegram-bot hands it to
      your error handlers) and stores nothing. Conversation states must be
      JSON too (ints and strs are).
    - ``update_*_data`` writes the difference between the data and what this
      process last read or wrote, as one atomic write, so concurrent writers
      keep each other's keys (the same key: the last write wins).
    - ``refresh_*_data`` (called before each update) reloads the document
      and re-applies this process's unwritten changes on top.
    - ``get_user_data`` and ``get_chat_data`` return ``{}``: each user's and
      chat's data is loaded when its first update arrives, so start-up does
      not read every user (``application.user_data`` holds the users this
      process has seen).

    Args:
        service: Where the documents live; closed by :meth:`flush` only if
            ``close_service`` is true (see :meth:`from_url`).
        prefix: The start of every document id this persistence uses.
        store_data: Which kinds of data to keep (all by default).
        update_interval: Seconds between python-telegram-bot's periodic
            writes. :class:`ChatstateApplication` also writes after each update.
        close_service: Close ``service`` when the application shuts down.
    """

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

    # -- loading ---------------------------------------------------------------------

    async def get_user_data(self) -> dict[int, Data]:
        """Return ``{}``: each user's data is loaded by :meth:`refresh_user_data`."""
        return {}

    async def get_chat_data(self) -> dict[int, Data]:
        """Return ``{}``: each chat's data is loaded by :meth:`refresh_chat_data`."""
        return {}

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
        return {_decode_key(key): state for key, state in doc.items()}

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
        doc = {"buttons": [[u, t, d] for u, t, d in buttons], "queries": dict(queries)}
        if _same(doc, self._synced.get(self.callback_doc)):
            return
        await self.service.assign(self.callback_doc, doc)
        self._synced[self.callback_doc] = _copy(doc)

    async def update_conversation(
        self, name: str, key: ConversationKey, new_state: object | None
    ) -> None:
        """Store one conversation's state (``None`` removes it), leaving the others alone."""
        field = _encode_key(key)
        if new_state is None:
            await self.service.update(self.conversation_doc(name), {field: None})
        else:
            await self.service.assign(self.conversation_doc(name), {field: new_state})

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
        self._synced[doc_id] = _copy(dict(data))

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
        pending = changes_between(self._synced.get(doc_id, {}), target)
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


class ChatstateApplication(Application[Any, Any, Any, Any, Any, Any]):
    """An ``Application`` that keeps several processes of one bot in step.

    With a :class:`ChatstatePersistence`, before each update it reloads the
    persistent conversation states from the store (python-telegram-bot reads
    them only at start-up, so another process's moves would go unseen), and
    after each update it writes what changed at once instead of on the next
    periodic run. Use it with ``ApplicationBuilder().application_class(
    ChatstateApplication)``; with any other persistence it is a plain
    ``Application``.
    """

    async def process_update(self, update: object) -> None:
        """Refresh conversations, process ``update``, then write what it changed."""
        persistence = self.persistence
        if not isinstance(persistence, ChatstatePersistence):
            await super().process_update(update)
            return
        # python-telegram-bot keeps these only privately; they are the very dicts
        # its ConversationHandlers read (name -> states).
        conversations = self._conversation_handler_conversations
        await persistence.refresh_conversations(conversations)
        await super().process_update(update)
        await self.update_persistence()


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
