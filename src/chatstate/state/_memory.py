"""The in-memory backend: the embedded default, for tests, demos and single processes."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator

import attrs

from chatstate.state._backend import (
    MAX_REMEMBERED_OPS,
    Edits,
    Outcome,
    Snapshot,
    Write,
    apply_operation,
)

__all__ = ["AsyncMemoryBackend", "MemoryBackend"]

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_decode = json.JSONDecoder().decode


@attrs.define
class _Ops:
    versions: OrderedDict[str, int]  # op id -> the version it produced, oldest first
    expires_at: float


@attrs.define
class _Record:
    text: str  # the document as JSON text: a read can never alias stored data
    version: int
    expires_at: float | None
    size: int  # the stored size, kept up to date by each write


class MemoryBackend:
    """A thread-safe store of documents in this process's memory.

    Documents are kept as JSON text, so no object handed to or returned by the
    backend is ever shared with what is stored. Expired documents are invisible
    at once and their memory is reclaimed on later writes. One lock guards every
    operation and is never held across an ``await``, so a sync and an async
    service may share one ``MemoryBackend`` (see :class:`AsyncMemoryBackend`).

    Args:
        clock: A monotonic clock in seconds; tests pass a fake one to move time.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._expiries: list[tuple[float, str]] = []
        self._ops: dict[str, _Ops] = {}
        self._op_expiries: list[tuple[float, str]] = []
        self._user_locks: dict[tuple[str, str], threading.Lock] = {}

    def __repr__(self) -> str:
        return f"<MemoryBackend users={len(self._records)}>"

    def __len__(self) -> int:
        """How many documents are stored, expired ones not yet reclaimed included."""
        return len(self._records)

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        with self._lock:
            record = self._live(user_id, self._clock())
            if record is None:
                return None
            return Snapshot(_decode(record.text), record.version)

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically."""
        with self._lock:
            now = self._clock()
            self._reclaim(now)
            record = self._live(user_id, now)
            current = None if record is None else Snapshot(_decode(record.text), record.version)
            ops = self._ops.get(user_id)
            if ops is not None and write.op_id in ops.versions:
                seen = ops.versions[write.op_id]
                return Outcome("duplicate", current or Snapshot({}, 0), seen)
            size = record.size if record is not None else 0
            status, data, size = apply_operation(current, write.operation, write.max_bytes, size)
            if status == "conflict":
                return Outcome("conflict", current or Snapshot({}, 0), 0)
            if data is None:
                self._records.pop(user_id, None)
                self._remember(user_id, write, 0, now, fresh=True)
                return Outcome("applied", Snapshot({}, 0), 0)
            version = (record.version if record is not None else 0) + 1
            expires_at = None
            if write.ttl_ms is not None:
                expires_at = now + write.ttl_ms / 1000
                heapq.heappush(self._expiries, (expires_at, user_id))
            text = _encode(data)
            self._records[user_id] = _Record(text, version, expires_at, size)
            self._remember(user_id, write, version, now, fresh=False)
            # Edits build fresh objects (compile copies list values), so the result can
            # be handed out as it is; other operations may hold the caller's objects.
            out = data if isinstance(write.operation, Edits) else _decode(text)
            return Outcome("applied", Snapshot(out, version), version)

    def close(self) -> None:
        """Nothing to release; present for the :class:`Backend` protocol."""

    @contextlib.contextmanager
    def lock(self, user_id: str, name: str, *, lease: float, wait: float) -> Iterator[None]:
        """Hold a per-user lock of this process (a single-flight token refresh uses it).

        Args:
            user_id: The user.
            name: Which lock of the user's.
            lease: Unused in memory (a process that dies takes its locks along).
            wait: How long to wait for the lock before ``TimeoutError``.
        """
        del lease
        with self._lock:
            held = self._user_locks.setdefault((user_id, name), threading.Lock())
        if not held.acquire(timeout=wait):
            raise TimeoutError(f"another holder kept the {name!r} lock for {wait} s")
        try:
            yield
        finally:
            held.release()

    def _live(self, user_id: str, now: float) -> _Record | None:
        record = self._records.get(user_id)
        if record is not None and record.expires_at is not None and record.expires_at <= now:
            del self._records[user_id]
            return None
        return record

    def _reclaim(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, user_id = heapq.heappop(self._expiries)
            self._live(user_id, now)
        while self._op_expiries and self._op_expiries[0][0] <= now:
            _, user_id = heapq.heappop(self._op_expiries)
            ops = self._ops.get(user_id)
            if ops is not None and ops.expires_at <= now:
                del self._ops[user_id]

    def _remember(
        self, user_id: str, write: Write, version: int, now: float, *, fresh: bool
    ) -> None:
        """Remember an op id, as the Redis script does: newest 128, until idle for dedupe_ms."""
        ops = None if fresh else self._ops.get(user_id)
        if ops is None or ops.expires_at <= now:
            ops = self._ops[user_id] = _Ops(OrderedDict(), 0.0)
        ops.versions[write.op_id] = version
        while len(ops.versions) > MAX_REMEMBERED_OPS:
            ops.versions.popitem(last=False)
        ops.expires_at = now + write.dedupe_ms / 1000
        heapq.heappush(self._op_expiries, (ops.expires_at, user_id))


class AsyncMemoryBackend:
    """The asyncio face of a :class:`MemoryBackend`.

    Args:
        store: The memory backend to share; a new one when omitted.
    """

    def __init__(self, store: MemoryBackend | None = None) -> None:
        self.store = store if store is not None else MemoryBackend()
        self._locks: dict[tuple[int, str, str], asyncio.Lock] = {}

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

    @contextlib.asynccontextmanager
    async def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> AsyncIterator[None]:
        """The asyncio twin of :meth:`MemoryBackend.lock` (tasks of one event loop)."""
        del lease
        key = (id(asyncio.get_running_loop()), user_id, name)
        held = self._locks.setdefault(key, asyncio.Lock())
        try:
            await asyncio.wait_for(held.acquire(), wait)
        except TimeoutError:
            raise TimeoutError(f"another holder kept the {name!r} lock for {wait} s") from None
        try:
            yield
        finally:
            held.release()
