"""Redis and Valkey backends: every write is one EVALSHA of one Lua script.

``_core`` holds what is not I/O (argument packing, reply decoding, error
mapping) and ``_keys`` the key scheme; the commands both twins send are
written once in ``_async/io.py``, the sync ones generated from it by
``tools/unasync.py``. :class:`RedisBackend` and :class:`AsyncRedisBackend`
add what truly differs: construction, how a command is sent, closing. On a
standalone server (or one Sentinel manages) they send commands on pooled
connections themselves, so they always know whether a write was sent: a write
that never left is never called "unknown". The asyncio backend also pipelines
automatically (see ``_pipeline``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import redis
import redis.asyncio
import redis.exceptions as rex

from chatstate._retry import RetryPolicy
from chatstate.exceptions import ConfigurationError
from chatstate.state._backend import Outcome, Snapshot, Write
from chatstate.state.redis._async.io import AsyncRedisIO
from chatstate.state.redis._core import DEFAULT_NAMESPACE, Durability, _check_client_options

# What chatstate.__main__ reads from this module (the storage layout, the client defaults).
from chatstate.state.redis._core import (
    default_client_options as default_client_options,  # noqa: PLC0414
)
from chatstate.state.redis._core import map_redis_errors as map_redis_errors  # noqa: PLC0414
from chatstate.state.redis._keys import KeyScheme
from chatstate.state.redis._pipeline import (
    AsyncConnections,
    AutoPipeline,
    Connections,
    NotSent,
    Tail,
)
from chatstate.state.redis._sync.io import RedisIO

__all__ = ["AsyncRedisBackend", "RedisBackend"]


@contextlib.contextmanager
def _url_checked() -> Iterator[None]:
    """redis-py's refusal of a URL (a ValueError) as a ConfigurationError.

    Its message names the schemes it takes, never the URL (which may hold a password).
    """
    try:
        yield
    except ConfigurationError:
        raise
    except ValueError as exc:
        raise ConfigurationError(f"not a Redis URL: {exc}") from None


# The options from_url takes for chatstate itself (the rest go to redis-py); the asyncio
# twin also takes pipelining and lanes.
_OWN_OPTIONS = (
    "resolve_attempts",
    "resolve_retry",
    "deadline_shards",
    "key_secret",
    "keys",
    "durability",
)


def _owned_client(
    url: str, options: dict[str, Any], own: tuple[str, ...], *, asynchronous: bool
) -> tuple[Any, dict[str, Any]]:
    """A client made from ``url`` and the options for redis-py; the backend's own options.

    The pool is a blocking one of at most ``max_connections`` (50), which waits
    ``pool_timeout`` (the socket timeout) for a free connection.
    """
    options = dict(options)
    _check_client_options(options)
    cluster = options.pop("cluster", False)
    mine = {name: options.pop(name) for name in own if name in options}
    kwargs = RedisIO._client_kwargs(options, asynchronous=asynchronous)  # noqa: SLF001 - shared
    client: Any
    if cluster:
        if asynchronous:
            from redis.asyncio.cluster import RedisCluster as AsyncCluster  # noqa: PLC0415

            cluster_class: Any = AsyncCluster
        else:
            from redis.cluster import RedisCluster as SyncCluster  # noqa: PLC0415

            cluster_class = SyncCluster
        kwargs.pop("health_check_interval", None)
        kwargs.pop("pool_timeout", None)
        with _url_checked(), map_redis_errors("cluster"):  # the sync client connects here
            client = cluster_class.from_url(url, **kwargs)
        return client, mine
    max_connections = kwargs.pop("max_connections", 50)
    timeout = kwargs.pop("pool_timeout", kwargs.get("socket_timeout"))
    pool_class: Any = (
        redis.asyncio.BlockingConnectionPool if asynchronous else redis.BlockingConnectionPool
    )
    with _url_checked():
        pool = pool_class.from_url(url, max_connections=max_connections, timeout=timeout, **kwargs)
    client = (redis.asyncio.Redis if asynchronous else redis.Redis)(connection_pool=pool)
    return client, mine


class RedisBackend(RedisIO):
    """Documents in Redis or Valkey (standalone, Sentinel-managed or Cluster).

    Each user's document is a hash ``<namespace>:{<id>}`` and its operation log
    a hash ``<namespace>:{<id>}:ops``; the braces make both keys one Cluster
    hash slot. Every write is one EVALSHA; a read is one EVALSHA, or one plain
    HGETALL when hiredis parses the replies.

    Args:
        client: A ``redis.Redis`` (for Sentinel: ``Sentinel.master_for(...)``) or
            ``redis.cluster.RedisCluster``. It stays yours: :meth:`close` does not
            close it.
        namespace: Prefix of every key, so that several bots or tenants can share
            one server without seeing each other's data.
        resolve_attempts: How often a write whose outcome is unknown is sent
            again (safely, with its operation key) before ``OutcomeUnknown``.
        resolve_retry: How those re-sends are spaced and limited (a
            :class:`~chatstate.RetryPolicy`; its ``attempts`` counts the first
            send too); when omitted, ``resolve_attempts`` re-sends 50 ms, 100 ms,
            ... apart (at most 1 s).
        deadline_shards: How many sorted sets ``<namespace>:deadlines:{<n>}``
            hold the index of flow deadlines (each its own Cluster hash slot; a
            user's entry lives in one, chosen by a CRC32 of the user id); 0
            keeps no index.
        key_secret: A secret of at least 16 bytes: keys then carry an
            HMAC-SHA256 of the user id instead of the id (a phone number never
            appears in a key name). Keep it: another secret names other keys.
        keys: The key scheme, instead of ``namespace`` and ``key_secret``:
            a :class:`~chatstate.state.redis.KeyScheme` (the command line
            passes one with ``by_tag=True`` to address users by their keys).
        durability: Wait after every write for replicas and/or the AOF fsync
            (a :class:`~chatstate.state.redis.Durability`); a write not confirmed
            in time raises :class:`~chatstate.exceptions.NotDurableError`.
            ``None`` (the default) acknowledges a write once the primary ran it.
            Not on a Cluster (``ConfigurationError``).
    """

    client: Any  # redis.Redis or redis.cluster.RedisCluster (redis-py's stubs are partial)

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        resolve_attempts: int = 2,
        resolve_retry: RetryPolicy | None = None,
        deadline_shards: int = 16,
        key_secret: str | bytes | None = None,
        keys: KeyScheme | None = None,
        durability: Durability | None = None,
        _owns_client: bool = False,
    ) -> None:
        super().__init__(
            client,
            namespace=namespace,
            resolve_attempts=resolve_attempts,
            resolve_retry=resolve_retry,
            deadline_shards=deadline_shards,
            key_secret=key_secret,
            keys=keys,
            durability=durability,
            _owns_client=_owns_client,
        )
        limits = None if self._cluster else self._pool_limits(client)
        self._conns = None if limits is None else Connections(client.connection_pool, *limits)
        # redis-py's sync RedisCluster retries a command on a broken connection
        # itself (execute_command), under the same policy: not twice.
        self._reconnects = not self._cluster

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> Self:
        """Create a client from ``url`` (``redis://``, ``rediss://``, ``unix://``) and own it.

        ``options`` go to redis-py and override chatstate's defaults (5 s
        timeouts; ``retry``: 3 retries with jittered backoff of every command
        whose connection broke, chatstate's own and redis-py's).
        chatstate keeps at most ``max_connections`` connections (default 50):
        a thread that finds them all busy waits up to ``pool_timeout`` seconds
        (default: ``socket_timeout``) instead of failing, and a write that gets
        no connection at all raises ``BackendUnavailable`` (it was not sent). Pass
        ``cluster=True`` for a Redis Cluster, ``resolve_attempts`` to change
        how often a write of unknown outcome is re-sent, ``deadline_shards``
        to change how many sorted sets hold the deadline index, and
        ``durability`` to wait for replicas or the AOF after every write.

        Raises:
            ConfigurationError: ``url`` is not a Redis URL (the message names
                the schemes, never the URL), or an option is out of range.
        """
        client, own = _owned_client(url, options, _OWN_OPTIONS, asynchronous=False)
        return cls(client, namespace=namespace, _owns_client=True, **own)

    def _execute(self, route: str, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """Send one command; ``NotSent`` when no connection could be had.

        A ``tail`` (the durability wait) follows it on the same connection, in
        the same round trip; the reply is then ``(reply, the tail's replies)``.

        Connections are taken from the client's pool and kept in a small idle
        list of this backend's between commands (the pool's own bookkeeping
        costs more than a round trip's worth of Python here). ``route`` is
        unused: a thread sends its command itself, where the asyncio twin's
        automatic pipeline needs the key to pick the batch.
        """
        del route
        if self._conns is None:  # a Cluster: never with a tail (no durability there)
            try:
                return self.client.execute_command(*args)
            except rex.MaxConnectionsError as exc:
                raise NotSent(str(exc)) from exc
        return self._conns.execute(args, tail)

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        return self._load(user_id)

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically with one EVALSHA.

        When the outcome is unknown (the connection failed after sending), the
        same write is sent again, up to ``resolve_attempts`` times: its
        operation key and nonce make the script apply it at most once, and
        answer ``"applied"`` if the earlier attempt had landed.
        """
        return self._apply(user_id, write)

    def erase(self, user_id: str) -> list[str]:
        """Delete every key chatstate keeps for the user; return what there was.

        One script deletes the document, the operation log, the claim and the
        locks chatstate takes (one hash slot, atomically), then one ``ZREM``
        removes the deadline entry. The names come from
        :data:`~chatstate.state.ERASED_PARTS`.
        """
        return self._erase(user_id)

    def users(self, prefix: str = "") -> Iterator[str]:
        """Every user id with a document starting with ``prefix`` (``SCAN``, never ``KEYS``).

        Scans every primary of a Cluster. As Redis's ``SCAN`` does, a user
        stored for the whole scan is yielded at least once (rarely twice); one
        written or removed meanwhile may or may not be.

        Raises:
            ConfigurationError: the backend has a ``key_secret``: keys hold
                keyed hashes, which do not turn back into user ids.
        """
        return self._users(prefix)

    def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """Index the user's next flow deadline (see :class:`~chatstate.state.DeadlineIndex`).

        One ``ZADD`` (with ``LT`` when ``earlier_only``) to the user's shard of
        the index; needs Redis 6.2 or Valkey.
        """
        self._schedule(user_id, at_ms, earlier_only=earlier_only)

    def unschedule(self, user_id: str) -> None:
        """Remove the user's entry from the deadline index (one ``ZREM``)."""
        self._unschedule(user_id)

    def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """The due entries, earliest first (one ``ZRANGEBYSCORE`` per shard); none removed.

        Raises:
            UsageError: ``deadline_shards=0``: this backend keeps no index.
        """
        return self._due(now_ms, limit)

    def ping(self) -> float:
        """Round-trip the server once; return the latency in seconds.

        Raises:
            BackendUnavailable: the server cannot be reached.
        """
        return self._ping()

    def close(self) -> None:
        """Close chatstate's connections; close the client if this backend created it."""
        if self._conns is not None:
            self._conns.close()
        if self._owns_client:
            self.client.close()
            pool = getattr(self.client, "connection_pool", None)
            if pool is not None:
                pool.disconnect()

    @contextlib.contextmanager
    def lock(self, user_id: str, name: str, *, lease: float, wait: float) -> Iterator[None]:
        """Hold a per-user lock in the user's own hash slot, across processes.

        A key ``<namespace>:{<id>}:lock:<name>`` holding this holder's token,
        taken, renewed and released by one small script each time (every step
        safe to re-send on a broken connection). Its lease is renewed every
        third of ``lease`` while the block runs (from the heartbeat thread), so
        the lock lapses ``lease`` seconds after its holder died or failed to
        release it, and never under a live holder.

        Raises:
            LockTimeoutError: the lock was not free within ``wait`` seconds.
            LockLostError: the lease ran out while the lock was held (the
                server was out of reach for longer than the lease, or the lock
                was erased; another holder may have run meanwhile); raised when
                the block ends without an error of its own.
        """
        with self._lock(user_id, name, lease=lease, wait=wait):
            yield


class AsyncRedisBackend(AsyncRedisIO):
    """The asyncio twin of :class:`RedisBackend`, over ``redis.asyncio``, pipelined.

    Commands that concurrent tasks issue at the same moment go to the server in
    one round trip per connection (per node on a Cluster), each still its own
    atomic script with its own reply and error; a user's commands keep their
    order. ``pipelining=False`` sends each command on its own.

    Args:
        client: A ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``;
            it stays yours.
        namespace: See :class:`RedisBackend`.
        resolve_attempts: See :class:`RedisBackend`.
        resolve_retry: See :class:`RedisBackend`.
        pipelining: Batch concurrent commands (the default).
        lanes: How many batches may be in flight at once (one connection each).
        deadline_shards: See :class:`RedisBackend`.
        key_secret: See :class:`RedisBackend`.
        keys: See :class:`RedisBackend`.
        durability: See :class:`RedisBackend`. With pipelining, a batch of
            writes waits once, after the batch (the wait covers every earlier
            write of its connection).
    """

    client: Any  # redis.asyncio.Redis or its RedisCluster (redis-py's stubs are partial)

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        resolve_attempts: int = 2,
        resolve_retry: RetryPolicy | None = None,
        pipelining: bool = True,
        lanes: int = 4,
        deadline_shards: int = 16,
        key_secret: str | bytes | None = None,
        keys: KeyScheme | None = None,
        durability: Durability | None = None,
        _owns_client: bool = False,
    ) -> None:
        super().__init__(
            client,
            namespace=namespace,
            resolve_attempts=resolve_attempts,
            resolve_retry=resolve_retry,
            deadline_shards=deadline_shards,
            key_secret=key_secret,
            keys=keys,
            durability=durability,
            _owns_client=_owns_client,
        )
        if type(lanes) is not int or lanes < 1:
            raise ConfigurationError("lanes must be a whole number of at least 1")
        self.pipelining = bool(pipelining)
        self._conns = (
            None
            if self._cluster
            else AsyncConnections(client.connection_pool, *self._pool_limits(client))
        )
        self._pipe: AutoPipeline | _ClusterBatcher | None = None
        if self.pipelining:
            self._pipe = (
                _ClusterBatcher(client)
                if self._conns is None
                else AutoPipeline(self._conns, lanes=lanes)
            )

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> Self:
        """See :meth:`RedisBackend.from_url`; also takes ``pipelining`` and ``lanes``."""
        own_options = (*_OWN_OPTIONS, "pipelining", "lanes")
        client, own = _owned_client(url, options, own_options, asynchronous=True)
        return cls(client, namespace=namespace, _owns_client=True, **own)

    async def _execute(self, route: str, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """Send one command; with pipelining, batched with the other tasks' (by ``route``).

        A ``tail`` follows it on the same connection (see :meth:`RedisBackend._execute`).

        Automatic pipelining exists only here: concurrent tasks issue commands at
        the same moment, where a thread of the sync twin waits for each reply.
        """
        if self._pipe is not None and not isinstance(self._pipe, _ClusterBatcher):
            return await self._pipe.call(route, args, tail)
        if self._pipe is not None:  # a Cluster: never with a tail (no durability there)
            return await self._pipe.call(route, args)
        if self._conns is None:
            # One command in a cluster pipeline: redis-py 8.1's async RedisCluster
            # execute_command can write on a connection another task is closing.
            pipe = self.client.pipeline()
            pipe.execute_command(*args)
            try:
                (reply,) = await pipe.execute(raise_on_error=False)
            except rex.MaxConnectionsError as exc:
                raise NotSent(str(exc)) from exc
            if isinstance(reply, rex.ConnectionError):
                # The node's idle connections were likely closed with this one (a
                # server restart, CLIENT KILL): drop them, so that the retry gets a
                # new one (redis-py 7's cluster pipeline hands them out unchecked).
                node = self.client.get_node_from_key(route)
                await node.disconnect_free_connections()
            if isinstance(reply, BaseException):
                raise reply
            return reply
        return await self._conns.execute(args, tail)

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        return await self._load(user_id)

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically with one EVALSHA (see :meth:`RedisBackend.apply`)."""
        return await self._apply(user_id, write)

    async def erase(self, user_id: str) -> list[str]:
        """See :meth:`RedisBackend.erase`."""
        return await self._erase(user_id)

    def users(self, prefix: str = "") -> AsyncIterator[str]:
        """See :meth:`RedisBackend.users` (used with ``async for``)."""
        return self._users(prefix)

    async def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """See :meth:`RedisBackend.schedule`."""
        await self._schedule(user_id, at_ms, earlier_only=earlier_only)

    async def unschedule(self, user_id: str) -> None:
        """See :meth:`RedisBackend.unschedule`."""
        await self._unschedule(user_id)

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """See :meth:`RedisBackend.due` (the shards are read concurrently)."""
        return await self._due(now_ms, limit)

    async def ping(self) -> float:
        """See :meth:`RedisBackend.ping`."""
        return await self._ping()

    async def aclose(self) -> None:
        """Stop the pipeline, and close the client if this backend created it."""
        if self._pipe is not None:
            await self._pipe.aclose()
        if self._conns is not None:
            await self._conns.close()
        if self._owns_client:
            await self.client.aclose()
            pool = getattr(self.client, "connection_pool", None)
            if pool is not None:
                await pool.disconnect()

    @contextlib.asynccontextmanager
    async def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> AsyncIterator[None]:
        """The asyncio twin of :meth:`RedisBackend.lock` (renewed from the event loop)."""
        async with self._lock(user_id, name, lease=lease, wait=wait):
            yield


class _ClusterBatcher:
    """Automatic pipelining on a Cluster: redis-py's cluster pipeline routes each batch.

    One batch at a time keeps every user's commands in order; within a batch
    redis-py sends each node its commands in one round trip.
    """

    def __init__(self, client: Any, *, max_batch: int = 512) -> None:
        self.client = client
        self.max_batch = max_batch
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def call(self, route: str, args: tuple[Any, ...]) -> Any:
        del route  # the cluster pipeline routes by the command's keys
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._queue, self._task, self._loop = [], None, loop
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            batch = [item for item in self._queue[: self.max_batch] if not item[1].done()]
            del self._queue[: self.max_batch]
            if not batch:
                continue
            pipe = self.client.pipeline()
            for args, _ in batch:
                pipe.execute_command(*args)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except rex.MaxConnectionsError as exc:
                error: BaseException = NotSent(str(exc))
                error.__cause__ = exc
                replies = [error] * len(batch)
            except Exception as exc:  # noqa: BLE001 - handed to every caller in the batch
                replies = [exc] * len(batch)
            for (_, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, BaseException):
                    future.set_exception(_fresh(reply))
                else:
                    future.set_result(reply)

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            with contextlib.suppress(BaseException):
                await self._task


def _fresh(exc: BaseException) -> BaseException:
    try:
        fresh = type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - an error type we cannot rebuild
        return exc
    fresh.__cause__ = exc.__cause__
    return fresh
