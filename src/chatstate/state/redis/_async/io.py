"""The Redis backends' I/O that both twins share: one body for each command.

This module is the one body of both twins: ``_sync/io.py`` (``RedisIO``,
under :class:`~chatstate.state.RedisBackend`) is generated from it by
``tools/unasync.py``. Edit this one, then ``make unasync``. What truly differs
(how a command is sent, automatic pipelining, construction, closing) is written
by hand in ``_backends.py``; the deadline shards are read concurrently in the
asyncio twin only, by the ``gathered_*`` pair in ``chatstate/_twins.py``.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.exceptions as rex

from chatstate._retry import Retrying
from chatstate._twins import gathered_async
from chatstate.exceptions import BackendAuthenticationError, BackendError
from chatstate.state._async.leases import hold_lease_async
from chatstate.state._backend import (
    Outcome,
    Snapshot,
    Write,
    check_deadline,
    check_limit,
    new_op_id,
)
from chatstate.state.redis._core import (
    _ERASE_SCRIPT,
    DURABLE_STATUSES,
    TRANSLATED,
    _RedisBackendBase,
    map_redis_errors,
    translate,
    translation,
)
from chatstate.state.redis._pipeline import Tail

__all__ = ["AsyncRedisIO"]

_SCAN_COUNT = 1000


class AsyncRedisIO(_RedisBackendBase):
    """The commands of a Redis backend, over the ``_execute`` its subclass sends them with.

    The public methods of the backends are documented wrappers of these. Every
    command goes through :meth:`_send`, the one place that retries.
    """

    async def _execute(self, route: str, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """Send one command (``route`` is the key that places it); ``NotSent`` if it was not.

        A ``tail`` follows it on the same connection; the reply is then
        ``(reply, the tail's replies)``.
        """
        raise NotImplementedError

    async def _script(self, route: str, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """Run a script by its SHA; after NOSCRIPT (it did not run), send it whole with EVAL.

        EVAL runs the script and caches it again in one step, so a SCRIPT FLUSH
        between a reload and the next EVALSHA (redis-py's way) cannot fail a call.
        """
        try:
            return await self._execute(route, args, tail)
        except rex.NoScriptError as exc:
            self.resolve_retry.report("noscript", exc)
            return await self._execute(route, self._eval_args(args), tail)

    async def _send(
        self,
        key: str,
        args: tuple[Any, ...],
        *,
        script: bool = False,
        write: Write | None = None,
        again: Callable[[], tuple[Any, ...]] | None = None,
        tail: Tail = (),
    ) -> Any:
        """Send one command, retried where that is safe; raise chatstate's errors.

        A ``tail`` follows the command (and each re-send of it) on its
        connection: see :meth:`_write`.

        A command whose connection broke (``CLIENT KILL``, a restart, a reset)
        may have run or not: it is sent again on a new connection under
        ``connection_retry`` (the client's own policy), being idempotent; so is
        one the server refused while loading its data. A ``write`` (``apply``)
        is re-sent instead under ``resolve_retry``, as ``again()`` builds it
        (with its op-log lookup on): its op key and nonce make it apply once,
        and when no re-send gets an answer its outcome is unknown. ``again``
        serves other commands whose re-send must differ too (a lock's release).

        A command that was not sent at all is not retried here (connecting was
        retried by the connection's own ``retry``, under the same policy), except
        as a re-send of a write that may have run.
        """
        reconnecting: Retrying | None = None
        resolving: Retrying | None = None
        lost: BaseException | None = None
        while True:
            try:
                if script:
                    return await self._script(key, args, tail)
                return await self._execute(key, args, tail)
            except TRANSLATED as exc:
                row = translation(exc)
                if row.sent:
                    lost = lost or exc
                    if again is not None:
                        args = again()
                error = translate(exc, key, write, lost=lost)
                retrying: Retrying | None = None
                if write is not None and lost is not None and not row.final:
                    # Once a write may have run, every re-send is part of settling it.
                    resolving = resolving or self.resolve_retry.begin("resolve")
                    retrying = resolving
                elif row.again and self._reconnects:
                    reconnecting = reconnecting or self.connection_retry.begin("redis")
                    retrying = reconnecting
                if retrying is None or not await retrying.aretry(
                    error if retrying is resolving else exc
                ):
                    raise error from exc

    async def _write(
        self,
        key: str,
        args: tuple[Any, ...],
        *,
        script: bool = False,
        write: Write | None = None,
        again: Callable[[], tuple[Any, ...]] | None = None,
    ) -> tuple[Any, list[Any] | None]:
        """:meth:`_send` a write: ``(reply, its wait's replies)``; ``None`` without durability.

        With the backend's ``durability`` the write is followed on its
        connection, in the same round trip, by a ``PUBLISH`` (so the connection
        has written, even where the write found its effect already in place)
        and the ``WAIT``/``WAITAOF`` that covers every earlier write of the
        connection. The caller checks the replies (``_confirm``) once it knows
        the write did or confirmed something.
        """
        if not self._tail:
            return await self._send(key, args, script=script, write=write, again=again), None
        if not self._durability_checked:
            await self._check_aof(key)
        reply, waited = await self._send(
            key, args, script=script, write=write, again=again, tail=self._tail
        )
        return reply, waited

    async def _check_aof(self, key: str) -> None:
        """Before the first write that waits for the AOF: does the server have WAITAOF, and AOF?

        ``WAITAOF 1 0 1`` answers at once (or within 1 ms) where it can, and
        refuses with an error where the server lacks the command or ``appendonly``.
        """
        try:
            await self._send(key, ("WAITAOF", 1, 0, 1))
        except BackendAuthenticationError:
            raise
        except BackendError as exc:
            if isinstance(exc.__cause__, rex.ResponseError):
                raise self._aof_refused(exc.__cause__) from exc
            raise
        self._durability_checked = True

    async def _load(self, user_id: str) -> Snapshot | None:
        key = self.key_scheme.keys(user_id)[0]
        if self._plain_reads:
            raw = await self._send(key, ("HGETALL", key))
            return self._replies.parse_hgetall(raw, key)
        echo = new_op_id()
        raw = await self._send(key, self._load_args(key, echo), script=True)
        return self._replies.parse_load(raw, key, echo)

    async def _apply(self, user_id: str, write: Write) -> Outcome:
        keys = self.key_scheme.keys(user_id)
        raw, waited = await self._write(
            keys[0],
            self._apply_args(write, keys, fresh=True),
            script=True,
            write=write,
            again=functools.partial(self._apply_args, write, keys, fresh=False),
        )
        outcome = self._replies.parse_apply(raw, write, keys[0])  # a refusal wrote nothing
        if outcome.status in DURABLE_STATUSES:
            self._confirm(waited, keys[0], write.op_id or write.op_key)
        return outcome

    async def _erase(self, user_id: str) -> list[str]:
        # Deleting twice deletes the same: a re-send after a lost reply is safe,
        # though it can only report what the first attempt had left.
        keys = self._erase_keys(user_id)
        raw, waited = await self._write(keys[0], ("EVAL", _ERASE_SCRIPT, len(keys), *keys))
        self._confirm(waited, keys[0])
        zrem = 0
        if self.deadline_shards:
            index = self._deadline_shard_key(user_id)
            zrem, waited = await self._write(index, ("ZREM", index, user_id))
            self._confirm(waited, index)
        return self._erased(raw, zrem)

    async def _users(self, prefix: str) -> AsyncIterator[str]:
        """Every user id with a document starting with ``prefix``: SCAN of every primary."""
        scheme = self.key_scheme
        pattern = self._users_pattern(prefix)
        with map_redis_errors("SCAN"):
            async for raw in self.client.scan_iter(match=pattern, count=_SCAN_COUNT):
                parsed = scheme.parse(raw)
                if parsed is not None and parsed.kind == "doc" and parsed.user_id is not None:
                    yield parsed.user_id

    async def _schedule(self, user_id: str, at_ms: int, *, earlier_only: bool) -> None:
        if not self.deadline_shards:
            check_deadline(at_ms)
            return
        args = self._schedule_args(user_id, at_ms, earlier_only)
        # ZADD of one score: the same however often
        _, waited = await self._write(args[1], args)
        self._confirm(waited, args[1])

    async def _unschedule(self, user_id: str) -> None:
        if not self.deadline_shards:
            return
        key = self._deadline_shard_key(user_id)
        _, waited = await self._write(key, ("ZREM", key, user_id))
        self._confirm(waited, key)

    async def _due(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        limit, now_ms = check_limit(limit), check_deadline(now_ms)
        if not self.deadline_shards:
            raise self._no_index()
        replies = await gathered_async(
            self._send(key, self._due_args(key, now_ms, limit)) for key in self.deadline_keys()
        )
        return self._parse_due(replies, limit)

    async def _ping(self) -> float:
        start = time.perf_counter()
        with map_redis_errors("PING"):  # redis-py retries it, under the same policy
            await self.client.ping()
        return time.perf_counter() - start

    @contextlib.asynccontextmanager
    async def _lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> AsyncIterator[None]:
        async with hold_lease_async(AsyncRedisLeases(self), user_id, name, lease=lease, wait=wait):
            yield

    async def _lease(self, user_id: str, name: str, action: str, token: str, lease: float) -> bool:
        """One step of a lock's life (``acquire``, ``renew``, ``release``): True if it held."""
        key = self._lock_key(user_id, name)
        again = None
        if action == "release":
            # Re-sent after a lost reply, a release may find the lock gone by its own first send.
            again = functools.partial(self._lock_args, key, "released", token, lease)
        reply, waited = await self._write(
            key, self._lock_args(key, action, token, lease), script=True, again=again
        )
        if reply:  # it took, renewed or let go of the lock: that must outlive a failover
            self._confirm(waited, key)
        return bool(reply)


class AsyncRedisLeases:
    """A Redis backend's per-user locks, as the lease store ``hold_lease_async`` holds.

    One string key per lock, ``<namespace>:{<id>}:lock:<name>``, in the user's
    hash slot, holding its holder's token with a lease; each step is one run
    of ``LOCK_SCRIPT``, sent through :meth:`AsyncRedisIO._send` like every
    other command.
    """

    def __init__(self, io: AsyncRedisIO) -> None:
        self.io = io

    async def try_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Take the lock for ``token`` if it is free (or ours already: then renew it)."""
        return await self._run(user_id, name, "acquire", token, lease)

    async def renew_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Extend the lock held under ``token`` to ``lease`` from now; False if it was lost."""
        return await self._run(user_id, name, "renew", token, lease)

    async def unlock(self, user_id: str, name: str, token: str) -> bool:
        """Release the lock held under ``token``; False if it was no longer ours."""
        return await self._run(user_id, name, "release", token, 0)

    async def _run(self, user_id: str, name: str, action: str, token: str, lease: float) -> bool:
        return await self.io._lease(user_id, name, action, token, lease)  # noqa: SLF001
