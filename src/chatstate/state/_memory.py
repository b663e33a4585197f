"""The in-memory backend: the embedded default, for tests, demos and single processes."""

from __future__ import annotations

import contextlib
import heapq
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs

from chatstate._locks import AsyncKeyedLocks, KeyedLocks
from chatstate.state._backend import (
    UNCHANGED,
    Acquire,
    OpLog,
    Outcome,
    Release,
    Snapshot,
    Write,
    apply_write,
    check_deadline,
    check_limit,
    check_prefix,
    clone,
)
from chatstate.typing import JSONObject

__all__ = ["AsyncMemoryBackend", "MemoryBackend"]


@attrs.define(slots=True)
class _User:
    """One user's record: the document (never changed once stored) and the operation log."""

    root: JSONObject | None = None
    version: int = 0
    size: int = 0
    schema: int = 1
    expires_at: float | None = None
    log: OpLog = attrs.Factory(OpLog)
    log_expires_at: float = 0.0
    check_at: float | None = None  # when this user's entry in the expiry heap comes due

    def deadline(self) -> float | None:
        """When something of this user expires next (the document, the log or the claim)."""
        times = [self.log_expires_at] if self.log.records else []
        if self.log.lease is not None:
            times.append(self.log.lease.expires_ms / 1000)
        if self.root is not None and self.expires_at is not None:
            times.append(self.expires_at)
        return min(times) if times else None


def _expire(user: _User, now: float) -> None:
    """Forget what has expired of a user: the document, the ids, the claim (each by its clock)."""
    if user.root is not None and user.expires_at is not None and user.expires_at <= now:
        user.root, user.version, user.size, user.expires_at = None, 0, 0, None
    if user.log.records and user.log_expires_at <= now:
        user.log.records, user.log.seq = {}, 0
    lease = user.log.lease
    if lease is not None and lease.expires_ms <= now * 1000:
        user.log.lease = None


class MemoryBackend:
    """A thread-safe store of documents in this process's memory.

    A stored document is never changed: a write builds the new one, copying
    only the objects on the paths it edits, and every document handed out is a
    private copy made when it is first read. Expired documents are invisible at
    once and their memory is reclaimed on later writes. One lock guards every
    operation and is never held across an ``await``, so a sync and an async
    service may share one ``MemoryBackend`` (see :class:`AsyncMemoryBackend`).

    Args:
        clock: A monotonic clock in seconds; tests pass a fake one to move time
            (expiry, the dedupe window and claims all follow it).
    """

    kind = "memory"
    stores_schema = True

    def describe(self) -> dict[str, Any]:
        """Nothing for traces: no database is called (:class:`~chatstate.observe.Describing`)."""
        return {}

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._users: dict[str, _User] = {}
        self._expiries: list[tuple[float, str]] = []
        self._locks = KeyedLocks()
        self._deadlines: dict[str, int] = {}
        self._deadline_heap: list[tuple[int, str]] = []

    def __repr__(self) -> str:
        return f"<MemoryBackend users={len(self)}>"

    def __len__(self) -> int:
        """How many documents are stored, expired ones not yet reclaimed included."""
        return sum(1 for u in self._users.values() if u.root is not None)

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        with self._lock:
            user = self._users.get(user_id)
            if user is None or user.root is None:
                return None
            if user.expires_at is not None and user.expires_at <= self._clock():
                return None
            root = user.root
            return Snapshot.lazy(user.version, lambda: clone(root), user.schema)

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically."""
        with self._lock:
            now = self._clock()
            if self._expiries and self._expiries[0][0] <= now:
                self._reclaim(now)
            user = self._users.get(user_id) or _User()
            if user.root is not None and user.expires_at is not None and user.expires_at <= now:
                user.root, user.version, user.size, user.expires_at = None, 0, 0, None
            _expire(user, now)
            current = None if user.root is None else Snapshot(user.root, user.version, user.schema)
            result = apply_write(current, user.log, write, int(now * 1000), user.size, shared=True)
            if result.log_changed and not isinstance(write.operation, Acquire | Release):
                # As on Redis: recorded ids live dedupe_ms after the last one; a claim
                # lives by its own lease and keeps nothing else alive.
                user.log_expires_at = now + write.dedupe_ms / 1000
            data = result.data
            if data is not UNCHANGED:
                if data is None:
                    user.root, user.version, user.size, user.expires_at = None, 0, 0, None
                else:
                    assert isinstance(data, dict)
                    user.root, user.version, user.size = data, result.outcome.version, result.size
                    user.schema = result.schema
                    if write.ttl_ms is not None:
                        user.expires_at = now + write.ttl_ms / 1000
            if user.root is None and not user.log.records and user.log.lease is None:
                self._users.pop(user_id, None)
            else:
                self._users[user_id] = user
                self._schedule(user_id, user)
            return result.outcome

    def _schedule(self, user_id: str, user: _User) -> None:
        """Keep one heap entry per user, no later than its next deadline."""
        due = user.deadline()
        if due is not None and (user.check_at is None or due < user.check_at):
            user.check_at = due
            heapq.heappush(self._expiries, (due, user_id))

    def close(self) -> None:
        """Nothing to release; present for the :class:`Backend` protocol."""

    @contextlib.contextmanager
    def lock(self, user_id: str, name: str, *, lease: float, wait: float) -> Iterator[None]:
        """Hold a per-user lock of this process (a single-flight token refresh uses it).

        Args:
            user_id: The user.
            name: Which lock of the user's.
            lease: Unused in memory (a process that dies takes its locks along).
            wait: How long to wait for the lock.

        Raises:
            LockTimeoutError: the lock was not free within ``wait`` seconds.
        """
        del lease
        with self._locks.hold((user_id, name), wait, name):
            yield

    def users(self, prefix: str = "") -> Iterator[str]:
        """Every user id with a live document starting with ``prefix``, in code-point order.

        The ids are read at the first step, under the lock, and yielded after.
        """
        check_prefix(prefix)
        with self._lock:
            now = self._clock()
            found = sorted(
                uid
                for uid, user in self._users.items()
                if user.root is not None
                and uid.startswith(prefix)
                and (user.expires_at is None or user.expires_at > now)
            )
        yield from found

    def erase(self, user_id: str) -> list[str]:
        """Remove everything kept for the user; return what there was.

        The names are those of :data:`~chatstate.state.ERASED_PARTS` that
        existed: the document, its operation ids (a redelivery after an erasure
        is new), a claim and the deadline entry. Locks live in this process
        only and end with their holder.
        """
        with self._lock:
            removed = []
            user = self._users.pop(user_id, None)
            if user is not None:
                _expire(user, self._clock())
                if user.root is not None:
                    removed.append("document")
                if user.log.records:
                    removed.append("operations")
                if user.log.lease is not None:
                    removed.append("claim")
            if self._deadlines.pop(user_id, None) is not None:
                removed.append("deadline")
            return removed

    # -- the deadline index (flow reminders and timeouts) ----------------------------

    def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """Index the user's next deadline at ``at_ms`` (any clock, in milliseconds).

        With ``earlier_only`` an existing entry only ever moves earlier (the
        router then finds the real time when the entry comes due); otherwise it
        is set to ``at_ms``. One entry per user.
        """
        at_ms = check_deadline(at_ms)
        with self._lock:
            current = self._deadlines.get(user_id)
            if current is not None and earlier_only and current <= at_ms:
                return
            self._deadlines[user_id] = at_ms
            heapq.heappush(self._deadline_heap, (at_ms, user_id))

    def unschedule(self, user_id: str) -> None:
        """Remove the user's entry from the deadline index, if any."""
        with self._lock:
            self._deadlines.pop(user_id, None)
            if len(self._deadline_heap) > 64 and len(self._deadline_heap) > 4 * len(
                self._deadlines
            ):
                self._deadline_heap = [(at, u) for u, at in self._deadlines.items()]
                heapq.heapify(self._deadline_heap)

    def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """The entries due at ``now_ms``, earliest first, at most ``limit``; none is removed."""
        limit = check_limit(limit)
        with self._lock:
            heap = self._deadline_heap
            found: list[tuple[str, int]] = []
            while heap and heap[0][0] <= now_ms and len(found) < limit:
                at, user_id = heapq.heappop(heap)
                if self._deadlines.get(user_id) == at and (user_id, at) not in found:
                    found.append((user_id, at))
            for entry in found:
                heapq.heappush(heap, (entry[1], entry[0]))
            return found

    def _reclaim(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            at, user_id = heapq.heappop(self._expiries)
            user = self._users.get(user_id)
            if user is None or user.check_at != at:
                continue  # a stale entry: the user was dropped, or rescheduled earlier
            user.check_at = None
            _expire(user, now)
            if user.root is None and not user.log.records and user.log.lease is None:
                del self._users[user_id]
            else:
                self._schedule(user_id, user)


class AsyncMemoryBackend:
    """The asyncio face of a :class:`MemoryBackend`.

    Args:
        store: The memory backend to share; a new one when omitted.
    """

    kind = "memory"
    stores_schema = True

    def describe(self) -> dict[str, Any]:
        """Nothing for traces: no database is called (:class:`~chatstate.observe.Describing`)."""
        return {}

    def __init__(self, store: MemoryBackend | None = None) -> None:
        self.store = store if store is not None else MemoryBackend()
        self._locks = AsyncKeyedLocks()

    def __repr__(self) -> str:
        return f"<AsyncMemoryBackend users={len(self.store)}>"

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        return self.store.load(user_id)

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically."""
        return self.store.apply(user_id, write)

    async def aclose(self) -> None:
        """Nothing to release; present for the :class:`AsyncBackend` protocol."""

    async def users(self, prefix: str = "") -> AsyncIterator[str]:
        """See :meth:`MemoryBackend.users`."""
        for user_id in self.store.users(prefix):
            yield user_id

    async def erase(self, user_id: str) -> list[str]:
        """See :meth:`MemoryBackend.erase`."""
        return self.store.erase(user_id)

    async def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """See :meth:`MemoryBackend.schedule`."""
        self.store.schedule(user_id, at_ms, earlier_only=earlier_only)

    async def unschedule(self, user_id: str) -> None:
        """See :meth:`MemoryBackend.unschedule`."""
        self.store.unschedule(user_id)

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """See :meth:`MemoryBackend.due`."""
        return self.store.due(now_ms, limit)

    @contextlib.asynccontextmanager
    async def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> AsyncIterator[None]:
        """The asyncio twin of :meth:`MemoryBackend.lock` (tasks of one event loop)."""
        del lease
        async with self._locks.hold((user_id, name), wait, name):
            yield
