"""Redis and Valkey backends: every write is one EVALSHA of one Lua script.

:class:`_RedisCore` holds what is not I/O (keys, argument packing, reply
decoding, error mapping); :class:`RedisBackend` and :class:`AsyncRedisBackend`
only add the calls to redis-py. On a standalone server (or one Sentinel
manages) they send commands on pooled connections themselves, so they always
know whether a write was sent: a write that never left is never called
"unknown". The asyncio backend also pipelines automatically (see ``_pipeline``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import logging
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote

import attrs
import redis
import redis.asyncio
import redis.exceptions as rex

from chatstate._retry import REDIS_CLIENT, RESOLVE, RetryPolicy
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendPermissionError,
    BackendUnavailable,
    ConfigurationError,
    CorruptStateError,
    LockLostError,
    LockTimeoutError,
    OpIdReusedError,
    OutcomeUnknown,
    StateTooLargeError,
    StoreBusyError,
    StoreFullError,
    UsageError,
)
from chatstate.state._backend import (
    ERASED_PARTS,
    Delete,
    Edits,
    Increment,
    Outcome,
    Replace,
    Reset,
    Snapshot,
    Write,
    check_deadline,
    check_limit,
    corrupt,
    counter_not_integer,
    counter_overflow,
    new_op_id,
)
from chatstate.state._codec import unflatten_columns, unflatten_parts
from chatstate.state._lua import APPLY_SCRIPT, LOAD_SCRIPT, write_args
from chatstate.state._pipeline import AsyncConnections, AutoPipeline, Connections, NotSent
from chatstate.state._redis_retry import AsyncPolicyRetry, PolicyRetry

__all__ = ["AsyncRedisBackend", "RedisBackend"]

log = logging.getLogger("chatstate.redis")

T = TypeVar("T")

DEFAULT_NAMESPACE: Final = "chatstate"
LOCK_NAMES: Final = ("jwt-refresh", "aiogram")
"""The lock names chatstate itself takes (token refresh, aiogram's event isolation)."""

# Deletes a user's keys (one hash slot) in one atomic step and says which existed.
_ERASE_SCRIPT: Final = """
local parts = {'document', 'operations', 'claim'}
local out = {}
for i = 1, #KEYS do
  if redis.call('DEL', KEYS[i]) == 1 then
    out[#out + 1] = parts[i] or 'lock'
  end
end
return out
"""
_SCHEMA_REFUSALS: Final = frozenset({"stale_schema", "newer_schema"})
_SAFE_ID_CHARS: Final = "@+"  # plus quote()'s own: letters, digits and "_.-~"
_STATUSES: Final = frozenset(
    {
        "applied",
        "duplicate",
        "conflict",
        "claimed",
        "busy",
        "released",
        "lost",
        "stale_schema",
        "newer_schema",
    }
)


def _check_namespace(namespace: object) -> str:
    if not isinstance(namespace, str) or not namespace:
        raise ConfigurationError("namespace must be a non-empty str")
    if any(c in namespace for c in "{}") or not namespace.isprintable():
        raise ConfigurationError("namespace must be printable and hold no '{' or '}'")
    return namespace


def _safe_location(client: Any) -> str:
    """host:port of a client for reprs, never its password."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    except AttributeError:
        return type(client).__name__


def default_client_options(*, asynchronous: bool) -> dict[str, Any]:
    """Timeouts and retries for clients that chatstate creates itself.

    redis-py's own retries apply to the commands chatstate leaves to it (locks,
    ``ping``, Cluster routing); chatstate re-sends its scripts itself, safely,
    because every write carries an operation key and a nonce.
    """
    return {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "retry": _redis_retry(REDIS_CLIENT, asynchronous=asynchronous),
        "health_check_interval": 30,
    }


def _redis_retry(policy: RetryPolicy, *, asynchronous: bool) -> PolicyRetry | AsyncPolicyRetry:
    """redis-py's ``retry`` option for a policy (refused credentials are never retried)."""
    return AsyncPolicyRetry(policy) if asynchronous else PolicyRetry(policy)


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8")
    if isinstance(raw, str):
        return raw
    raise TypeError(f"a script replied with a {type(raw).__name__}")


@functools.lru_cache(maxsize=16384)
def _keys(namespace: str, user_id: str) -> tuple[str, str, str]:
    base = f"{namespace}:{{{quote(user_id, safe=_SAFE_ID_CHARS)}}}"
    return base, base + ":ops", base + ":claim"


@functools.lru_cache(maxsize=16384)
def _hashed_keys(namespace: str, secret: bytes, user_id: str) -> tuple[str, str, str]:
    digest = hmac.new(secret, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    tag = "#" + base64.b32encode(digest[:20]).decode("ascii").lower()
    base = f"{namespace}:{{{tag}}}"
    return base, base + ":ops", base + ":claim"


def _check_client_options(options: dict[str, Any]) -> None:
    """The connection options chatstate reads itself, checked before redis-py sees them."""
    cluster = options.get("cluster", False)
    if not isinstance(cluster, bool):
        raise ConfigurationError(f"cluster must be True or False, not {cluster!r}")
    most = options.get("max_connections", 50)
    if isinstance(most, bool) or not isinstance(most, int) or most < 1:
        raise ConfigurationError(f"max_connections must be a whole number >= 1, not {most!r}")
    for name in ("pool_timeout", "socket_timeout", "socket_connect_timeout"):
        value = options.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise ConfigurationError(f"{name} must be positive seconds or None, not {value!r}")


def _check_key_secret(secret: object) -> bytes | None:
    if secret is None:
        return None
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes) or len(secret) < 16:
        raise ConfigurationError("key_secret must be at least 16 bytes (a str or bytes)")
    return secret


def _stored_schema(fields: list[str], values: list[Any], key: str) -> int:
    """The schema version in a document hash's ``#m`` field (1 when it has none)."""
    if "#m" not in fields:
        return 1
    raw = values[fields.index("#m")]
    raw = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if not (raw.isascii() and raw.isdigit()):
        raise corrupt(key, "the schema field is not a whole number")
    return int(raw)


class _RedisCore:
    """The pure half of the Redis backends: keys and replies."""

    def __init__(self, namespace: str, key_secret: bytes | None = None) -> None:
        self.namespace = _check_namespace(namespace)
        self._secret = key_secret

    def keys(self, user_id: str) -> list[str]:
        """A user's document, operation-log and claim keys: one hash slot.

        The user id is percent-encoded (so distinct ids give distinct keys and no
        id can open or close a hash tag) and the encoded id is the hash tag. With
        a key secret the tag is ``#`` and an HMAC-SHA256 of the id instead (160
        bits in base32), so no user id appears in a key name.
        """
        if self._secret is not None:
            return list(_hashed_keys(self.namespace, self._secret, user_id))
        return list(_keys(self.namespace, user_id))

    @staticmethod
    def hash_snapshot(parts: list[str], key: str) -> Snapshot | None:
        """A snapshot of a document hash given as its fields and values, alternating.

        The version is checked now; the values are decoded when first read.
        """
        if not parts or parts == [""]:
            return None
        if len(parts) % 2:
            raise corrupt(key, "the hash does not hold a chatstate document")
        fields = parts[0::2]
        try:
            at = fields.index("#v")
        except ValueError:
            raise corrupt(key, "the hash has no version field") from None
        raw = parts[2 * at + 1]
        if not (raw.isascii() and raw.isdigit()) or "#s" not in fields:
            raise corrupt(key, "the version or size field is not a whole number")
        schema = _stored_schema(fields, parts[1::2], key)

        def decode() -> dict[str, Any]:
            try:
                return unflatten_parts(parts)
            except ValueError as exc:
                raise CorruptStateError(
                    f"the hash does not hold a chatstate document (key {key!r}): {exc}", key=key
                ) from exc

        return Snapshot.lazy(int(raw), decode, schema)

    @staticmethod
    def decode_dump(dump: str, key: str) -> dict[str, Any]:
        """Decode a document hash given as its fields and values joined by newlines."""
        try:
            return unflatten_parts(dump.split("\n"))
        except ValueError as exc:
            raise CorruptStateError(
                f"the hash does not hold a chatstate document (key {key!r}): {exc}", key=key
            ) from exc

    def parse_load(self, raw: Any, key: str, echo: str) -> Snapshot | None:
        text = self._reply_text(raw, key)
        head, _, rest = text.partition("\n")
        if head == "corrupt":
            raise self._corrupt(text)
        mark, _, dump = rest.partition("\n")
        if head != "ok" or mark != echo:
            raise BackendError("the reply did not belong to this request; connection dropped")
        return self.hash_snapshot(dump.split("\n") if dump else [], key)

    def parse_hgetall(self, raw: Any, key: str) -> Snapshot | None:
        """A snapshot from an HGETALL reply: a dict (RESP3) or a flat list (RESP2).

        The version is checked now; the values are decoded, in one ``json.loads``
        of their bytes, when the data is first read.
        """
        if isinstance(raw, dict):
            names, values = list(raw), list(raw.values())
        else:
            names, values = raw[0::2], raw[1::2]
        if not names:
            return None
        try:
            if isinstance(names[0], bytes):
                joined = b"\n".join(names).decode("utf-8")
                text: str | bytes = b"[[" + b"],[".join(values) + b"]]"
            else:
                joined = "\n".join(map(str, names))
                text = "[[" + "],[".join(map(str, values)) + "]]"
            fields = joined.split("\n")
        except (UnicodeDecodeError, TypeError):
            raise corrupt(key, "the hash holds text that is not UTF-8") from None
        if len(fields) != len(names):
            raise corrupt(key, "a stored field holds a raw newline")
        try:
            at = fields.index("#v")
        except ValueError:
            raise corrupt(key, "the hash has no version field") from None
        version = values[at]
        version = version.decode("ascii", "replace") if isinstance(version, bytes) else version
        if not (version.isascii() and version.isdigit()) or "#s" not in fields:
            raise corrupt(key, "the version or size field is not a whole number")
        # One substring search of the joined names skips the list scan for most documents.
        schema = _stored_schema(fields, values, key) if "#m" in joined else 1

        def decode() -> dict[str, Any]:
            try:
                return unflatten_columns(fields, text)
            except (ValueError, UnicodeDecodeError) as exc:
                raise CorruptStateError(
                    f"the hash does not hold a chatstate document (key {key!r}): {exc}", key=key
                ) from exc

        return Snapshot.lazy(int(version), decode, schema)

    def parse_apply(self, raw: Any, write: Write, key: str) -> Outcome:
        text = self._reply_text(raw, key)
        parts = text.split("\n", 5)
        status = parts[0]
        if status == "corrupt":
            raise self._corrupt(text)
        if len(parts) < 3 or parts[1] != write.nonce:
            raise BackendError("the reply did not belong to this request; connection dropped")
        if status == "too_large":
            raise StateTooLargeError(size=int(parts[2]), limit=write.max_bytes)
        if status == "reused":
            raise OpIdReusedError(
                "this op_id was already used for a different request",
                op_id=write.op_id or write.op_key,
            )
        op = write.operation
        if status == "counter":
            assert isinstance(op, Increment)
            if parts[4] == "overflow":
                raise counter_overflow(op.path)
            raise counter_not_integer(op.path)
        if status not in _STATUSES:
            raise BackendError(f"unexpected reply status {status!r} from the script")
        version, current, extra = int(parts[2]), int(parts[3]), parts[4]
        dump = parts[5] if len(parts) > 5 else ""
        schema = self._reply_schema(status, write.schema if current else None, extra, dump, key)
        if write.want_document and dump:
            snapshot = Snapshot.lazy(current, lambda: self.decode_dump(dump, key), schema)
        else:
            snapshot = Snapshot({}, current, schema)
        applied_now = status == "applied" and isinstance(op, Increment) and extra
        # An earlier attempt's reply has no value; a schema refusal's is the stored schema.
        value = int(extra) if applied_now or status in _SCHEMA_REFUSALS else None
        retry = int(extra) if status == "busy" else 0
        return Outcome(status, snapshot, version, value=value, retry_after_ms=retry)  # type: ignore[arg-type]

    @staticmethod
    def _reply_schema(status: str, sent: int | None, extra: str, dump: str, key: str) -> int:
        """The stored schema an apply reply tells of (only read when the write carried one).

        ``sent`` is ``None`` too when there is no document (1, as for none stored).
        """
        if sent is None:
            return 1
        if status in _SCHEMA_REFUSALS:
            return int(extra)
        if dump:
            parts = dump.split("\n")
            return _stored_schema(parts[0::2], parts[1::2], key)
        return sent if status == "applied" else 1

    @staticmethod
    def _reply_text(raw: Any, key: str) -> str:
        try:
            return _text(raw)
        except (UnicodeDecodeError, TypeError):
            raise corrupt(key, "the hash holds text that is not UTF-8") from None

    @staticmethod
    def _corrupt(text: str) -> CorruptStateError:
        _, key, why = [*text.split("\n", 2), "", ""][:3]
        return corrupt(key, why)


class _TagCore(_RedisCore):
    """A core addressed by hash tag (the encoded id or keyed hash) instead of the user id.

    For operator tools that find users by their keys (``chatstate migrate``), which
    cannot turn a pseudonymous key back into its user id and need not.
    """

    def keys(self, user_id: str) -> list[str]:
        base = f"{self.namespace}:{{{user_id}}}"
        return [base, base + ":ops", base + ":claim"]


@contextlib.contextmanager
def map_redis_errors(  # noqa: C901, PLR0912, PLR0915 - one flat table of translations
    key: str, write: Write | None = None, *, unknown: bool = False
) -> Iterator[None]:
    """Translate redis-py errors into chatstate errors, once, for both twins.

    ``write`` marks a write: a connection lost after sending it becomes
    :class:`OutcomeUnknown`, since the script may have run. ``unknown`` says an
    earlier attempt of the same write ended so: then every failure that is not
    an answer from the script stays :class:`OutcomeUnknown`.
    """
    op_id = None if write is None else (write.op_id or write.op_key)

    def unknown_outcome(exc: BaseException) -> OutcomeUnknown:
        assert op_id is not None
        return OutcomeUnknown(
            f"lost the connection during a write to {key!r} ({type(exc).__name__}); "
            "it may or may not have been applied; retrying with the same op_id is safe",
            op_id=op_id,
        )

    try:
        yield
    except NotSent as exc:
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendUnavailable(
            f"no connection to the server ({_short(exc)}); nothing was sent"
        ) from exc
    except (rex.AuthenticationError, rex.AuthorizationError) as exc:
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendAuthenticationError(
            "the server refused the credentials (check the password or ACL user)"
        ) from exc
    except rex.NoPermissionError as exc:
        raise BackendPermissionError(
            f"the ACL user may not run a command chatstate needs ({_short(exc)}); "
            "see the ACL in the operations guide"
        ) from exc
    except rex.BusyLoadingError as exc:
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise StoreBusyError("the server is loading its data set; try again shortly") from exc
    except rex.MaxConnectionsError as exc:
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendUnavailable(
            "every connection of the pool is in use; nothing was sent"
        ) from exc
    except (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, OSError) as exc:
        if op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendUnavailable(
            f"cannot reach the server ({type(exc).__name__}: {_short(exc)})"
        ) from exc
    except rex.ReadOnlyError as exc:
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendUnavailable(
            "the server is a read-only replica (a failover in progress?)"
        ) from exc
    except rex.OutOfMemoryError as exc:
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise StoreFullError(
            "the server is out of memory (maxmemory); nothing was written"
        ) from exc
    except rex.ResponseError as exc:
        message = str(exc)
        if message.startswith("NOPERM") or "NOPERM" in message[:80]:
            raise BackendPermissionError(
                f"the ACL user may not run a command chatstate needs ({_short(exc)}); "
                "see the ACL in the operations guide"
            ) from exc
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
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
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendError(f"the Redis client failed: {type(exc).__name__}: {_short(exc)}") from exc
    except rex.RedisClusterException as exc:  # not a RedisError: no node reachable, no slots
        if unknown and op_id is not None:
            raise unknown_outcome(exc) from exc
        raise BackendUnavailable(f"cannot use the cluster ({_short(exc)})") from exc


def _lock_lost(name: str, lease: float) -> LockLostError:
    return LockLostError(
        f"the {name!r} lock expired while held (lease {lease} s); "
        "another holder may have run at the same time"
    )


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _is_cluster(client: Any) -> bool:
    return hasattr(client, "get_node_from_key") or hasattr(client, "nodes_manager")


def _hiredis(client: Any) -> bool:
    """True when the client parses replies with hiredis (plain HGETALL is then fastest)."""
    try:
        from redis.utils import HIREDIS_AVAILABLE  # noqa: PLC0415 - only checked once
    except ImportError:  # pragma: no cover - every supported redis-py has it
        return False
    if not HIREDIS_AVAILABLE or _is_cluster(client):
        return False
    parser = client.connection_pool.connection_kwargs.get("parser_class")
    return parser is None or "Hiredis" in getattr(parser, "__name__", "")


class _RedisBackendBase:
    """What the two Redis backends share: construction, keys, scripts, repr."""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        resolve_attempts: int = 2,
        resolve_retry: RetryPolicy | None = None,
        deadline_shards: int = 16,
        key_secret: str | bytes | None = None,
        _owns_client: bool = False,
    ) -> None:
        if type(deadline_shards) is not int or not 0 <= deadline_shards <= 1024:
            raise ConfigurationError("deadline_shards must be a whole number from 0 to 1024")
        self.deadline_shards = deadline_shards
        if isinstance(resolve_attempts, bool) or not isinstance(resolve_attempts, int):
            raise ConfigurationError("resolve_attempts must be a whole number")
        if resolve_attempts < 0:
            raise ConfigurationError("resolve_attempts must not be negative")
        self._core = _RedisCore(namespace, _check_key_secret(key_secret))
        self.client = client
        self.resolve_attempts = resolve_attempts
        if resolve_retry is None:
            resolve_retry = attrs.evolve(RESOLVE, attempts=resolve_attempts + 1)
        elif not isinstance(resolve_retry, RetryPolicy):
            raise ConfigurationError(f"resolve_retry must be a RetryPolicy, got {resolve_retry!r}")
        self.resolve_retry = resolve_retry
        self._owns_client = _owns_client
        self._cluster = _is_cluster(client)
        self._apply_script = client.register_script(APPLY_SCRIPT)
        self._load_script = client.register_script(LOAD_SCRIPT)
        self._plain_reads = _hiredis(client)

    @staticmethod
    def _pool_limits(client: Any) -> tuple[int, float | None]:
        """How many connections chatstate may open, and how long a caller waits for one."""
        pool = client.connection_pool
        most = int(getattr(pool, "max_connections", 50) or 50)
        timeout = getattr(pool, "timeout", None)
        if timeout is None:
            timeout = pool.connection_kwargs.get("socket_timeout") or 5.0
        return min(most, 10_000), float(timeout)

    @staticmethod
    def _client_kwargs(options: dict[str, Any], *, asynchronous: bool) -> dict[str, Any]:
        if isinstance(options.get("retry"), RetryPolicy):
            retry = _redis_retry(options["retry"], asynchronous=asynchronous)
            options = {**options, "retry": retry}
        return {**default_client_options(asynchronous=asynchronous), **options}

    kind = "redis"
    stores_schema = True

    def describe(self) -> dict[str, Any]:
        """What observers may say of this backend (OpenTelemetry's database attributes)."""
        out: dict[str, Any] = {"db.system.name": "redis", "db.namespace": self._core.namespace}
        try:
            kwargs = self.client.connection_pool.connection_kwargs
        except AttributeError:
            return out
        if "host" in kwargs:
            out["server.address"] = str(kwargs["host"])
        if "port" in kwargs:
            out["server.port"] = int(kwargs["port"])
        return out

    def __repr__(self) -> str:
        location = _safe_location(self.client)
        return f"<{type(self).__name__} {location} namespace={self._core.namespace!r}>"

    def keys(self, user_id: str) -> list[str]:
        """The Redis keys of a user's data (for an already checked user id)."""
        return self._core.keys(user_id)

    def _apply_args(self, write: Write, keys: list[str], *, fresh: bool) -> tuple[Any, ...]:
        # A first send may skip the op-log lookup only where nothing re-sends
        # behind our back (redis-py's cluster client retries on its own).
        fresh = (
            fresh
            and write.op_id is None
            and not write.completes_claim  # its key was already used by the claim
            and isinstance(write.operation, Edits | Increment | Reset | Replace | Delete)
            and not self._cluster
        )
        return ("EVALSHA", self._apply_script.sha, 3, *keys, *write_args(write, fresh=fresh))

    def _load_args(self, key: str, echo: str) -> tuple[Any, ...]:
        return ("EVALSHA", self._load_script.sha, 1, key, echo)

    def _eval_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """An EVALSHA command as the EVAL of its script's text."""
        text = APPLY_SCRIPT if args[1] == self._apply_script.sha else LOAD_SCRIPT
        return ("EVAL", text, *args[2:])

    def _erase_keys(self, user_id: str) -> list[str]:
        keys = self._core.keys(user_id)
        return [*keys, *(f"{keys[0]}:lock:{name}" for name in LOCK_NAMES)]

    @staticmethod
    def _erased(raw: Any, zrem: Any) -> list[str]:
        found = {_text(part) for part in raw or []}
        if int(zrem or 0):
            found.add("deadline")
        return [part for part in ERASED_PARTS if part in found]

    # -- the deadline index: one sorted set per shard, each its own hash slot --------

    def deadline_keys(self) -> list[str]:
        """The sorted sets of the deadline index, ``<namespace>:deadlines:{<n>}``."""
        return [self._deadline_key(n) for n in range(self.deadline_shards)]

    def _deadline_key(self, shard: int) -> str:
        return f"{self._core.namespace}:deadlines:{{{shard}}}"

    def _deadline_shard_key(self, user_id: str) -> str:
        digest = zlib.crc32(user_id.encode("utf-8", "surrogatepass"))
        return self._deadline_key(digest % self.deadline_shards)

    def _no_index(self) -> UsageError:
        return UsageError(
            f"{type(self).__name__} keeps no deadline index (deadline_shards=0); "
            "timeouts still apply at the user's next message"
        )

    def _schedule_args(self, user_id: str, at_ms: int, earlier_only: bool) -> tuple[Any, ...]:
        at_ms = check_deadline(at_ms)
        key = self._deadline_shard_key(user_id)
        if earlier_only:  # LT: an entry only moves earlier; a new one is added
            return ("ZADD", key, "LT", at_ms, user_id)
        return ("ZADD", key, at_ms, user_id)

    @staticmethod
    def _due_args(key: str, now_ms: int, limit: int) -> tuple[Any, ...]:
        return ("ZRANGEBYSCORE", key, "-inf", now_ms, "WITHSCORES", "LIMIT", 0, limit)

    @staticmethod
    def _parse_due(replies: list[Any], limit: int) -> list[tuple[str, int]]:
        """Merge the shards' replies (flat RESP2 lists or RESP3 pairs), earliest first."""
        found: list[tuple[int, str]] = []
        for raw in replies:
            items = list(raw or [])
            pairs = (
                items
                if items and isinstance(items[0], list | tuple)
                else list(zip(items[::2], items[1::2], strict=True))
            )
            found.extend(
                (
                    int(score if isinstance(score, int | float) else float(_text(score))),
                    _text(member),
                )
                for member, score in pairs
            )
        found.sort()
        return [(user_id, at) for at, user_id in found[:limit]]


class RedisBackend(_RedisBackendBase):
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
        _owns_client: bool = False,
    ) -> None:
        super().__init__(
            client,
            namespace=namespace,
            resolve_attempts=resolve_attempts,
            resolve_retry=resolve_retry,
            deadline_shards=deadline_shards,
            key_secret=key_secret,
            _owns_client=_owns_client,
        )
        limits = None if self._cluster else self._pool_limits(client)
        self._conns = None if limits is None else Connections(client.connection_pool, *limits)

    @classmethod
    def from_url(cls, url: str, *, namespace: str = DEFAULT_NAMESPACE, **options: Any) -> Self:
        """Create a client from ``url`` (``redis://``, ``rediss://``, ``unix://``) and own it.

        ``options`` go to redis-py and override chatstate's defaults (5 s
        timeouts, 3 retries with jittered backoff for redis-py's own commands).
        chatstate keeps at most ``max_connections`` connections (default 50):
        a thread that finds them all busy waits up to ``pool_timeout`` seconds
        (default: ``socket_timeout``) instead of failing, and a write that gets
        no connection at all raises ``BackendUnavailable`` (it was not sent). Pass
        ``cluster=True`` for a Redis Cluster, ``resolve_attempts`` to change
        how often a write of unknown outcome is re-sent, and ``deadline_shards``
        to change how many sorted sets hold the deadline index.
        """
        options = dict(options)
        _check_client_options(options)
        cluster = options.pop("cluster", False)
        resolve_attempts = options.pop("resolve_attempts", 2)
        resolve_retry = options.pop("resolve_retry", None)
        deadline_shards = options.pop("deadline_shards", 16)
        key_secret = options.pop("key_secret", None)
        kwargs = cls._client_kwargs(options, asynchronous=False)
        client: Any
        if cluster:
            from redis.cluster import RedisCluster as Cluster  # noqa: PLC0415

            kwargs.pop("health_check_interval", None)
            kwargs.pop("pool_timeout", None)
            with map_redis_errors("cluster"):  # the sync client connects here
                client = Cluster.from_url(url, **kwargs)
        else:
            max_connections = kwargs.pop("max_connections", 50)
            timeout = kwargs.pop("pool_timeout", kwargs.get("socket_timeout"))
            pool = redis.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout, **kwargs
            )
            client = redis.Redis(connection_pool=pool)
        return cls(
            client,
            namespace=namespace,
            resolve_attempts=resolve_attempts,
            resolve_retry=resolve_retry,
            deadline_shards=deadline_shards,
            key_secret=key_secret,
            _owns_client=True,
        )

    def _execute(self, args: tuple[Any, ...]) -> Any:
        """Send one command; ``NotSent`` when no connection could be had.

        Connections are taken from the client's pool and kept in a small idle
        list of this backend's between commands (the pool's own bookkeeping
        costs more than a round trip's worth of Python here).
        """
        if self._conns is None:
            try:
                return self.client.execute_command(*args)
            except rex.MaxConnectionsError as exc:
                raise NotSent(str(exc)) from exc
        return self._conns.execute(args)

    def _script(self, args: tuple[Any, ...]) -> Any:
        """Run a script by its SHA; after NOSCRIPT (it did not run), send it whole with EVAL.

        EVAL runs the script and caches it again in one step, so a SCRIPT FLUSH
        between a reload and the next EVALSHA (redis-py's way) cannot fail a call.
        """
        try:
            return self._execute(args)
        except rex.NoScriptError as exc:
            self.resolve_retry.report("noscript", exc)
            return self._execute(self._eval_args(args))

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        key = self._core.keys(user_id)[0]
        if self._plain_reads:
            with map_redis_errors(key):
                raw = self._execute(("HGETALL", key))
            return self._core.parse_hgetall(raw, key)
        echo = new_op_id()
        with map_redis_errors(key):
            raw = self._script(self._load_args(key, echo))
        return self._core.parse_load(raw, key, echo)

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically with one EVALSHA.

        When the outcome is unknown (the connection failed after sending), the
        same write is sent again, up to ``resolve_attempts`` times: its
        operation key and nonce make the script apply it at most once, and
        answer ``"applied"`` if the earlier attempt had landed.
        """
        keys = self._core.keys(user_id)
        retrying = None
        while True:
            args = self._apply_args(write, keys, fresh=retrying is None)
            try:
                with map_redis_errors(keys[0], write, unknown=retrying is not None):
                    raw = self._script(args)
                break
            except OutcomeUnknown as exc:
                if retrying is None:
                    retrying = self.resolve_retry.begin("resolve")
                if not retrying.retry(exc):
                    raise
        return self._core.parse_apply(raw, write, keys[0])

    def erase(self, user_id: str) -> list[str]:
        """Delete every key chatstate keeps for the user; return what there was.

        One script deletes the document, the operation log, the claim and the
        locks chatstate takes (one hash slot, atomically), then one ``ZREM``
        removes the deadline entry. The names come from
        :data:`~chatstate.state.ERASED_PARTS`.
        """
        keys = self._erase_keys(user_id)
        with map_redis_errors(keys[0]):
            raw = self._execute(("EVAL", _ERASE_SCRIPT, len(keys), *keys))
        zrem = 0
        if self.deadline_shards:
            index = self._deadline_shard_key(user_id)
            with map_redis_errors(index):
                zrem = self._execute(("ZREM", index, user_id))
        return self._erased(raw, zrem)

    def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """Index the user's next flow deadline (see :class:`~chatstate.state.DeadlineIndex`).

        One ``ZADD`` (with ``LT`` when ``earlier_only``) to the user's shard of
        the index; needs Redis 6.2 or Valkey.
        """
        if not self.deadline_shards:
            check_deadline(at_ms)
            return
        args = self._schedule_args(user_id, at_ms, earlier_only)
        with map_redis_errors(args[1]):
            self._execute(args)

    def unschedule(self, user_id: str) -> None:
        """Remove the user's entry from the deadline index (one ``ZREM``)."""
        if not self.deadline_shards:
            return
        key = self._deadline_shard_key(user_id)
        with map_redis_errors(key):
            self._execute(("ZREM", key, user_id))

    def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """The due entries, earliest first (one ``ZRANGEBYSCORE`` per shard); none removed.

        Raises:
            UsageError: ``deadline_shards=0``: this backend keeps no index.
        """
        limit, now_ms = check_limit(limit), check_deadline(now_ms)
        if not self.deadline_shards:
            raise self._no_index()
        replies = []
        for key in self.deadline_keys():
            with map_redis_errors(key):
                replies.append(self._execute(self._due_args(key, now_ms, limit)))
        return self._parse_due(replies, limit)

    def ping(self) -> float:
        """Round-trip the server once; return the latency in seconds.

        Raises:
            BackendUnavailable: the server cannot be reached.
        """
        start = time.perf_counter()
        with map_redis_errors("PING"):
            self.client.ping()
        return time.perf_counter() - start

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

        Built on redis-py's ``Lock`` (``SET NX PX`` and a compare-and-delete
        script). It expires after ``lease`` seconds if its holder dies.

        Raises:
            LockTimeoutError: the lock was not free within ``wait`` seconds.
            LockLostError: the lease ran out while the lock was held (another
                holder may have run meanwhile); raised when the block ends
                without an error of its own.
        """
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


class AsyncRedisBackend(_RedisBackendBase):
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
        _owns_client: bool = False,
    ) -> None:
        super().__init__(
            client,
            namespace=namespace,
            resolve_attempts=resolve_attempts,
            resolve_retry=resolve_retry,
            deadline_shards=deadline_shards,
            key_secret=key_secret,
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
        options = dict(options)
        _check_client_options(options)
        cluster = options.pop("cluster", False)
        own = {
            name: options.pop(name)
            for name in (
                "resolve_attempts",
                "resolve_retry",
                "pipelining",
                "lanes",
                "deadline_shards",
                "key_secret",
            )
            if name in options
        }
        kwargs = cls._client_kwargs(options, asynchronous=True)
        client: Any
        if cluster:
            from redis.asyncio.cluster import RedisCluster as Cluster  # noqa: PLC0415

            kwargs.pop("health_check_interval", None)
            kwargs.pop("pool_timeout", None)
            client = Cluster.from_url(url, **kwargs)
        else:
            max_connections = kwargs.pop("max_connections", 50)
            timeout = kwargs.pop("pool_timeout", kwargs.get("socket_timeout"))
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout, **kwargs
            )
            client = redis.asyncio.Redis(connection_pool=pool)
        return cls(client, namespace=namespace, _owns_client=True, **own)

    async def _execute(self, route: str, args: tuple[Any, ...]) -> Any:
        if self._pipe is not None:
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
            if isinstance(reply, BaseException):
                raise reply
            return reply
        return await self._conns.execute(args)

    async def _script(self, route: str, args: tuple[Any, ...]) -> Any:
        """See :meth:`RedisBackend._script`."""
        try:
            return await self._execute(route, args)
        except rex.NoScriptError as exc:
            self.resolve_retry.report("noscript", exc)
            return await self._execute(route, self._eval_args(args))

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        key = self._core.keys(user_id)[0]
        if self._plain_reads:
            with map_redis_errors(key):
                raw = await self._execute(key, ("HGETALL", key))
            return self._core.parse_hgetall(raw, key)
        echo = new_op_id()
        with map_redis_errors(key):
            raw = await self._script(key, self._load_args(key, echo))
        return self._core.parse_load(raw, key, echo)

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically with one EVALSHA (see :meth:`RedisBackend.apply`)."""
        keys = self._core.keys(user_id)
        retrying = None
        while True:
            args = self._apply_args(write, keys, fresh=retrying is None)
            try:
                with map_redis_errors(keys[0], write, unknown=retrying is not None):
                    raw = await self._script(keys[0], args)
                break
            except OutcomeUnknown as exc:
                if retrying is None:
                    retrying = self.resolve_retry.begin("resolve")
                if not await retrying.aretry(exc):
                    raise
        return self._core.parse_apply(raw, write, keys[0])

    async def erase(self, user_id: str) -> list[str]:
        """See :meth:`RedisBackend.erase`."""
        keys = self._erase_keys(user_id)
        with map_redis_errors(keys[0]):
            raw = await self._execute(keys[0], ("EVAL", _ERASE_SCRIPT, len(keys), *keys))
        zrem = 0
        if self.deadline_shards:
            index = self._deadline_shard_key(user_id)
            with map_redis_errors(index):
                zrem = await self._execute(index, ("ZREM", index, user_id))
        return self._erased(raw, zrem)

    async def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """See :meth:`RedisBackend.schedule`."""
        if not self.deadline_shards:
            check_deadline(at_ms)
            return
        args = self._schedule_args(user_id, at_ms, earlier_only)
        with map_redis_errors(args[1]):
            await self._execute(args[1], args)

    async def unschedule(self, user_id: str) -> None:
        """See :meth:`RedisBackend.unschedule`."""
        if not self.deadline_shards:
            return
        key = self._deadline_shard_key(user_id)
        with map_redis_errors(key):
            await self._execute(key, ("ZREM", key, user_id))

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """See :meth:`RedisBackend.due` (the shards are read concurrently)."""
        limit, now_ms = check_limit(limit), check_deadline(now_ms)
        if not self.deadline_shards:
            raise self._no_index()

        async def read(key: str) -> Any:
            with map_redis_errors(key):
                return await self._execute(key, self._due_args(key, now_ms, limit))

        replies = await asyncio.gather(*(read(key) for key in self.deadline_keys()))
        return self._parse_due(list(replies), limit)

    async def ping(self) -> float:
        """See :meth:`RedisBackend.ping`."""
        start = time.perf_counter()
        with map_redis_errors("PING"):
            await self.client.ping()
        return time.perf_counter() - start

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
        """The asyncio twin of :meth:`RedisBackend.lock`."""
        key = f"{self._core.keys(user_id)[0]}:lock:{name}"
        held = self.client.lock(key, timeout=lease, sleep=0.01, blocking_timeout=wait)
        with map_redis_errors(key):
            acquired = await held.acquire()
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
                        await held.release()
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
