"""The state service, its claims and cached users: the I/O around :mod:`._service`.

This module is the one body of both twins: ``_sync/service.py`` (``StateService``,
``Claim``, ``CachedState``, ``CachedUser``) is generated from it by
``tools/unasync.py``. Edit this one, then ``make unasync``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Self

from chatstate._actions import failing
from chatstate._heartbeat import Beat, heartbeat_async
from chatstate._retry import RetryPolicy
from chatstate.exceptions import UsageError
from chatstate.state._async.manager import AsyncStateManager
from chatstate.state._backend import Document, Outcome, Snapshot, check_prefix
from chatstate.state._manager import (
    ASSIGN,
    DEFAULT_DEDUPE,
    DEFAULT_LEASE,
    DEFAULT_WAIT,
    DELETE,
    INCREMENT,
    RESET,
    SET_PRESERVED,
    UPDATE,
    AsyncTransactionFn,
    _ClaimCore,
)
from chatstate.state._memory import AsyncMemoryBackend
from chatstate.state._protocols import AsyncBackend, AsyncPinging
from chatstate.state._rules import StateData
from chatstate.state._service import (
    CLAIM_PURPOSE,
    ERASE,
    _CachedStateView,
    _ClaimBase,
    _counter_value,
    _eraser,
    _export,
    _lister,
    cached_state_async,
)
from chatstate.typing import JSONObject, Path

__all__ = ["AsyncCachedState", "AsyncCachedUser", "AsyncClaim", "AsyncStateService"]

log = logging.getLogger("chatstate.state")


class AsyncStateService:
    """Read and update one JSON document per user, atomically.

    Every write is one atomic operation on the backend and bumps the document's
    version by one. Reads return copies: changing them changes nothing stored.

    Args:
        backend: Where documents live; a new :class:`AsyncMemoryBackend` when omitted.
        rules: The merge rules (preserved and replaced fields, limits).
        ttl: If set, a user's document expires this long after its last write
            (seconds or a ``timedelta``). Reads do not extend it.
        dedupe_window: How long operation ids are remembered after a user's
            last write (see :data:`~chatstate.state.REMEMBERED_OPS`).
        max_attempts: How often :meth:`transaction` tries before ``ConflictError``
            (8 when omitted); a shorthand for ``retry=RetryPolicy(attempts=...)``.
        retry: How :meth:`transaction` tries again after a lost race (a
            :class:`~chatstate.RetryPolicy`: attempts, budget, backoff, hook).
        claim_retry: How :meth:`claim` asks again, within its ``wait``, while
            another message of the user is being handled.

    Raises:
        UsageError: ``backend`` is of the other kind (asyncio for the sync
            service, sync for the asyncio one).
        ConfigurationError: an option is out of range.

    Examples:
        With the sync twin:

        >>> from chatstate import StateService, StateData
        >>> svc = StateService(rules=StateData(preserved=["jwt_token"]))
        >>> svc.update("alice", {"step": "ask_name", "cart": {"apples": 2}})
        {'step': 'ask_name', 'cart': {'apples': 2}}
        >>> svc.update("alice", {"cart": {"pears": 1}, "step": None})
        {'cart': {'apples': 2, 'pears': 1}}
    """

    def __init__(
        self,
        backend: AsyncBackend | None = None,
        rules: StateData | None = None,
        *,
        ttl: float | timedelta | None = None,
        dedupe_window: float | timedelta = DEFAULT_DEDUPE,
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        claim_retry: RetryPolicy | None = None,
    ) -> None:
        self.manager = AsyncStateManager(
            backend if backend is not None else AsyncMemoryBackend(),
            rules,
            ttl=ttl,
            dedupe_window=dedupe_window,
            max_attempts=max_attempts,
            retry=retry,
            claim_retry=claim_retry,
        )

    def __repr__(self) -> str:
        return f"<AsyncStateService backend={self.manager.backend!r}>"

    @property
    def rules(self) -> StateData:
        """The merge rules this service applies."""
        return self.manager.rules

    async def get(self, user_id: str) -> JSONObject:
        """Return a copy of the user's document; ``{}`` for an unknown user."""
        snapshot = await self.manager.load(user_id)
        return snapshot.data

    async def snapshot(self, user_id: str) -> Snapshot:
        """Return the user's document together with its version."""
        return await self.manager.load(user_id)

    async def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> Document:
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

        Returns:
            The new document: a read-only ``dict`` (``json.dumps`` takes it),
            decoded only when you read it; ``doc.to_dict()`` gives a mutable copy.

        Raises:
            SerializationError: ``patch`` is not JSON; nothing was stored.
            PreservedFieldError: ``patch`` names a preserved field.
            StateTooLargeError: the result would exceed ``max_bytes``.
            OpIdReusedError: ``op_id`` was used before for a different patch.
            BackendError: the store failed.
        """
        return self.manager.document(await self.update_once(user_id, patch, op_id=op_id))

    async def update_once(
        self,
        user_id: str,
        patch: Mapping[str, Any],
        *,
        op_id: str | None,
        if_version: int | None = None,
        fingerprint: str | None = None,
    ) -> Outcome:
        """Like :meth:`update`, but say whether this call applied the patch.

        Args:
            user_id: The user.
            patch: A JSON object.
            op_id: See :meth:`update`.
            if_version: Apply only if the document is still at this version
                (0: no document yet); otherwise nothing is written and the
                outcome is ``"conflict"`` with the current document.
            fingerprint: What identifies the request behind ``op_id`` (by
                default the patch itself). The same ``op_id`` with another
                fingerprint raises :class:`~chatstate.exceptions.OpIdReusedError`. Pass the
                message's text when the patch is computed from state that may
                have moved on (a redelivery then still counts as a duplicate).

        Returns:
            An :class:`Outcome` whose ``status`` is ``"applied"`` (also when an
            earlier attempt of this very call applied it and the reply was
            lost), ``"duplicate"`` when ``op_id`` had already been applied by
            another call, or ``"conflict"``. Its snapshot is decoded when read.
        """
        make = lambda: self.manager.update_write(patch, op_id, if_version, fingerprint)  # noqa: E731
        return await self.manager.apply(user_id, UPDATE, make)

    async def assign(
        self, user_id: str, values: Mapping[Any, Any], *, op_id: str | None = None
    ) -> Document:
        """Set each path to exactly the value given, atomically.

        Unlike :meth:`update`, an object replaces what was there (nothing is
        merged) and ``None`` is stored as JSON null. Keys are top-level field
        names (a str is one key, dots and all) or tuples of keys; missing
        parent objects are created.

        Examples:
            With the sync twin:

            >>> from chatstate import StateService
            >>> svc = StateService()
            >>> _ = svc.update("u", {"form": {"a": 1, "b": 2}})
            >>> svc.assign("u", {"form": {"c": 3}, ("meta", "seen"): None})
            {'form': {'c': 3}, 'meta': {'seen': None}}

        Raises:
            PreservedFieldError: a path is, holds or lies under a preserved field.
            SerializationError: a value is not JSON.
        """
        make = lambda: self.manager.assign_write(values, op_id)  # noqa: E731
        return self.manager.document(await self.manager.apply(user_id, ASSIGN, make))

    async def increment(
        self, user_id: str, path: str | Path, by: int = 1, *, op_id: str | None = None
    ) -> int:
        """Add ``by`` to the integer at ``path`` atomically and return the new value.

        A missing counter counts from 0, missing parent objects are created.
        The value stays exact over the whole signed 64-bit range. ``path`` is a
        dotted str (``"stats.visits"``) or a tuple of keys.

        With an ``op_id`` seen before, nothing changes and the counter's
        current value is returned.

        Raises:
            CounterError: the value (or a parent) is not an integer, or the
                result would leave the signed 64-bit range; nothing was stored.
            PreservedFieldError: ``path`` is, holds or lies under a preserved field.
        """
        make = lambda: self.manager.increment_write(path, by, op_id)  # noqa: E731
        outcome = await self.manager.apply(user_id, INCREMENT, make)
        if outcome.value is not None:
            return int(outcome.value)
        return _counter_value(await self.get(user_id), self.rules.increment_path(path))

    async def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """Set (or, with ``None``, remove) a field declared preserved in the rules.

        Raises:
            PreservedFieldError: ``path`` is not declared preserved.
        """
        make = lambda: self.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self.manager.document(await self.manager.apply(user_id, SET_PRESERVED, make))

    async def reset(self, user_id: str, *, op_id: str | None = None) -> Document:
        """Drop everything but the preserved fields; return what is left."""
        make = lambda: self.manager.reset_write(op_id)  # noqa: E731
        return self.manager.document(await self.manager.apply(user_id, RESET, make))

    async def delete(self, user_id: str, *, op_id: str | None = None, force: bool = False) -> None:
        """Remove the user's document, preserved fields included.

        The operation ids the user's writes carried stay remembered (a late
        redelivery is still recognised). ``force`` removes the document's
        storage whatever it holds, also data that is not a chatstate document
        (which every other call refuses to touch).
        """
        make = lambda: self.manager.delete_write(op_id, force=force)  # noqa: E731
        await self.manager.apply(user_id, DELETE, make)

    async def export(self, user_id: str, *, include_secrets: bool = False) -> JSONObject:
        """Everything stored for the user, as a JSON-ready export.

        ``{"chatstate_export": 1, "user_id", "version", "secrets", "document"}``:
        preserved fields and values that look secret (``token``, ``password``,
        ...) are replaced by ``"<secret sha256:...>"`` fingerprints unless
        ``include_secrets``. A user with nothing stored exports version 0 and an
        empty document. A document stored at a schema version other than 1
        (``StateData(schema_version=...)``) also carries ``"schema"``.
        ``chatstate import`` reads it back.
        """
        uid = self.manager.user_id(user_id)
        return _export(uid, await self.snapshot(uid), self.manager.rules, include_secrets)

    async def users(self, prefix: str = "") -> AsyncIterator[str]:
        """Every user id with a stored document that starts with ``prefix``, lazily.

        For operator jobs: a broadcast, a migration, a framework's start-up
        load. A user stored for the whole iteration is listed at least once
        (Redis's ``SCAN`` may list one twice); a user written or erased
        meanwhile may or may not be. Memory and SQLite list in id order, Redis
        in no order. The asyncio twin is used with ``async for``.

        Examples:
            With the sync twin:

            >>> from chatstate import StateService
            >>> svc = StateService()
            >>> for user in ("ann", "bob", "anna"):
            ...     _ = svc.update(user, {"seen": 1})
            >>> sorted(svc.users(prefix="ann"))
            ['ann', 'anna']

        Raises:
            ConfigurationError: the backend cannot list its users (a backend
                of your own without ``users``, or Redis with a ``key_secret``),
                on the first step.
        """
        check_prefix(prefix)
        async for user_id in _lister(self.manager.backend)(prefix):
            yield user_id

    async def erase(self, user_id: str) -> list[str]:
        """Remove everything chatstate keeps for the user; return what was there.

        Unlike :meth:`delete`, the user's remembered operation ids go too (a
        message redelivered after an erasure is handled as new), with any claim,
        the locks chatstate takes and the flow deadline entry. The names come
        from :data:`~chatstate.state.ERASED_PARTS` (``[]``: nothing was stored).

        Raises:
            UsageError: the backend has no ``erase`` (a backend of your own).
        """
        uid = self.manager.user_id(user_id)
        erase = _eraser(self.manager.backend)
        with failing(ERASE):
            return list(await erase(uid))

    async def transaction(
        self, user_id: str, fn: AsyncTransactionFn, *, max_attempts: int | None = None
    ) -> JSONObject:
        """Run ``fn`` on the document and store its result, retrying on conflict.

        ``fn`` gets a private copy of the document and returns the new document
        (or ``None`` to store the copy it changed in place); the asyncio twin
        also takes a coroutine function. The result is stored only if no other
        write happened since the read; otherwise ``fn`` runs again on the fresh
        document. ``fn`` may run more than once, so it must not have side
        effects. Preserved fields must come back unchanged. For a counter,
        :meth:`increment` is faster and never retries.

        Raises:
            ConflictError: every attempt lost its race.
            PreservedFieldError: ``fn`` changed a preserved field.
            SerializationError: ``fn`` returned something that is not JSON.
        """
        snapshot = await self.manager.transaction(user_id, fn, max_attempts=max_attempts)
        return snapshot.data

    async def claim(
        self,
        user_id: str,
        op_id: str | None = None,
        *,
        fingerprint: str | None = None,
        purpose: str = CLAIM_PURPOSE,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = DEFAULT_WAIT,
        heartbeat: bool = True,
    ) -> AsyncClaim:
        """Claim the user to handle one message, exactly once, one message at a time.

        The claim is taken atomically with a read of the document. While it is
        held, other claims of the same user wait (up to ``wait``), so messages
        of one user are handled one after the other, across processes. A claim
        for an ``op_id`` already handled comes back as a duplicate; a copy of a
        message being handled waits for that handling: a duplicate once it
        commits, claimed if it fails or its process dies (after ``lease``).
        Changes staged on the claim are written with
        :meth:`AsyncClaim.commit` in one atomic write that also remembers ``op_id``
        and releases the claim; :meth:`AsyncClaim.release` gives it up without
        remembering anything, so a redelivery is handled again. The claim is
        a context manager (the asyncio twin's an asynchronous one).

        Examples:
            With the sync twin:

            >>> from chatstate import StateService
            >>> svc = StateService()
            >>> with svc.claim("ann", "wamid.1") as claim:
            ...     if not claim.duplicate:
            ...         claim.update({"seen": claim.data.get("seen", 0) + 1})
            >>> svc.claim("ann", "wamid.1").duplicate
            True

        Args:
            user_id: The user.
            op_id: The message id (``None``: a claim with no dedupe).
            fingerprint: Identifies the message's content (see
                :meth:`update_once`); a different one with the same ``op_id``
                raises :class:`~chatstate.exceptions.OpIdReusedError`.
            purpose: The namespace of ``op_id`` (the router uses its own, so
                your ids and its never collide).
            lease: How long the user stays held after the holder's process
                died: the claim is renewed every third of its lease while it is
                open (``heartbeat``), and lapses one lease after the last
                renewal.
            wait: How long to wait while another message of the user is being
                handled before :class:`~chatstate.exceptions.UserBusyError`.
            heartbeat: Renew the lease while the claim is open (from the event
                loop; the sync twin from one thread per process). ``False``: the
                claim lapses ``lease`` after it was taken, however long its
                handler runs.
        """
        core = await self.manager.claim(
            user_id, op_id, purpose=purpose, fingerprint=fingerprint, lease=lease, wait=wait
        )
        return AsyncClaim(self, core, heartbeat=heartbeat)

    def user(self, user_id: str) -> AsyncCachedUser:
        """A :class:`AsyncCachedUser` bound to ``user_id``."""
        return AsyncCachedUser(user_id, self)

    async def ping(self) -> float:
        """Check the backend answers (for health checks); return the latency in seconds.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """
        backend = self.manager.backend
        return float(await backend.ping()) if isinstance(backend, AsyncPinging) else 0.0

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


class AsyncClaim(_ClaimBase):
    """A user claimed for one message; see :meth:`AsyncStateService.claim`.

    Use it as a context manager: leaving the block commits what was staged, an
    exception releases the claim (nothing is written, the message may come again).
    """

    def __init__(
        self, service: AsyncStateService, core: _ClaimCore, *, heartbeat: bool = False
    ) -> None:
        super().__init__(core)
        self._service = service
        self._beat: Beat | None = None
        if heartbeat and core.state == "open":
            self._beat = heartbeat_async(self, AsyncClaim._renew_quietly, core.lease / 3)

    def _settled(self) -> None:
        """Stop the heartbeat once the claim is no longer held."""
        if self._beat is not None and self._core.state != "open":
            self._beat.stop()
            self._beat = None

    async def _renew_quietly(self) -> bool:
        """One heartbeat: renew; False (stop beating) once the claim is not held."""
        if self._core.state != "open":
            return False
        try:
            outcome = await self._service.manager.renew(self._core, self._core.lease)
        except UsageError:  # committed or released meanwhile
            return False
        return outcome.status == "claimed"

    async def commit(self, *, keep: bool = False) -> Outcome:
        """Write the staged changes, remember the op id, release the claim: one atomic write.

        Args:
            keep: Keep holding the user after the write: the claim stays open
                (other messages of the user keep waiting) until a second
                ``commit()``, which writes what was staged since under a key of
                its own, or :meth:`release`. The router commits a message's
                step and its replies so, and lets go once they are sent.

        Returns:
            The outcome: ``"applied"``, or ``"duplicate"`` when another handler
            took over a lapsed claim and handled the message first.

        Raises:
            ClaimLostError: the claim lapsed and another handler holds the user.
            UsageError: the claim is a duplicate, or was committed or released.
        """
        try:
            return await self._service.manager.commit(self._core, keep=keep)
        finally:
            self._settled()

    async def renew(self, lease: float | timedelta | None = None) -> bool:
        """Extend the lease: it now lapses ``lease`` from now (the claim's own lease by default).

        Call it every third of the lease or so while a slow handler runs (the
        router does so by itself), so that a claim lapses soon after its process
        dies, never while it works.

        Returns:
            True; False when the claim is no longer held: its lease lapsed
            (another handler may hold the user now: what this one commits will
            be refused as ``lost``), or it was committed or released, or it is
            a duplicate. A renewal never takes a claim back.

        Raises:
            BackendError: the store failed (the lease is as it was).
        """
        if self._core.state != "open":
            return False
        outcome = await self._service.manager.renew(self._core, lease or self._core.lease)
        return outcome.status == "claimed"

    async def release(self) -> None:
        """Give the claim up without writing or remembering anything."""
        try:
            await self._service.manager.release(self._core)
        finally:
            self._settled()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.open:
            return
        if exc is None:
            await self.commit()
            return
        try:
            await self.release()
        except Exception:  # the claim lapses on its own; the caller's error matters more
            log.warning("could not release the claim on user %r", self.user_id, exc_info=True)


class AsyncCachedState(_CachedStateView):
    """A user's document read once; every write goes through and refreshes it."""

    def __init__(self, user: AsyncCachedUser, snapshot: Snapshot) -> None:
        super().__init__(snapshot, user.service.rules)
        self._user = user

    async def update(self, patch: Mapping[str, Any], *, op_id: str | None = None) -> Document:
        """Write ``patch`` through (see :meth:`AsyncStateService.update`)."""
        svc = self._user.service
        return self._store(await svc.update_once(self._user.user_id, patch, op_id=op_id))

    async def set_preserved(
        self, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """Write a preserved field through (see :meth:`AsyncStateService.set_preserved`)."""
        svc = self._user.service
        make = lambda: svc.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self._store(await svc.manager.apply(self._user.user_id, SET_PRESERVED, make))

    async def reset(self, *, op_id: str | None = None) -> Document:
        """Reset through (see :meth:`AsyncStateService.reset`)."""
        svc = self._user.service
        make = lambda: svc.manager.reset_write(op_id)  # noqa: E731
        return self._store(await svc.manager.apply(self._user.user_id, RESET, make))

    async def refresh(self) -> JSONObject:
        """Read the document again."""
        self._snapshot = await self._user.service.snapshot(self._user.user_id)
        return self._snapshot.data


class AsyncCachedUser:
    """One user's state, read at most once per request and written through.

    :meth:`load` reads the document, once; :attr:`state` is what it read. The
    sync twin also reads it on the first use of :attr:`state`; the asyncio twin
    cannot wait inside a property, so there :meth:`load` must have been awaited.

    Examples:
        With the sync twin:

        >>> from chatstate import CachedUser, StateService
        >>> user = CachedUser("alice", StateService())
        >>> user.state.update({"step": "menu"})
        {'step': 'menu'}
        >>> user.state["step"]
        'menu'
    """

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
        """The cached document (read here on first use by the sync twin).

        Raises:
            UsageError: the asyncio twin's :meth:`load` has not been awaited yet.
        """
        return cached_state_async(self._state, self.load)

    @property
    def jwt_token(self) -> str | None:
        """The user's JWT from the cached state, or ``None`` (see :mod:`chatstate.auth`)."""
        return self.state.jwt_token
