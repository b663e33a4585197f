# Generated from src/chatstate/integrations/telebot/_async/storage.py
# by tools/unasync.py: do not edit.
"""The telebot state storages, their ``retrieve_data`` blocks and the dedupe middlewares.

This module is the one body of both twins: ``_sync/storage.py``
(``ChatstateStateStorage``, ``UpdateDedupeMiddleware``) is generated from it by
``tools/unasync.py``. Edit this one, then ``make unasync``. What has no twin
(the documents, the keys, :func:`update_key`) is in ``../_common.py``, with the
one check where the twins differ (which service each accepts, and the twin its
error points to: the ``_check_service_*`` pair).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from telebot.handler_backends import BaseMiddleware, CancelUpdate
from telebot.storage import StateStorageBase

from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.integrations.telebot._common import (
    _CLAIM,
    DATA_FIELD,
    DEDUPE_PURPOSE,
    DEDUPE_UPDATE_TYPES,
    DEFAULT_LEASE,
    STATE_FIELD,
    _apply_changes,
    _cannot_list,
    _changes,
    _check_prefix,
    _check_service_sync,
    _create,
    _data_of,
    _exists,
    _json,
    _Keys,
    _of_user,
    _seconds,
    _state_name,
    log,
    update_key,
)
from chatstate.state import Claim, RedisBackend, StateService

__all__ = ["ChatstateStateStorage", "UpdateDedupeMiddleware"]


class ChatstateStateStorage(_Keys, StateStorageBase):
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
    (see :meth:`get_interactive_data`). The sync and the asyncio storage
    write the same documents: bots of both kinds on one backend share their keys.

    Args:
        service: Where the documents live. Closed by :meth:`close` only if
            ``close_service`` is true (see :meth:`from_url`).
        prefix: The first part of every key, as telebot's ``prefix``.
        separator: Between the key's parts, as telebot's ``separator``.
        close_service: Close ``service`` in :meth:`close`.

    Raises:
        UsageError: ``service`` is of the other kind (asyncio for the sync
            storage, sync for the asyncio one); the error names the twin to use.
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
        _check_service_sync(service, "ChatstateStateStorage")
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
        doc = self.service.get(uid)
        return doc.get(STATE_FIELD)

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

    # A plain method in both twins: telebot calls it without awaiting, then enters the
    # block it returns with ``with``.
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
        return sorted([doc_id for doc_id in found if self.service.erase(doc_id)])

    def close(self) -> None:
        """Close the service if this storage owns it (see ``close_service``)."""
        if self._close_service:
            self.service.close()


class _DataBlock:
    """``with bot.retrieve_data(...) as data:`` over the storage's ``StateService``."""

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


class UpdateDedupeMiddleware(BaseMiddleware):
    """Handles each Telegram update once, across every ``TeleBot`` sharing one backend.

    A class middleware (``bot.setup_middleware(UpdateDedupeMiddleware(bot, service))``,
    first of the middlewares; a sync ``TeleBot`` is made with
    ``use_class_middlewares=True``). Before the handlers run it takes a
    chatstate claim for the update (keyed by :func:`update_key`); a copy of an update already
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
        UsageError: ``service`` is of the other kind (asyncio for the sync
            middleware, sync for the asyncio one; the error names the twin to
            use), or ``bot`` is not a bot with a token.
        ConfigurationError: ``update_types`` is not a non-empty list of names,
            or names a type that has no id to tell copies apart.
    """

    update_sensitive = False  # one pre_process for every type: update_key tells them apart

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
        _check_service_sync(service, "UpdateDedupeMiddleware")
        if not isinstance(getattr(bot, "bot_id", None), int):
            raise UsageError(
                f"bot must be the bot whose updates this guards (a TeleBot or TeleBot "
                f"with a token), not {type(bot).__name__}"
            )
        names: object = update_types  # callers may be untyped: a str is a common slip
        if isinstance(names, str) or not isinstance(names, list | tuple):
            raise ConfigurationError(
                f"update_types must be a list of update type names, not {update_types!r}"
            )
        if not update_types:
            raise ConfigurationError("update_types is empty: the middleware would guard nothing")
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
            return CancelUpdate()
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
