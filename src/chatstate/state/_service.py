"""StateService and AsyncStateService: the friendly face over a state manager."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from chatstate.state._backend import AsyncBackend, Backend, Outcome, Snapshot
from chatstate.state._manager import (
    DEFAULT_DEDUPE,
    DEFAULT_MAX_ATTEMPTS,
    DELETE,
    RESET,
    SET_PRESERVED,
    UPDATE,
    AsyncStateManager,
    StateManager,
    TransactionFn,
)
from chatstate.state._memory import AsyncMemoryBackend, MemoryBackend
from chatstate.state._rules import StateData
from chatstate.typing import JSONObject, Path

__all__ = [
    "AsyncCachedState",
    "AsyncCachedUser",
    "AsyncStateService",
    "CachedState",
    "CachedUser",
    "StateService",
    "SyncServiceAsAsync",
]


class StateService:
    """Read and update one JSON document per user, atomically.

    Every write is one atomic operation on the backend and bumps the document's
    version by one. Reads return copies: changing them changes nothing stored.

    Args:
        backend: Where documents live; a new :class:`MemoryBackend` when omitted.
        rules: The merge rules (preserved and replaced fields, limits).
        ttl: If set, a user's document expires this long after its last write
            (seconds or a ``timedelta``). Reads do not extend it.
        dedupe_window: How long an ``op_id`` is remembered to recognise a repeat.
        max_attempts: How often :meth:`transaction` retries before ``ConflictError``.

    Example:
        >>> from chatstate import StateService, StateData
        >>> svc = StateService(rules=StateData(preserved=["jwt_token"]))
        >>> svc.update("alice", {"step": "ask_name", "cart": {"apples": 2}})
        {'step': 'ask_name', 'cart': {'apples': 2}}
        >>> svc.update("alice", {"cart": {"pears": 1}, "step": None})
        {'cart': {'apples': 2, 'pears': 1}}
    """

    def __init__(
        self,
        backend: Backend | None = None,
        rules: StateData | None = None,
        *,
        ttl: float | timedelta | None = None,
        dedupe_window: float | timedelta = DEFAULT_DEDUPE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.manager = StateManager(
            backend if backend is not None else MemoryBackend(),
            rules,
            ttl=ttl,
            dedupe_window=dedupe_window,
            max_attempts=max_attempts,
        )

    def __repr__(self) -> str:
        return f"<StateService backend={self.manager.backend!r}>"

    @property
    def rules(self) -> StateData:
        """The merge rules this service applies."""
        return self.manager.rules

    def get(self, user_id: str) -> JSONObject:
        """Return a copy of the user's document; ``{}`` for an unknown user."""
        return self.manager.load(user_id).data

    def snapshot(self, user_id: str) -> Snapshot:
        """Return the user's document together with its version."""
        return self.manager.load(user_id)

    def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> JSONObject:
        """Merge ``patch`` into the user's document atomically and return the result.

        Objects merge, ``None`` deletes a key, lists and scalars replace
        (RFC 7396), subject to the service's :class:`StateData` rules.

        Args:
            user_id: The user.
            patch: A JSON object.
            op_id: Identifies this write (for example a webhook message id). A
                repeat of an id already applied within ``dedupe_window`` changes
                nothing and returns the current document; see :meth:`update_once`
                to learn which happened.

        Raises:
            SerializationError: ``patch`` is not JSON; nothing was stored.
            PreservedFieldError: ``patch`` names a preserved field.
            StateTooLargeError: the result would exceed ``max_bytes``.
            BackendError: the store failed.
        """
        return self.update_once(user_id, patch, op_id=op_id).snapshot.data

    def update_once(
        self,
        user_id: str,
        patch: Mapping[str, Any],
        *,
        op_id: str | None,
        if_version: int | None = None,
    ) -> Outcome:
        """Like :meth:`update`, but say whether this call applied the patch.

        Args:
            user_id: The user.
            patch: A JSON object.
            op_id: See :meth:`update`.
            if_version: Apply only if the document is still at this version
                (0: no document yet); otherwise nothing is written and the
                outcome is ``"conflict"`` with the current document.

        Returns:
            An :class:`Outcome` whose ``status`` is ``"applied"``, ``"duplicate"``
            when ``op_id`` had already been applied, or ``"conflict"``.
        """
        make = lambda: self.manager.update_write(patch, op_id, if_version)  # noqa: E731
        return self.manager.apply(user_id, UPDATE, make)

    def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> JSONObject:
        """Set (or, with ``None``, remove) a field declared preserved in the rules.

        Raises:
            PreservedFieldError: ``path`` is not declared preserved.
        """
        make = lambda: self.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self.manager.apply(user_id, SET_PRESERVED, make).snapshot.data

    def reset(self, user_id: str, *, op_id: str | None = None) -> JSONObject:
        """Drop everything but the preserved fields; return what is left."""
        return self.manager.apply(
            user_id, RESET, lambda: self.manager.reset_write(op_id)
        ).snapshot.data

    def delete(self, user_id: str, *, op_id: str | None = None) -> None:
        """Remove the user's document, preserved fields included."""
        self.manager.apply(user_id, DELETE, lambda: self.manager.delete_write(op_id))

    def transaction(
        self, user_id: str, fn: TransactionFn, *, max_attempts: int | None = None
    ) -> JSONObject:
        """Run ``fn`` on the document and store its result, retrying on conflict.

        ``fn`` gets a private copy of the document and returns the new document
        (or ``None`` to store the copy it changed in place). The result is stored
        only if no other write happened since the read; otherwise ``fn`` runs
        again on the fresh document. ``fn`` may run more than once, so it must
        not have side effects. Preserved fields must come back unchanged.

        Raises:
            ConflictError: every attempt lost its race.
            PreservedFieldError: ``fn`` changed a preserved field.
            SerializationError: ``fn`` returned something that is not JSON.
        """
        return self.manager.transaction(user_id, fn, max_attempts=max_attempts).data

    def user(self, user_id: str) -> CachedUser:
        """A :class:`CachedUser` bound to ``user_id``."""
        return CachedUser(user_id, self)

    def close(self) -> None:
        """Close the backend (a client the caller passed in stays open)."""
        self.manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncStateService:
    """The asyncio twin of :class:`StateService`: the same methods, awaitable.

    Args:
        backend: An async backend; a new :class:`AsyncMemoryBackend` when omitted.
        rules: See :class:`StateService`.
        ttl: See :class:`StateService`.
        dedupe_window: See :class:`StateService`.
        max_attempts: See :class:`StateService`.
    """

    def __init__(
        self,
        backend: AsyncBackend | None = None,
        rules: StateData | None = None,
        *,
        ttl: float | timedelta | None = None,
        dedupe_window: float | timedelta = DEFAULT_DEDUPE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.manager = AsyncStateManager(
            backend if backend is not None else AsyncMemoryBackend(),
            rules,
            ttl=ttl,
            dedupe_window=dedupe_window,
            max_attempts=max_attempts,
        )

    def __repr__(self) -> str:
        return f"<AsyncStateService backend={self.manager.backend!r}>"

    @property
    def rules(self) -> StateData:
        """The merge rules this service applies."""
        return self.manager.rules

    async def get(self, user_id: str) -> JSONObject:
        """Return a copy of the user's document; ``{}`` for an unknown user."""
        return (await self.manager.load(user_id)).data

    async def snapshot(self, user_id: str) -> Snapshot:
        """Return the user's document together with its version."""
        return await self.manager.load(user_id)

    async def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> JSONObject:
        """Merge ``patch`` atomically; see :meth:`StateService.update`."""
        return (await self.update_once(user_id, patch, op_id=op_id)).snapshot.data

    async def update_once(
        self,
        user_id: str,
        patch: Mapping[str, Any],
        *,
        op_id: str | None,
        if_version: int | None = None,
    ) -> Outcome:
        """See :meth:`StateService.update_once`."""
        make = lambda: self.manager.update_write(patch, op_id, if_version)  # noqa: E731
        return await self.manager.apply(user_id, UPDATE, make)

    async def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> JSONObject:
        """See :meth:`StateService.set_preserved`."""
        make = lambda: self.manager.preserved_write(path, value, op_id)  # noqa: E731
        return (await self.manager.apply(user_id, SET_PRESERVED, make)).snapshot.data

    async def reset(self, user_id: str, *, op_id: str | None = None) -> JSONObject:
        """See :meth:`StateService.reset`."""
        make = lambda: self.manager.reset_write(op_id)  # noqa: E731
        return (await self.manager.apply(user_id, RESET, make)).snapshot.data

    async def delete(self, user_id: str, *, op_id: str | None = None) -> None:
        """See :meth:`StateService.delete`."""
        await self.manager.apply(user_id, DELETE, lambda: self.manager.delete_write(op_id))

    async def transaction(
        self,
        user_id: str,
        fn: Callable[[JSONObject], JSONObject | Awaitable[JSONObject | None] | None],
        *,
        max_attempts: int | None = None,
    ) -> JSONObject:
        """See :meth:`StateService.transaction`; ``fn`` may also be async."""
        return (await self.manager.transaction(user_id, fn, max_attempts=max_attempts)).data

    def user(self, user_id: str) -> AsyncCachedUser:
        """An :class:`AsyncCachedUser` bound to ``user_id``."""
        return AsyncCachedUser(user_id, self)

    async def aclose(self) -> None:
        """Close the backend (a client the caller passed in stays open)."""
        await self.manager.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _CachedStateView(Mapping[str, Any]):
    """Read access to a cached document; the twins below add the writes."""

    def __init__(self, snapshot: Snapshot, token_field: str) -> None:
        self._snapshot = snapshot
        self._token_field = token_field

    def _store(self, outcome: Outcome) -> JSONObject:
        self._snapshot = outcome.snapshot
        return self._snapshot.data

    @property
    def data(self) -> JSONObject:
        """The cached document (yours to read; write through the methods)."""
        return self._snapshot.data

    @property
    def version(self) -> int:
        """The version of the cached document."""
        return self._snapshot.version

    def __getitem__(self, key: str) -> Any:
        return self._snapshot.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshot.data)

    def __len__(self) -> int:
        return len(self._snapshot.data)

    @property
    def jwt_token(self) -> str | None:
        """The user's JWT (the rules' ``token_field``), or ``None``."""
        token = self._snapshot.data.get(self._token_field)
        return token if isinstance(token, str) else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} version={self.version} keys={sorted(self.data)}>"


class CachedState(_CachedStateView):
    """A user's document read once; every write goes through and refreshes it."""

    def __init__(self, user: CachedUser, snapshot: Snapshot) -> None:
        super().__init__(snapshot, user.service.rules.token_field)
        self._user = user

    def update(self, patch: Mapping[str, Any], *, op_id: str | None = None) -> JSONObject:
        """Write ``patch`` through (see :meth:`StateService.update`)."""
        svc = self._user.service
        return self._store(svc.update_once(self._user.user_id, patch, op_id=op_id))

    def set_preserved(self, path: str | Path, value: Any) -> JSONObject:
        """Write a preserved field through (see :meth:`StateService.set_preserved`)."""
        svc = self._user.service
        make = lambda: svc.manager.preserved_write(path, value, None)  # noqa: E731
        return self._store(svc.manager.apply(self._user.user_id, SET_PRESERVED, make))

    def reset(self) -> JSONObject:
        """Reset through (see :meth:`StateService.reset`)."""
        svc = self._user.service
        make = lambda: svc.manager.reset_write(None)  # noqa: E731
        return self._store(svc.manager.apply(self._user.user_id, RESET, make))

    def refresh(self) -> JSONObject:
        """Read the document again."""
        self._snapshot = self._user.service.snapshot(self._user.user_id)
        return self._snapshot.data


class CachedUser:
    """One user's state, read at most once per request and written through.

    Example:
        >>> from chatstate import CachedUser, StateService
        >>> user = CachedUser("alice", StateService())
        >>> user.state.update({"step": "menu"})
        {'step': 'menu'}
        >>> user.state["step"]
        'menu'
    """

    def __init__(self, user_id: str, service: StateService) -> None:
        self.user_id = service.manager.user_id(user_id)
        self.service = service
        self._state: CachedState | None = None

    def __repr__(self) -> str:
        return f"<CachedUser user_id={self.user_id!r}>"

    @property
    def state(self) -> CachedState:
        """The cached document, read on first use."""
        if self._state is None:
            self._state = CachedState(self, self.service.snapshot(self.user_id))
        return self._state

    @property
    def jwt_token(self) -> str | None:
        """The user's JWT from the cached state, or ``None`` (see :mod:`chatstate.auth`)."""
        return self.state.jwt_token


class AsyncCachedState(_CachedStateView):
    """The asyncio twin of :class:`CachedState`."""

    def __init__(self, user: AsyncCachedUser, snapshot: Snapshot) -> None:
        super().__init__(snapshot, user.service.rules.token_field)
        self._user = user

    async def update(self, patch: Mapping[str, Any], *, op_id: str | None = None) -> JSONObject:
        """Write ``patch`` through."""
        svc = self._user.service
        return self._store(await svc.update_once(self._user.user_id, patch, op_id=op_id))

    async def set_preserved(self, path: str | Path, value: Any) -> JSONObject:
        """Write a preserved field through."""
        svc = self._user.service
        make = lambda: svc.manager.preserved_write(path, value, None)  # noqa: E731
        return self._store(await svc.manager.apply(self._user.user_id, SET_PRESERVED, make))

    async def reset(self) -> JSONObject:
        """Reset through."""
        svc = self._user.service
        make = lambda: svc.manager.reset_write(None)  # noqa: E731
        return self._store(await svc.manager.apply(self._user.user_id, RESET, make))

    async def refresh(self) -> JSONObject:
        """Read the document again."""
        self._snapshot = await self._user.service.snapshot(self._user.user_id)
        return self._snapshot.data


class AsyncCachedUser:
    """The asyncio twin of :class:`CachedUser`: ``await user.load()`` before ``user.state``."""

    def __init__(self, user_id: str, service: AsyncStateService) -> None:
        self.user_id = service.manager.user_id(user_id)
        self.service = service
        self._state: AsyncCachedState | None = None

    def __repr__(self) -> str:
        return f"<AsyncCachedUser user_id={self.user_id!r}>"

    async def load(self) -> AsyncCachedState:
        """Read the document once (later calls return the cached state)."""
        if self._state is None:
            self._state = AsyncCachedState(self, await self.service.snapshot(self.user_id))
        return self._state

    @property
    def state(self) -> AsyncCachedState:
        """The cached document.

        Raises:
            RuntimeError: :meth:`load` has not been awaited yet.
        """
        if self._state is None:
            raise RuntimeError("await AsyncCachedUser.load() before reading .state")
        return self._state

    @property
    def jwt_token(self) -> str | None:
        """The user's JWT from the loaded state, or ``None``."""
        return self.state.jwt_token


class SyncServiceAsAsync:
    """An async face over a :class:`StateService` whose coroutines never suspend.

    The sync router drives its shared coroutine logic through it, and the backend
    contract suite uses it so that one test body serves both twins.
    """

    def __init__(self, service: StateService) -> None:
        self.service = service
        self.rules = service.rules

    async def get(self, user_id: str) -> JSONObject:
        """Await :meth:`StateService.get`."""
        return self.service.get(user_id)

    async def snapshot(self, user_id: str) -> Snapshot:
        """Await :meth:`StateService.snapshot`."""
        return self.service.snapshot(user_id)

    async def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> JSONObject:
        """Await :meth:`StateService.update`."""
        return self.service.update(user_id, patch, op_id=op_id)

    async def update_once(
        self,
        user_id: str,
        patch: Mapping[str, Any],
        *,
        op_id: str | None,
        if_version: int | None = None,
    ) -> Outcome:
        """Await :meth:`StateService.update_once`."""
        return self.service.update_once(user_id, patch, op_id=op_id, if_version=if_version)

    async def set_preserved(self, user_id: str, path: str | Path, value: Any) -> JSONObject:
        """Await :meth:`StateService.set_preserved`."""
        return self.service.set_preserved(user_id, path, value)

    async def reset(self, user_id: str) -> JSONObject:
        """Await :meth:`StateService.update_once`."""
        return self.service.reset(user_id)

    async def delete(self, user_id: str) -> None:
        """Await :meth:`StateService.update`."""
        self.service.delete(user_id)

    async def transaction(
        self, user_id: str, fn: Callable[[JSONObject], JSONObject | None], **kw: Any
    ) -> JSONObject:
        """Await :meth:`StateService.snapshot`."""
        return self.service.transaction(user_id, fn, **kw)

    async def aclose(self) -> None:
        """Await :meth:`StateService.get`."""
        self.service.close()
