"""The state manager's I/O: the backend calls around the pure :class:`_ManagerCore`.

This module is the one body of both twins: ``_sync/manager.py`` (``StateManager``)
is generated from it by ``tools/unasync.py``. Edit this one, then ``make unasync``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from chatstate import observe as _observe
from chatstate._actions import failing, relabel
from chatstate._durations import to_ms
from chatstate._retry import RetryPolicy
from chatstate._twins import resolved_async
from chatstate.exceptions import OutcomeUnknown, StateError, StateTooLargeError
from chatstate.state._backend import SCHEMA_REFUSALS, Outcome, Snapshot, Write
from chatstate.state._manager import (
    CLAIM,
    COMMIT,
    DEFAULT_DEDUPE,
    READ,
    TRANSACTION,
    AsyncTransactionFn,
    _attempts,
    _ClaimCore,
    _ManagerCore,
    check_backend_async,
    operation_name,
    outcome_name,
)
from chatstate.state._protocols import AsyncBackend
from chatstate.state._rules import StateData, copy_json

__all__ = ["AsyncStateManager"]

F = TypeVar("F", bound=Callable[..., Any])


def observed_async(operation: str | None = None) -> Callable[[F], F]:
    """Report a manager method to the observers (:mod:`chatstate.observe`), if any.

    With no observer registered this costs one truth test. ``operation`` names
    the operation; ``None`` takes it from the method's ``action`` argument.
    """

    def wrap(method: F) -> F:
        @functools.wraps(method)
        async def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not _observe._observers:  # noqa: SLF001 - the hot path's one check
                return await method(self, *args, **kwargs)
            watch = _observe.Watch(operation_name(operation, args), self.backend)
            try:
                result = await method(self, *args, **kwargs)
            except BaseException as exc:
                watch.end("error", exc)
                raise
            watch.end(outcome_name(result))
            return result

        return cast("F", run)

    return wrap


class AsyncStateManager(_ManagerCore):
    """Applies state operations atomically on a backend of its own kind (sync or asyncio).

    Args:
        backend: Where documents live.
        rules: The merge rules; ``StateData()`` when omitted.
        ttl: If set, a document expires this long after its last write.
        dedupe_window: How long operation ids are remembered after a user's last write.
        max_attempts: How often a transaction tries before ``ConflictError``
            (8 when omitted); a shorthand for ``retry=RetryPolicy(attempts=...)``.
        retry: How a transaction that lost its race tries again (attempts,
            budget, backoff, hook); when omitted, 8 attempts 1 to 50 ms apart.
        claim_retry: How a claim that found the user busy asks again within
            its ``wait`` (its budget); when omitted, every 2 to 50 ms.

    Raises:
        UsageError: ``backend`` is of the other kind (asyncio for the sync
            manager, sync for the asyncio one).
        ConfigurationError: an option is out of range.
    """

    def __init__(
        self,
        backend: AsyncBackend,
        rules: StateData | None = None,
        *,
        ttl: float | timedelta | None = None,
        dedupe_window: float | timedelta = DEFAULT_DEDUPE,
        max_attempts: int | None = None,
        retry: RetryPolicy | None = None,
        claim_retry: RetryPolicy | None = None,
    ) -> None:
        check_backend_async(backend)
        super().__init__(
            rules,
            ttl,
            dedupe_window,
            max_attempts,
            backend,
            retry=retry,
            claim_retry=claim_retry,
        )
        self.backend = backend

    def __repr__(self) -> str:
        return f"<AsyncStateManager backend={self.backend!r}>"

    @observed_async("get")
    async def load(self, user_id: str) -> Snapshot:
        """Return the user's document and version (``{}`` and 0 when there is none).

        A document at an older schema is migrated and stored first.
        """
        try:
            uid = self.user_id(user_id)
            snapshot = await self.backend.load(uid) or Snapshot({}, 0)
            if self.cipher is not None:
                snapshot = self.reveal(uid, snapshot)
            if self.schema is not None and self.needs_migration(uid, snapshot):
                snapshot = await self.migrate_stored(uid, snapshot)
        except StateError as exc:
            relabel(exc, READ)
            raise
        return snapshot

    @observed_async()
    async def apply(self, user_id: str, action: str, make: Callable[[], Write]) -> Outcome:
        """Validate, then apply one write; errors start with ``action``."""
        try:
            uid = self.user_id(user_id)
            write = make()
            if self.cipher is not None:
                write = self.seal(uid, write)
            outcome = await self.backend.apply(uid, write)
            if outcome.status in SCHEMA_REFUSALS:
                outcome = await self.resend_migrated(uid, write, outcome)
            return outcome if self.cipher is None else self.revealed(uid, outcome)
        except StateError as exc:
            relabel(exc, action)
            raise

    async def migrate_stored(self, user_id: str, snapshot: Snapshot) -> Snapshot:
        """Migrate the stored document read as ``snapshot`` and store it (compare-and-set).

        A writer that changed it meanwhile wins: the document is read again and
        migrated again, up to ``max_attempts`` times.

        Raises:
            MigrationError: a migration failed; nothing was written.
            SchemaVersionError: the document is (now) at a newer schema.
            ConflictError: it kept changing.
        """
        retrying = None
        while True:
            data = self.migrated(user_id, snapshot)
            write = self.seal(user_id, self.migration_write(snapshot, data))
            try:
                outcome = await self.backend.apply(user_id, write)
            except StateTooLargeError as exc:
                raise self.too_large(user_id, snapshot, exc) from exc
            if outcome.status == "applied":
                return self.reveal(user_id, outcome.snapshot)
            if outcome.status == "newer_schema":
                raise self.newer(user_id, outcome.value)
            snapshot = self.reveal(user_id, await self.backend.load(user_id) or Snapshot({}, 0))
            if not self.needs_migration(user_id, snapshot):
                return snapshot
            if retrying is None:
                retrying = self.retry.begin("migration")
            if not await retrying.aretry("conflict"):
                raise self.conflict(retrying.attempt)

    async def resend_migrated(self, user_id: str, write: Write, outcome: Outcome) -> Outcome:
        """Answer a write refused for its schema: migrate the document, then send it again.

        The refused write was not remembered, so sending it again (same op key
        and nonce) applies it once.
        """
        for _ in range(self.resend_limit):
            if outcome.status == "newer_schema":
                raise self.newer(user_id, outcome.value)
            if outcome.status != "stale_schema":
                return outcome
            snapshot = self.reveal(user_id, await self.backend.load(user_id) or Snapshot({}, 0))
            if self.needs_migration(user_id, snapshot):
                await self.migrate_stored(user_id, snapshot)
            outcome = await self.backend.apply(user_id, write)
        if outcome.status in SCHEMA_REFUSALS:
            raise self.conflict(self.resend_limit)
        return outcome

    @observed_async("transaction")
    async def transaction(
        self, user_id: str, fn: AsyncTransactionFn, *, max_attempts: int | None = None
    ) -> Snapshot:
        """Run ``fn`` on the document and store its result if nothing changed meanwhile.

        See :meth:`chatstate.AsyncStateService.transaction`.
        """
        if max_attempts is not None:
            _attempts(max_attempts)  # refused before anything runs, not at the first conflict
        with failing(TRANSACTION):
            uid = self.user_id(user_id)
            stored: Snapshot | None = await self.backend.load(uid) or Snapshot({}, 0)
            assert stored is not None
            current = self.reveal(uid, stored)
            retrying = None
            while True:
                if self.schema is not None and self.needs_migration(uid, current):
                    current = await self.migrate_stored(uid, current)
                    stored = None  # its ciphertexts are not at hand: seal afresh
                draft = copy_json(current.data)
                result = await resolved_async(fn(draft))
                write = self.seal(uid, self.replace_write(current, draft, result), stored)
                outcome = await self.backend.apply(uid, write)
                if outcome.status == "newer_schema":
                    raise self.newer(uid, outcome.value)
                stored = outcome.snapshot
                outcome = self.revealed(uid, outcome)
                if outcome.status != "conflict":
                    return outcome.snapshot
                current = outcome.snapshot
                if retrying is None:
                    retrying = self.retrying(max_attempts)
                if not await retrying.aretry("conflict"):
                    raise self.conflict(retrying.attempt)

    @observed_async("claim")
    async def claim(
        self,
        user_id: str,
        op_id: str | None,
        *,
        purpose: str,
        fingerprint: str | None,
        lease: float | timedelta,
        wait: float | timedelta,
    ) -> _ClaimCore:
        """Take the user's claim for ``op_id``, waiting up to ``wait`` while another holds it."""
        with failing(CLAIM):
            uid = self.user_id(user_id)
            lease_ms = to_ms(lease, "lease")
            wait_ms = to_ms(wait, "wait") if wait else 0
            assert lease_ms is not None
            write = self.acquire_write(
                op_id, purpose=purpose, fingerprint=fingerprint, lease_ms=lease_ms
            )
            retrying = None
            while True:
                outcome = await self.backend.apply(uid, write)
                if outcome.status != "busy":
                    if self.cipher is not None:
                        outcome = self.revealed(uid, outcome)
                    claim = _ClaimCore(self, uid, write, outcome)
                    claim.lease = lease_ms / 1000
                    if self.schema is not None:
                        await self._migrate_claimed(claim)
                    return claim
                if retrying is None:
                    retrying = self.claim_retrying(wait_ms or 0)
                if not await retrying.aretry("busy", at_most=outcome.retry_after_ms / 1000):
                    raise self.busy(outcome, retrying.elapsed)

    @observed_async("commit")
    async def commit(self, claim: _ClaimCore, *, keep: bool = False) -> Outcome:
        """Write the claim's staged changes, remember its op id and release it.

        With ``keep`` the claim stays held after the write, for a follow-up
        commit or a release. A refused commit (too large, corrupt data, nothing
        sent) releases the claim; after ``OutcomeUnknown`` the claim stays open
        so that calling ``commit()`` again settles it.
        """
        with failing(COMMIT):
            claim._open()  # noqa: SLF001 - the claim's own check
            try:
                write = self.commit_write(claim, keep=keep)
                if self.cipher is not None:
                    write = self.seal(claim.user_id, write)
                outcome = await self.backend.apply(claim.user_id, write)
                if outcome.status in SCHEMA_REFUSALS:
                    outcome = await self.resend_migrated(claim.user_id, write, outcome)
            except OutcomeUnknown:
                raise
            except StateError:
                with contextlib.suppress(StateError):
                    await self.release(claim)
                raise
            if keep and outcome.status == "duplicate":
                # Another handler took over a lapsed claim and committed first; a
                # renewal may have taken the user back meanwhile: let go of it.
                with contextlib.suppress(StateError):
                    await self.backend.apply(claim.user_id, self.release_write(claim))
            return claim.settle_commit(outcome, keep=keep)

    @observed_async("renew")
    async def renew(self, claim: _ClaimCore, lease: float | timedelta) -> Outcome:
        """Extend the claim's lease to ``lease`` from now: ``"claimed"``, or ``"lost"``.

        ``"lost"``: the claim is no longer held (it lapsed, or was committed or
        released meanwhile); a renewal never takes a claim back.
        """
        lease_ms = to_ms(lease, "lease")
        assert lease_ms is not None
        claim._open()  # noqa: SLF001 - the claim's own check
        with failing(CLAIM):
            return await self.backend.apply(claim.user_id, self.renew_write(claim, lease_ms))

    async def _migrate_claimed(self, claim: _ClaimCore) -> None:
        """Hand the claim's holder a migrated document (releasing the claim on failure)."""
        try:
            if self.needs_migration(claim.user_id, claim.snapshot):
                claim.snapshot = await self.migrate_stored(claim.user_id, claim.snapshot)
        except StateError:
            with contextlib.suppress(StateError):
                await self.release(claim)
            raise

    @observed_async("release")
    async def release(self, claim: _ClaimCore) -> None:
        """Give the claim up without recording anything (the message may come again)."""
        if claim.state != "open":
            return
        claim.state = "done"
        with failing(COMMIT):
            await self.backend.apply(claim.user_id, self.release_write(claim))

    async def aclose(self) -> None:
        """Close the backend."""
        await self.backend.aclose()
