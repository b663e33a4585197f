# Generated from src/chatstate/state/_async/redis.py by tools/unasync.py: do not edit.
"""The Redis backends' I/O that both twins share: one body for each command.

This module is the one body of both twins: ``_sync/redis.py`` (``RedisIO``,
under :class:`~chatstate.state.RedisBackend`) is generated from it by
``tools/unasync.py``. Edit this one, then ``make unasync``. What truly differs
(how a command is sent, automatic pipelining, construction, closing) is written
by hand in ``state/_redis.py``; the deadline shards are read concurrently in the
asyncio twin only, by the ``gathered_*`` pair in ``chatstate/_twins.py``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import redis.exceptions as rex

from chatstate._twins import gathered_sync
from chatstate.exceptions import LockTimeoutError, OutcomeUnknown
from chatstate.state._backend import (
    Outcome,
    Snapshot,
    Write,
    check_deadline,
    check_limit,
    new_op_id,
)
from chatstate.state._redis_core import (
    _ERASE_SCRIPT,
    _lock_lost,
    _RedisBackendBase,
    log,
    map_redis_errors,
)

__all__ = ["RedisIO"]


class RedisIO(_RedisBackendBase):
    """The commands of a Redis backend, over the ``_execute`` its subclass sends them with.

    The public methods of the backends are documented wrappers of these.
    """

    def _execute(self, route: str, args: tuple[Any, ...]) -> Any:
        """Send one command (``route`` is the key that places it); ``NotSent`` if it was not."""
        raise NotImplementedError

    def _script(self, route: str, args: tuple[Any, ...]) -> Any:
        """Run a script by its SHA; after NOSCRIPT (it did not run), send it whole with EVAL.

        EVAL runs the script and caches it again in one step, so a SCRIPT FLUSH
        between a reload and the next EVALSHA (redis-py's way) cannot fail a call.
        """
        try:
            return self._execute(route, args)
        except rex.NoScriptError as exc:
            self.resolve_retry.report("noscript", exc)
            return self._execute(route, self._eval_args(args))

    def _load(self, user_id: str) -> Snapshot | None:
        key = self._core.keys(user_id)[0]
        if self._plain_reads:
            with map_redis_errors(key):
                raw = self._execute(key, ("HGETALL", key))
            return self._core.parse_hgetall(raw, key)
        echo = new_op_id()
        with map_redis_errors(key):
            raw = self._script(key, self._load_args(key, echo))
        return self._core.parse_load(raw, key, echo)

    def _apply(self, user_id: str, write: Write) -> Outcome:
        keys = self._core.keys(user_id)
        retrying = None
        while True:
            args = self._apply_args(write, keys, fresh=retrying is None)
            try:
                with map_redis_errors(keys[0], write, unknown=retrying is not None):
                    raw = self._script(keys[0], args)
                break
            except OutcomeUnknown as exc:
                if retrying is None:
                    retrying = self.resolve_retry.begin("resolve")
                if not retrying.retry(exc):
                    raise
        return self._core.parse_apply(raw, write, keys[0])

    def _erase(self, user_id: str) -> list[str]:
        keys = self._erase_keys(user_id)
        with map_redis_errors(keys[0]):
            raw = self._execute(keys[0], ("EVAL", _ERASE_SCRIPT, len(keys), *keys))
        zrem = 0
        if self.deadline_shards:
            index = self._deadline_shard_key(user_id)
            with map_redis_errors(index):
                zrem = self._execute(index, ("ZREM", index, user_id))
        return self._erased(raw, zrem)

    def _schedule(self, user_id: str, at_ms: int, *, earlier_only: bool) -> None:
        if not self.deadline_shards:
            check_deadline(at_ms)
            return
        args = self._schedule_args(user_id, at_ms, earlier_only)
        with map_redis_errors(args[1]):
            self._execute(args[1], args)

    def _unschedule(self, user_id: str) -> None:
        if not self.deadline_shards:
            return
        key = self._deadline_shard_key(user_id)
        with map_redis_errors(key):
            self._execute(key, ("ZREM", key, user_id))

    def _due(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        limit, now_ms = check_limit(limit), check_deadline(now_ms)
        if not self.deadline_shards:
            raise self._no_index()

        def read(key: str) -> Any:
            with map_redis_errors(key):
                return self._execute(key, self._due_args(key, now_ms, limit))

        replies = gathered_sync(read(key) for key in self.deadline_keys())
        return self._parse_due(replies, limit)

    def _ping(self) -> float:
        start = time.perf_counter()
        with map_redis_errors("PING"):
            self.client.ping()
        return time.perf_counter() - start

    @contextlib.contextmanager
    def _lock(self, user_id: str, name: str, *, lease: float, wait: float) -> Iterator[None]:
        key = f"{self._core.keys(user_id)[0]}:lock:{name}"
        held = self.client.lock(key, timeout=lease, sleep=0.01, blocking_timeout=wait)
        with map_redis_errors(key):
            acquired = held.acquire()
        if not acquired:
            raise LockTimeoutError(f"another holder kept the {name!r} lock for {wait} s")
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            lost = False
            try:
                with map_redis_errors(key):
                    try:
                        held.release()
                    except rex.LockNotOwnedError:
                        lost = True
                    except rex.LockError:
                        pass
            except Exception:
                if not failed:
                    raise
                # The block's own error matters more; the lock lapses by itself.
                log.warning("could not release the %r lock of a failed block", name)
            if lost and not failed:
                raise _lock_lost(name, lease)
