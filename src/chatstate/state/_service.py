"""StateService and AsyncStateService: the friendly face over a state manager."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, Literal, Self, cast

from chatstate._actions import failing
from chatstate._redact import redact
from chatstate._retry import RetryPolicy
from chatstate.exceptions import UsageError
from chatstate.state._async.manager import AsyncStateManager
from chatstate.state._backend import AsyncBackend, Backend, Document, Outcome, Snapshot
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
    TransactionFn,
    _ClaimCore,
)
from chatstate.state._memory import AsyncMemoryBackend, MemoryBackend
from chatstate.state._rules import StateData
from chatstate.state._sync.manager import StateManager
from chatstate.typing import JSONObject, Path

__all__ = [
    "AsyncCachedState",
    "AsyncCachedUser",
    "AsyncClaim",
    "AsyncStateService",
    "CachedState",
    "CachedUser",
    "Claim",
    "StateService",
    "SyncServiceAsAsync",
]

log = logging.getLogger("chatstate.state")

CLAIM_PURPOSE = "claim"


EXPORT_FORMAT = 1
"""The ``chatstate_export`` version :meth:`StateService.export` writes."""

ERASE: Final = "Failed to erase user"


def _export(
    user_id: str, snapshot: Snapshot, rules: StateData, include_secrets: bool
) -> JSONObject:
    data = snapshot.data if snapshot.version else {}
    export: JSONObject = {
        "chatstate_export": EXPORT_FORMAT,
        "user_id": user_id,
        "version": snapshot.version,
        "secrets": "included" if include_secrets else "redacted",
        "document": data if include_secrets else redact(data, rules.redacted_fields),
    }
    if snapshot.version and snapshot.schema != 1:
        export["schema"] = snapshot.schema
    return export


def _eraser(backend: object) -> Callable[[str], Any]:
    erase = getattr(backend, "erase", None)
    if not callable(erase):
        raise UsageError(
            f"{type(backend).__name__} cannot erase a user (it has no erase method); "
            "delete(user_id, force=True) removes the document only"
        )
    return cast("Callable[[str], Any]", erase)


class StateService:
    """Read and update one JSON document per user, atomically.

    Every write is one atomic operation on the backend and bumps the document's
    version by one. Reads return copies: changing them changes nothing stored.

    Args:
        backend: Where documents live; a new :class:`MemoryBackend` when omitted.
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
        UsageError: ``backend`` is asynchronous (use :class:`AsyncStateService`).
        ConfigurationError: an option is out of range.

    Examples:
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
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        claim_retry: RetryPolicy | None = None,
    ) -> None:
        self.manager = StateManager(
            backend if backend is not None else MemoryBackend(),
            rules,
            ttl=ttl,
            dedupe_window=dedupe_window,
            max_attempts=max_attempts,
            retry=retry,
            claim_retry=claim_retry,
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
            The new document: a read-only mapping, decoded only when you read it
            (``dict(doc)`` gives a plain dict).

        Raises:
            SerializationError: ``patch`` is not JSON; nothing was stored.
            PreservedFieldError: ``patch`` names a preserved field.
            StateTooLargeError: the result would exceed ``max_bytes``.
            OpIdReusedError: ``op_id`` was used before for a different patch.
            BackendError: the store failed.
        """
        return self.manager.document(self.update_once(user_id, patch, op_id=op_id))

    def update_once(
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
                fingerprint raises :class:`~chatstate.OpIdReusedError`. Pass the
                message's text when the patch is computed from state that may
                have moved on (a redelivery then still counts as a duplicate).

        Returns:
            An :class:`Outcome` whose ``status`` is ``"applied"`` (also when an
            earlier attempt of this very call applied it and the reply was
            lost), ``"duplicate"`` when ``op_id`` had already been applied by
            another call, or ``"conflict"``. Its snapshot is decoded when read.
        """
        make = lambda: self.manager.update_write(patch, op_id, if_version, fingerprint)  # noqa: E731
        return self.manager.apply(user_id, UPDATE, make)

    def assign(
        self, user_id: str, values: Mapping[Any, Any], *, op_id: str | None = None
    ) -> Document:
        """Set each path to exactly the value given, atomically.

        Unlike :meth:`update`, an object replaces what was there (nothing is
        merged) and ``None`` is stored as JSON null. Keys are top-level field
        names (a str is one key, dots and all) or tuples of keys; missing
        parent objects are created.

        Examples:
            >>> svc = StateService()
            >>> _ = svc.update("u", {"form": {"a": 1, "b": 2}})
            >>> svc.assign("u", {"form": {"c": 3}, ("meta", "seen"): None})
            {'form': {'c': 3}, 'meta': {'seen': None}}

        Raises:
            PreservedFieldError: a path is, holds or lies under a preserved field.
            SerializationError: a value is not JSON.
        """
        make = lambda: self.manager.assign_write(values, op_id)  # noqa: E731
        return self.manager.document(self.manager.apply(user_id, ASSIGN, make))

    def increment(
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
        outcome = self.manager.apply(user_id, INCREMENT, make)
        if outcome.value is not None:
            return int(outcome.value)
        return _counter_value(self.get(user_id), self.rules.increment_path(path))

    def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """Set (or, with ``None``, remove) a field declared preserved in the rules.

        Raises:
            PreservedFieldError: ``path`` is not declared preserved.
        """
        make = lambda: self.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self.manager.document(self.manager.apply(user_id, SET_PRESERVED, make))

    def reset(self, user_id: str, *, op_id: str | None = None) -> Document:
        """Drop everything but the preserved fields; return what is left."""
        make = lambda: self.manager.reset_write(op_id)  # noqa: E731
        return self.manager.document(self.manager.apply(user_id, RESET, make))

    def delete(self, user_id: str, *, op_id: str | None = None, force: bool = False) -> None:
        """Remove the user's document, preserved fields included.

        The operation ids the user's writes carried stay remembered (a late
        redelivery is still recognised). ``force`` removes the document's
        storage whatever it holds, also data that is not a chatstate document
        (which every other call refuses to touch).
        """
        make = lambda: self.manager.delete_write(op_id, force=force)  # noqa: E731
        self.manager.apply(user_id, DELETE, make)

    def export(self, user_id: str, *, include_secrets: bool = False) -> JSONObject:
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
        return _export(uid, self.snapshot(uid), self.manager.rules, include_secrets)

    def erase(self, user_id: str) -> list[str]:
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
            return list(erase(uid))

    def transaction(
        self, user_id: str, fn: TransactionFn, *, max_attempts: int | None = None
    ) -> JSONObject:
        """Run ``fn`` on the document and store its result, retrying on conflict.

        ``fn`` gets a private copy of the document and returns the new document
        (or ``None`` to store the copy it changed in place). The result is stored
        only if no other write happened since the read; otherwise ``fn`` runs
        again on the fresh document. ``fn`` may run more than once, so it must
        not have side effects. Preserved fields must come back unchanged. For a
        counter, :meth:`increment` is faster and never retries.

        Raises:
            ConflictError: every attempt lost its race.
            PreservedFieldError: ``fn`` changed a preserved field.
            SerializationError: ``fn`` returned something that is not JSON.
        """
        return self.manager.transaction(user_id, fn, max_attempts=max_attempts).data

    def claim(
        self,
        user_id: str,
        op_id: str | None = None,
        *,
        fingerprint: str | None = None,
        purpose: str = CLAIM_PURPOSE,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = DEFAULT_WAIT,
    ) -> Claim:
        """Claim the user to handle one message, exactly once, one message at a time.

        The claim is taken atomically with a read of the document. While it is
        held, other claims of the same user wait (up to ``wait``), so messages
        of one user are handled one after the other, across processes. A claim
        for an ``op_id`` already handled comes back as a duplicate; a copy of a
        message being handled waits for that handling: a duplicate once it
        commits, claimed if it fails or its process dies (after ``lease``).
        Changes staged on the claim are written with
        :meth:`Claim.commit` in one atomic write that also remembers ``op_id``
        and releases the claim; :meth:`Claim.release` gives it up without
        remembering anything, so a redelivery is handled again.

        Examples:
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
                raises :class:`~chatstate.OpIdReusedError`.
            purpose: The namespace of ``op_id`` (the router uses its own, so
                your ids and its never collide).
            lease: The claim lapses this long after it was taken if its holder
                neither commits nor releases (a crashed process).
            wait: How long to wait while another message of the user is being
                handled before :class:`~chatstate.UserBusyError`.
        """
        core = self.manager.claim(
            user_id, op_id, purpose=purpose, fingerprint=fingerprint, lease=lease, wait=wait
        )
        return Claim(self, core)

    def user(self, user_id: str) -> CachedUser:
        """A :class:`CachedUser` bound to ``user_id``."""
        return CachedUser(user_id, self)

    def ping(self) -> float:
        """Check the backend answers (for health checks); return the latency in seconds.

        Raises:
            BackendUnavailable: the backend cannot be reached.
        """
        ping = getattr(self.manager.backend, "ping", None)
        return float(ping()) if ping is not None else 0.0

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


def _counter_value(doc: JSONObject, path: Path) -> int:
    node: Any = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if type(node) is int else 0


class _ClaimBase:
    """What both claim twins share: the status, the snapshot, staging."""

    def __init__(self, core: _ClaimCore) -> None:
        self._core = core

    @property
    def user_id(self) -> str:
        """The claimed user."""
        return self._core.user_id

    @property
    def op_id(self) -> str | None:
        """The message id the claim is for."""
        return self._core.op_id

    @property
    def status(self) -> Literal["claimed", "duplicate"]:
        """``"claimed"``, or ``"duplicate"`` when the op id was handled already."""
        return "claimed" if self._core.status == "claimed" else "duplicate"

    @property
    def duplicate(self) -> bool:
        """True when the message must not be handled again: do nothing, send nothing."""
        return self._core.status != "claimed"

    @property
    def snapshot(self) -> Snapshot:
        """The user's document and version as the claim found them."""
        return self._core.snapshot

    @property
    def data(self) -> JSONObject:
        """The user's document as the claim found it."""
        return self._core.snapshot.data

    @property
    def open(self) -> bool:
        """True until the claim is committed or released (False for a duplicate)."""
        return self._core.state == "open"

    def update(self, patch: Mapping[str, Any]) -> None:
        """Stage a merge patch, written at commit (checked now)."""
        self._core.stage_update(patch)

    def assign(self, values: Mapping[Any, Any]) -> None:
        """Stage exact values (see :meth:`StateService.assign`), written at commit."""
        self._core.stage_assign(values)

    def set_preserved(self, path: str | Path, value: Any) -> None:
        """Stage a preserved field (a token), written at commit with the rest."""
        self._core.stage_preserved(path, value)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} user_id={self.user_id!r} status={self.status!r}>"


class Claim(_ClaimBase):
    """A user claimed for one message; see :meth:`StateService.claim`.

    Use it as a context manager: leaving the block commits what was staged, an
    exception releases the claim (nothing is written, the message may come again).
    """

    def __init__(self, service: StateService, core: _ClaimCore) -> None:
        super().__init__(core)
        self._service = service

    def commit(self) -> Outcome:
        """Write the staged changes, remember the op id, release the claim: one atomic write.

        Returns:
            The outcome: ``"applied"``, or ``"duplicate"`` when another handler
            took over a lapsed claim and handled the message first.

        Raises:
            ClaimLostError: the claim lapsed and another handler holds the user.
            UsageError: the claim is a duplicate, or was committed or released.
        """
        return self._service.manager.commit(self._core)

    def release(self) -> None:
        """Give the claim up without writing or remembering anything."""
        self._service.manager.release(self._core)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.open:
            return
        if exc is None:
            self.commit()
            return
        try:
            self.release()
        except Exception:  # the claim lapses on its own; the caller's error matters more
            log.warning("could not release the claim on user %r", self.user_id, exc_info=True)


class AsyncClaim(_ClaimBase):
    """The asyncio twin of :class:`Claim` (``async with``)."""

    def __init__(self, service: AsyncStateService, core: _ClaimCore) -> None:
        super().__init__(core)
        self._service = service

    async def commit(self) -> Outcome:
        """See :meth:`Claim.commit`."""
        return await self._service.manager.commit(self._core)

    async def release(self) -> None:
        """See :meth:`Claim.release`."""
        await self._service.manager.release(self._core)

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


class AsyncStateService:
    """The asyncio twin of :class:`StateService`: the same methods, awaitable.

    Args:
        backend: An async backend; a new :class:`AsyncMemoryBackend` when omitted.
        rules: See :class:`StateService`.
        ttl: See :class:`StateService`.
        dedupe_window: See :class:`StateService`.
        max_attempts: See :class:`StateService`.
        retry: See :class:`StateService`.
        claim_retry: See :class:`StateService`.
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
        """See :meth:`StateService.get`."""
        return (await self.manager.load(user_id)).data

    async def snapshot(self, user_id: str) -> Snapshot:
        """See :meth:`StateService.snapshot`."""
        return await self.manager.load(user_id)

    async def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> Document:
        """See :meth:`StateService.update`."""
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
        """See :meth:`StateService.update_once`."""
        make = lambda: self.manager.update_write(patch, op_id, if_version, fingerprint)  # noqa: E731
        return await self.manager.apply(user_id, UPDATE, make)

    async def assign(
        self, user_id: str, values: Mapping[Any, Any], *, op_id: str | None = None
    ) -> Document:
        """See :meth:`StateService.assign`."""
        make = lambda: self.manager.assign_write(values, op_id)  # noqa: E731
        return self.manager.document(await self.manager.apply(user_id, ASSIGN, make))

    async def increment(
        self, user_id: str, path: str | Path, by: int = 1, *, op_id: str | None = None
    ) -> int:
        """See :meth:`StateService.increment`."""
        make = lambda: self.manager.increment_write(path, by, op_id)  # noqa: E731
        outcome = await self.manager.apply(user_id, INCREMENT, make)
        if outcome.value is not None:
            return int(outcome.value)
        return _counter_value(await self.get(user_id), self.rules.increment_path(path))

    async def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """See :meth:`StateService.set_preserved`."""
        make = lambda: self.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self.manager.document(await self.manager.apply(user_id, SET_PRESERVED, make))

    async def reset(self, user_id: str, *, op_id: str | None = None) -> Document:
        """See :meth:`StateService.reset`."""
        make = lambda: self.manager.reset_write(op_id)  # noqa: E731
        return self.manager.document(await self.manager.apply(user_id, RESET, make))

    async def delete(self, user_id: str, *, op_id: str | None = None, force: bool = False) -> None:
        """See :meth:`StateService.delete`."""
        make = lambda: self.manager.delete_write(op_id, force=force)  # noqa: E731
        await self.manager.apply(user_id, DELETE, make)

    async def export(self, user_id: str, *, include_secrets: bool = False) -> JSONObject:
        """See :meth:`StateService.export`."""
        uid = self.manager.user_id(user_id)
        return _export(uid, await self.snapshot(uid), self.manager.rules, include_secrets)

    async def erase(self, user_id: str) -> list[str]:
        """See :meth:`StateService.erase`."""
        uid = self.manager.user_id(user_id)
        erase = _eraser(self.manager.backend)
        with failing(ERASE):
            return list(await erase(uid))

    async def transaction(
        self,
        user_id: str,
        fn: Callable[[JSONObject], JSONObject | Awaitable[JSONObject | None] | None],
        *,
        max_attempts: int | None = None,
    ) -> JSONObject:
        """See :meth:`StateService.transaction`; ``fn`` may also be async."""
        return (await self.manager.transaction(user_id, fn, max_attempts=max_attempts)).data

    async def claim(
        self,
        user_id: str,
        op_id: str | None = None,
        *,
        fingerprint: str | None = None,
        purpose: str = CLAIM_PURPOSE,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = DEFAULT_WAIT,
    ) -> AsyncClaim:
        """See :meth:`StateService.claim` (``async with await svc.claim(...)``)."""
        core = await self.manager.claim(
            user_id, op_id, purpose=purpose, fingerprint=fingerprint, lease=lease, wait=wait
        )
        return AsyncClaim(self, core)

    def user(self, user_id: str) -> AsyncCachedUser:
        """An :class:`AsyncCachedUser` bound to ``user_id``."""
        return AsyncCachedUser(user_id, self)

    async def ping(self) -> float:
        """See :meth:`StateService.ping`."""
        ping = getattr(self.manager.backend, "ping", None)
        return float(await ping()) if ping is not None else 0.0

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

    def __init__(self, snapshot: Snapshot, rules: StateData) -> None:
        self._snapshot = snapshot
        self._rules = rules

    def _store(self, outcome: Outcome) -> Document:
        self._snapshot = outcome.snapshot
        return Document(outcome.snapshot, self._rules.redacted_fields)

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
        token = self._snapshot.data.get(self._rules.token_field)
        return token if isinstance(token, str) else None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} version={self.version} keys={sorted(self.data)}>"


class CachedState(_CachedStateView):
    """A user's document read once; every write goes through and refreshes it."""

    def __init__(self, user: CachedUser, snapshot: Snapshot) -> None:
        super().__init__(snapshot, user.service.rules)
        self._user = user

    def update(self, patch: Mapping[str, Any], *, op_id: str | None = None) -> Document:
        """Write ``patch`` through (see :meth:`StateService.update`)."""
        svc = self._user.service
        return self._store(svc.update_once(self._user.user_id, patch, op_id=op_id))

    def set_preserved(self, path: str | Path, value: Any, *, op_id: str | None = None) -> Document:
        """Write a preserved field through (see :meth:`StateService.set_preserved`)."""
        svc = self._user.service
        make = lambda: svc.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self._store(svc.manager.apply(self._user.user_id, SET_PRESERVED, make))

    def reset(self, *, op_id: str | None = None) -> Document:
        """Reset through (see :meth:`StateService.reset`)."""
        svc = self._user.service
        make = lambda: svc.manager.reset_write(op_id)  # noqa: E731
        return self._store(svc.manager.apply(self._user.user_id, RESET, make))

    def refresh(self) -> JSONObject:
        """Read the document again."""
        self._snapshot = self._user.service.snapshot(self._user.user_id)
        return self._snapshot.data


class CachedUser:
    """One user's state, read at most once per request and written through.

    Examples:
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
        super().__init__(snapshot, user.service.rules)
        self._user = user

    async def update(self, patch: Mapping[str, Any], *, op_id: str | None = None) -> Document:
        """Write ``patch`` through."""
        svc = self._user.service
        return self._store(await svc.update_once(self._user.user_id, patch, op_id=op_id))

    async def set_preserved(
        self, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """Write a preserved field through."""
        svc = self._user.service
        make = lambda: svc.manager.preserved_write(path, value, op_id)  # noqa: E731
        return self._store(await svc.manager.apply(self._user.user_id, SET_PRESERVED, make))

    async def reset(self, *, op_id: str | None = None) -> Document:
        """Reset through."""
        svc = self._user.service
        make = lambda: svc.manager.reset_write(op_id)  # noqa: E731
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
            UsageError: :meth:`load` has not been awaited yet.
        """
        if self._state is None:
            raise UsageError("await AsyncCachedUser.load() before reading .state")
        return self._state

    @property
    def jwt_token(self) -> str | None:
        """The user's JWT from the loaded state, or ``None``."""
        return self.state.jwt_token


class _SyncClaimAsAsync(_ClaimBase):
    """An async face over a sync :class:`Claim` (for the sync router's shared logic)."""

    def __init__(self, claim: Claim) -> None:
        super().__init__(claim._core)  # noqa: SLF001 - the twin wraps the same core
        self._claim = claim

    async def commit(self) -> Outcome:
        """Commit the sync claim."""
        return self._claim.commit()

    async def release(self) -> None:
        """Release the sync claim."""
        self._claim.release()


class SyncServiceAsAsync:
    """An async face over a :class:`StateService` whose coroutines never suspend.

    The sync router drives its shared coroutine logic through it, and the backend
    contract suite uses it so that one test body serves both twins. Every method
    takes exactly the arguments of its :class:`StateService` namesake.
    """

    def __init__(self, service: StateService) -> None:
        self.service = service
        self.rules = service.rules
        self.manager = service.manager

    async def get(self, user_id: str) -> JSONObject:
        """Call :meth:`StateService.get`."""
        return self.service.get(user_id)

    async def snapshot(self, user_id: str) -> Snapshot:
        """Call :meth:`StateService.snapshot`."""
        return self.service.snapshot(user_id)

    async def update(
        self, user_id: str, patch: Mapping[str, Any], *, op_id: str | None = None
    ) -> Document:
        """Call :meth:`StateService.update`."""
        return self.service.update(user_id, patch, op_id=op_id)

    async def update_once(
        self,
        user_id: str,
        patch: Mapping[str, Any],
        *,
        op_id: str | None,
        if_version: int | None = None,
        fingerprint: str | None = None,
    ) -> Outcome:
        """Call :meth:`StateService.update_once`."""
        return self.service.update_once(
            user_id, patch, op_id=op_id, if_version=if_version, fingerprint=fingerprint
        )

    async def assign(
        self, user_id: str, values: Mapping[Any, Any], *, op_id: str | None = None
    ) -> Document:
        """Call :meth:`StateService.assign`."""
        return self.service.assign(user_id, values, op_id=op_id)

    async def increment(
        self, user_id: str, path: str | Path, by: int = 1, *, op_id: str | None = None
    ) -> int:
        """Call :meth:`StateService.increment`."""
        return self.service.increment(user_id, path, by, op_id=op_id)

    async def set_preserved(
        self, user_id: str, path: str | Path, value: Any, *, op_id: str | None = None
    ) -> Document:
        """Call :meth:`StateService.set_preserved`."""
        return self.service.set_preserved(user_id, path, value, op_id=op_id)

    async def reset(self, user_id: str, *, op_id: str | None = None) -> Document:
        """Call :meth:`StateService.reset`."""
        return self.service.reset(user_id, op_id=op_id)

    async def delete(self, user_id: str, *, op_id: str | None = None, force: bool = False) -> None:
        """Call :meth:`StateService.delete`."""
        self.service.delete(user_id, op_id=op_id, force=force)

    async def export(self, user_id: str, *, include_secrets: bool = False) -> JSONObject:
        """Call :meth:`StateService.export`."""
        return self.service.export(user_id, include_secrets=include_secrets)

    async def erase(self, user_id: str) -> list[str]:
        """Call :meth:`StateService.erase`."""
        return self.service.erase(user_id)

    async def transaction(
        self, user_id: str, fn: TransactionFn, *, max_attempts: int | None = None
    ) -> JSONObject:
        """Call :meth:`StateService.transaction`."""
        return self.service.transaction(user_id, fn, max_attempts=max_attempts)

    async def claim(
        self,
        user_id: str,
        op_id: str | None = None,
        *,
        fingerprint: str | None = None,
        purpose: str = CLAIM_PURPOSE,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = DEFAULT_WAIT,
    ) -> _SyncClaimAsAsync:
        """Call :meth:`StateService.claim`."""
        claim = self.service.claim(
            user_id, op_id, fingerprint=fingerprint, purpose=purpose, lease=lease, wait=wait
        )
        return _SyncClaimAsAsync(claim)

    async def ping(self) -> float:
        """Call :meth:`StateService.ping`."""
        return self.service.ping()

    async def aclose(self) -> None:
        """Call :meth:`StateService.close`."""
        self.service.close()
