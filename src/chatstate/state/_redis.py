"""Redis and Valkey backends: every write is one EVALSHA of one Lua script.

:class:`_RedisCore` holds what is not I/O (keys, argument packing, reply
decoding, error mapping); :class:`RedisBackend` and :class:`AsyncRedisBackend`
only add the calls to redis-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar
from urllib.parse import quote

import redis
import redis.asyncio
import redis.exceptions as rex
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript, Script
from redis.retry import Retry

from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendUnavailable,
    CorruptStateError,
    OutcomeUnknown,
    StateTooLargeError,
    StoreBusyError,
    StoreFullError,
)
from chatstate.state._backend import Outcome, Snapshot, Write
from chatstate.state._codec import unflatten_joined
from chatstate.state._lua import APPLY_SCRIPT, LOAD_SCRIPT, write_args
from chatstate.state._manager import new_op_id

if TYPE_CHECKING:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

__all__ = ["AsyncRedisBackend", "RedisBackend"]

T = TypeVar("T")

DEFAULT_NAMESPACE: Final = "chatstate"
_SAFE_ID_CHARS: Final = "@+"  # plus quote()'s own: letters, digits and "_.-~"
_STATUSES: Final = {"applied", "duplicate", "conflict"}


def _text(value: bytes | str | int) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise ValueError("namespace must be a non-empty str")
    if any(c in namespace for c in "{}") or not namespace.isprintable():
        raise ValueError("namespace must be printable and hold no '{' or '}'")
    return namespace


def _safe_location(client: Any) -> str:
    """host:port of a client for reprs, never its password."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    except AttributeError:
        return type(client).__name__


def _retryable(error: Exception, inner: Callable[[Exception], bool] | None) -> bool:
    # A refused password stays refused: fail at once instead of after every retry.
    if isinstance(error, rex.AuthenticationError | rex.AuthorizationError):
        return False
    return inner(error) if inner is not None else True


class _Retry(Retry):
    """redis-py's Retry, except that credential errors are never retried."""

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        return super().call_with_retry(
            do, fail, lambda e: _retryable(e, is_retryable), with_failure_count
        )


class _AsyncRetry(AsyncRetry):
    """The asyncio twin of :class:`_Retry`."""

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        return await super().call_with_retry(
            do, fail, lambda e: _retryable(e, is_retryable), with_failure_count
        )


def default_client_options(*, asynchronous: bool) -> dict[str, Any]:
    """Timeouts and retries for clients that chatstate creates itself.

    redis-py re-sends a command after a dropped connection; that is safe for our
    writes because every write carries an operation id the script remembers.
    """
    backoff = ExponentialWithJitterBackoff(base=0.05, cap=1.0)
    retry = _AsyncRetry(backoff, retries=3) if asynchronous else _Retry(backoff, retries=3)
    return {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "retry": retry,
        "health_check_interval": 30,
    }


class _RedisCore:
    """The pure half of the Redis backends."""

    def __init__(self, namespace: str) -> None:
        self.namespace = _check_namespace(namespace)

    def keys(self, user_id: str) -> list[str]:
        """The document key and the operation-id key of a user: one hash slot.

        The user id is percent-encoded (so distinct ids give distinct keys and no
        id can open or close a hash tag) and the encoded id is the hash tag.
        """
        tag = quote(user_id, safe=_SAFE_ID_CHARS)
        base = f"{self.namespace}:{{{tag}}}"
        return [base, base + ":ops"]

    def parse_load(self, reply: Sequence[Any], key: str, echo: str) -> Snapshot | None:
        status = _text(reply[0])
        if status == "corrupt":
            raise self._corrupt(reply)
        if _text(reply[1]) != echo:
            raise BackendError("the reply did not belong to this request; connection dropped")
        version = int(reply[2])
        if version == 0:
            return None
        return Snapshot(self._document(reply, key), version)

    def parse_apply(self, reply: Sequence[Any], write: Write, key: str) -> Outcome:
        status = _text(reply[0])
        if status == "corrupt":
            raise self._corrupt(reply)
        if _text(reply[1]) != write.op_id:
            raise BackendError("the reply did not belong to this request; connection dropped")
        if status == "too_large":
            raise StateTooLargeError(size=int(reply[2]), limit=write.max_bytes)
        if status not in _STATUSES:
            raise BackendError(f"unexpected reply status {status!r} from the script")
        snapshot = Snapshot(self._document(reply, key), int(reply[2]))
        return Outcome(status, snapshot, int(reply[3]))  # type: ignore[arg-type]

    @staticmethod
    def _corrupt(reply: Sequence[Any]) -> CorruptStateError:
        key = _text(reply[1])
        return CorruptStateError(f"{_text(reply[2])} (key {key!r}); nothing was written", key=key)

    @staticmethod
    def _document(reply: Sequence[Any], key: str) -> dict[str, Any]:
        try:
            return unflatten_joined(_text(reply[4]))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptStateError(
                f"the hash does not hold a chatstate document (key {key!r}): {exc}", key=key
            ) from exc


@contextlib.contextmanager
def map_redis_errors(key: str, op_id: str | None = None) -> Iterator[None]:  # noqa: C901, PLR0912 - one flat table of translations
    """Translate redis-py errors into chatstate errors, once, for both twins.

    ``op_id`` marks a write: a connection lost during a write becomes
    :class:`OutcomeUnknown`, since the script may have run.
    """
    try:
        yield
    except (rex.AuthenticationError, rex.AuthorizationError) as exc:
        raise BackendAuthenticationError(
            "the server refused the credentials (check the password or ACL user)"
        ) from exc
    except rex.BusyLoadingError as exc:
        raise StoreBusyError("the server is loading its data set; try again shortly") from exc
    except (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError) as exc:
        if op_id is not None:
            raise OutcomeUnknown(
                f"lost the connection during a write to {key!r} ({type(exc).__name__}); "
                "it may or may not have been applied; retrying with the same op_id is safe",
                op_id=op_id,
            ) from exc
        raise BackendUnavailable(
            f"cannot reach the server ({type(exc).__name__}: {_short(exc)})"
        ) from exc
    except rex.ReadOnlyError as exc:
        raise BackendUnavailable(
            "the server is a read-only replica (a failover in progress?)"
        ) from exc
    except rex.OutOfMemoryError as exc:
        raise StoreFullError(
            "the server is out of memory (maxmemory); nothing was written"
        ) from exc
    except rex.ResponseError as exc:
        message = str(exc)
        if message.startswith("OOM"):
            raise StoreFullError(
                "the server is out of memory (maxmemory); nothing was written"
            ) from exc
        if message.startswith("BUSY"):
            raise StoreBusyError("the server is busy running a script; try again shortly") from exc
        if message.startswith("WRONGTYPE"):
            raise CorruptStateError(
                f"the key holds the wrong type (key {key!r}); nothing was written", key=key
            ) from exc
        raise BackendError(f"the server answered with an error: {_short(exc)}") from exc
    except rex.RedisError as exc:
        raise BackendError(f"the Redis client failed: {type(exc).__name__}: {_short(exc)}") from exc
    except (AttributeError, TypeError, OSError, RuntimeError) as exc:
        # redis-py's cluster clients can fail inside their own connection
        # handling under concurrency; such a failure says nothing about the data.
        if op_id is not None:
            raise OutcomeUnknown(
                f"the Redis client failed during a write to {key!r} ({type(exc).__name__}); "
                "it may or may not have been applied; retrying with the same op_id is safe",
                op_id=op_id,
            ) from exc
        raise BackendUnavailable(f"the Redis client failed ({type(exc).__name__})") from exc


_NOSCRIPT_ATTEMPTS: Final = 5


def _run(script: Script, keys: list[str], args: list[Any]) -> Any:
    """Call a registered script; redis-py reloads it once on NOSCRIPT, we insist.

    A flush can land between redis-py's reload and its second EVALSHA (seen
    under a SCRIPT FLUSH loop). NOSCRIPT means the script did not run, so
    calling again is always safe.
    """
    for attempt in range(_NOSCRIPT_ATTEMPTS):
        try:
            return script(keys=keys, args=args)
        except rex.NoScriptError:
            if attempt == _NOSCRIPT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _arun(script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
    """The asyncio twin of :func:`_run`."""
    for attempt in range(_NOSCRIPT_ATTEMPTS):
        try:
            return await script(keys=keys, args=args)
        except rex.NoScriptError:
            if attempt == _NOSCRIPT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _resolve_delay(attempt: int) -> float:
    return float(min(1.0, 0.05 * 2**attempt))


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


class _RedisBackendBase:
    """What the two Redis backends share: construction, keys, repr."""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        resolve_attempts: int = 2,
        _owns_client: bool = False,
    ) -> None:
        self._core = _RedisCore(namespace)
        self.client = client
        self.resolve_attempts = resolve_attempts
        self._owns_client = _owns_client
        self._apply = client.register_script(APPLY_SCRIPT)
        self._load = client.register_script(LOAD_SCRIPT)

    @classmethod
    def _from_url(
        cls, url: str, namespace: str, options: dict[str, Any], *, asynchronous: bool
    ) -> Any:
        cluster = options.pop("cluster", False)
        resolve_attempts = options.pop("resolve_attempts", 2)
        kwargs = {**default_client_options(asynchronous=asynchronous), **options}
        client: Any
        if cluster:
            kwargs.pop("health_check_interval", None)
            if asynchronous:
                from redis.asyncio.cluster import RedisCluster as Cluster  # noqa: PLC0415
            else:
                from redis.cluster import RedisCluster as Cluster  # type: ignore[assignment]  # noqa: PLC0415
            client = Cluster.from_url(url, **kwargs)
        elif asynchronous:
            client = redis.asyncio.Redis.from_url(url, **kwargs)
        else:
            client = redis.Redis.from_url(url, **kwargs)
        return cls(
            client, namespace=namespace, resolve_attempts=resolve_attempts, _owns_client=True
        )

    def __repr__(self) -> str:
        location = _safe_location(self.client)
        return f"<{type(self).__name__} {location} namespace={self._core.namespace!r}>"

    def keys(self, user_id: str) -> list[str]:
        """The Redis keys of a user's data (for an already checked user id)."""
        return self._core.keys(user_id)


class RedisBackend(_RedisBackendBase):
    """Documents in Redis or Valkey (standalone, Sentinel-managed or Cluster).

    Each user's document is a hash ``<namespace>:{<id>}`` and the ids of its
    recent writes a sorted set ``<namespace>:{<id>}:ops``; the braces make both
    keys one Cluster hash slot. Every write and every read is one EVALSHA.

    Args:
        client: A ``redis.Redis`` (for Sentinel: ``Sentinel.master_for(...)``) or
            ``redis.cluster.RedisCluster``. It stays yours: :meth:`close` does not
            close it.
        namespace: Prefix of every key, so that several bots or tenants can share
            one server without seeing each other's data.
        resolve_attempts: How often a write whose outcome is unknown is sent
            again (safely, with its operation id) before ``OutcomeUnknown``.
    """

    client: redis.Redis | RedisCluster

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> Self:
        """Create a client from ``url`` (``redis://``, ``rediss://``, ``unix://``) and own it.

        ``options`` go to ``redis.Redis.from_url`` and override chatstate's
        defaults (5 s timeouts, 3 retries with jittered backoff). Pass
        ``cluster=True`` for a Redis Cluster, and ``resolve_attempts`` to
        change how often a write of unknown outcome is re-sent.
        """
        backend: Self = cls._from_url(url, namespace, options, asynchronous=False)
        return backend

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        doc = self._core.keys(user_id)[0]
        echo = new_op_id()
        with map_redis_errors(doc):
            reply = _run(self._load, [doc], [echo])
        return self._core.parse_load(reply, doc, echo)

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically with one EVALSHA.

        When the outcome is unknown (the connection failed after sending), the
        same write is sent again, up to ``resolve_attempts`` times: its operation
        id makes the script apply it at most once, and a ``"duplicate"`` answer
        tells that the first attempt had landed.
        """
        keys = self._core.keys(user_id)
        args = write_args(write)
        for attempt in range(self.resolve_attempts + 1):
            try:
                with map_redis_errors(keys[0], write.op_id):
                    reply = _run(self._apply, keys, args)
                break
            except OutcomeUnknown:
                if attempt == self.resolve_attempts:
                    raise
                time.sleep(_resolve_delay(attempt))
        return self._core.parse_apply(reply, write, keys[0])

    def close(self) -> None:
        """Close the client if this backend created it."""
        if self._owns_client:
            self.client.close()

    @contextlib.contextmanager
    def lock(self, user_id: str, name: str, *, lease: float, wait: float) -> Iterator[None]:
        """Hold a per-user lock in the user's own hash slot, across processes.

        Built on redis-py's ``Lock`` (``SET NX PX`` and a compare-and-delete
        script). It expires after ``lease`` seconds if its holder dies.

        Raises:
            TimeoutError: the lock was not free within ``wait`` seconds.
        """
        key = f"{self._core.keys(user_id)[0]}:lock:{name}"
        held = self.client.lock(key, timeout=lease, sleep=0.01, blocking_timeout=wait)
        with map_redis_errors(key):
            acquired = held.acquire()
        if not acquired:
            raise TimeoutError(f"another holder kept the {name!r} lock for {wait} s")
        try:
            yield
        finally:
            with map_redis_errors(key), contextlib.suppress(rex.LockError):
                held.release()


class AsyncRedisBackend(_RedisBackendBase):
    """The asyncio twin of :class:`RedisBackend`, over ``redis.asyncio``.

    Args:
        client: A ``redis.asyncio.Redis`` or ``redis.asyncio.cluster.RedisCluster``;
            it stays yours.
        namespace: See :class:`RedisBackend`.
        resolve_attempts: See :class:`RedisBackend`.
    """

    client: redis.asyncio.Redis | AsyncRedisCluster

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> Self:
        """See :meth:`RedisBackend.from_url`."""
        backend: Self = cls._from_url(url, namespace, options, asynchronous=True)
        return backend

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        doc = self._core.keys(user_id)[0]
        echo = new_op_id()
        with map_redis_errors(doc):
            reply = await _arun(self._load, [doc], [echo])
        return self._core.parse_load(reply, doc, echo)

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically with one EVALSHA (see :meth:`RedisBackend.apply`)."""
        keys = self._core.keys(user_id)
        args = write_args(write)
        for attempt in range(self.resolve_attempts + 1):
            try:
                with map_redis_errors(keys[0], write.op_id):
                    reply = await _arun(self._apply, keys, args)
                break
            except OutcomeUnknown:
                if attempt == self.resolve_attempts:
                    raise
                await asyncio.sleep(_resolve_delay(attempt))
        return self._core.parse_apply(reply, write, keys[0])

    async def aclose(self) -> None:
        """Close the client if this backend created it."""
        if self._owns_client:
            await self.client.aclose()

    @contextlib.asynccontextmanager
    async def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> AsyncIterator[None]:
        """The asyncio twin of :meth:`RedisBackend.lock`."""
        key = f"{self._core.keys(user_id)[0]}:lock:{name}"
        held = self.client.lock(key, timeout=lease, sleep=0.01, blocking_timeout=wait)
        with map_redis_errors(key):
            acquired = await held.acquire()
        if not acquired:
            raise TimeoutError(f"another holder kept the {name!r} lock for {wait} s")
        try:
            yield
        finally:
            with map_redis_errors(key), contextlib.suppress(rex.LockError):
                await held.release()
