"""The pure half of the Redis backends: arguments, replies, error mapping.

:class:`_Replies` decodes what the server answers, :class:`_RedisBackendBase`
holds what the two backends share (construction, scripts, the deadline
index's keys, repr), and the error table maps redis-py's errors to chatstate's.
Keys are built and parsed by :class:`~chatstate.state.redis.KeyScheme`
(``_keys.py``). The I/O that the two twins share is written once in
``_async/io.py`` (the sync one generated from it by ``tools/unasync.py``);
``_backends.py`` adds what truly differs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Final

import attrs
import redis.exceptions as rex

from chatstate._retry import REDIS_CLIENT, RESOLVE, RetryPolicy
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendPermissionError,
    BackendUnavailable,
    ConfigurationError,
    CorruptStateError,
    NotDurableError,
    OpIdReusedError,
    OutcomeUnknown,
    StateError,
    StateTooLargeError,
    StoreBusyError,
    StoreFullError,
    UsageError,
)
from chatstate.state._backend import (
    ERASED_PARTS,
    SCHEMA_REFUSALS,
    STATUSES,
    Delete,
    Edits,
    Increment,
    Outcome,
    Replace,
    Reset,
    Snapshot,
    Write,
    check_deadline,
    check_prefix,
    corrupt,
    counter_not_integer,
    counter_overflow,
)
from chatstate.state._codec import unflatten_columns, unflatten_parts
from chatstate.state.redis._async.retry import AsyncPolicyRetry
from chatstate.state.redis._keys import KeyScheme
from chatstate.state.redis._lua import APPLY_SCRIPT, LOAD_SCRIPT, write_args
from chatstate.state.redis._pipeline import NotSent
from chatstate.state.redis._sync.retry import PolicyRetry

__all__ = [
    "DEFAULT_NAMESPACE",
    "LOCK_NAMES",
    "Durability",
    "default_client_options",
    "map_redis_errors",
]

DEFAULT_NAMESPACE: Final = "chatstate"
LOCK_NAMES: Final = ("jwt-refresh", "aiogram", "telegram")
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
# A user's lock (the token refresh's, aiogram's): one string key holding its
# holder's token, with a lease. Every action is safe to send again after a lost
# reply: taking a lock already ours renews it, renewing twice renews, and
# "released" (the re-send of "release") counts a lock that is gone as let go.
# A renewal never takes a lock that is free: one whose lease ran out was lost.
LOCK_SCRIPT: Final = """
local held = redis.call('GET', KEYS[1])
local action, token = ARGV[1], ARGV[2]
if held == token then
  if action == 'release' or action == 'released' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
  end
  return 1
end
if not held then
  if action == 'acquire' then
    redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
    return 1
  end
  if action == 'released' then
    return 1
  end
end
return 0
"""


_MAX_WAIT: Final = 60.0

DURABLE_STATUSES: Final = frozenset({"applied", "duplicate", "claimed", "released"})
"""The statuses of a write that wrote, or confirms an earlier write: these must be durable."""


def _check_replicas(_: Any, __: Any, value: Any) -> None:
    if type(value) is not int or not 0 <= value <= 1000:
        raise ConfigurationError(f"replicas must be a whole number from 0 to 1000, not {value!r}")


def _check_aof(_: Any, __: Any, value: Any) -> None:
    if type(value) is not bool:
        raise ConfigurationError(f"aof must be True or False, not {value!r}")


def _check_timeout(_: Any, __: Any, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0.001 <= value <= _MAX_WAIT
    ):
        raise ConfigurationError(
            f"timeout must be seconds from 0.001 to {_MAX_WAIT:g}, not {value!r}"
        )


@attrs.frozen
class Durability:
    """What a Redis write waits for before it is acknowledged (``durability=`` of the backends).

    After every write (updates, claims and commits, op ids, the deadline index,
    locks, erase) the backend sends, on the same connection and in the same
    round trip, ``WAIT replicas timeout`` (or, with ``aof``, ``WAITAOF 1
    replicas timeout``). A write that is not confirmed in time raises
    :class:`~chatstate.exceptions.NotDurableError`: it landed on the primary,
    and calling again with the same ``op_id`` is safe.

    Args:
        replicas: How many replicas must have received the write (0 to 1000;
            default 1). With ``aof``, how many must have fsynced it to their own
            append-only file (they need ``appendonly yes`` too).
        aof: Also wait until the primary has fsynced the write to its
            append-only file (``WAITAOF``: Redis 7.2+, Valkey 7.2+, with
            ``appendonly yes``; checked at the first write, else
            ``ConfigurationError``). Default False.
        timeout: How long the server waits, in seconds (0.001 to 60; default
            0.5). At most half the client's ``socket_timeout`` (checked when the
            backend is built), so that a slow wait is never a lost reply.

    Raises:
        ConfigurationError: an option is out of range, or it waits for nothing
            (``replicas=0`` without ``aof``).
    """

    replicas: int = attrs.field(default=1, validator=_check_replicas)
    aof: bool = attrs.field(default=False, validator=_check_aof)
    timeout: float = attrs.field(default=0.5, validator=_check_timeout)

    def __attrs_post_init__(self) -> None:
        if not self.replicas and not self.aof:
            raise ConfigurationError(
                "durability waits for nothing: give replicas >= 1 or aof=True "
                "(or durability=None, the default, not to wait)"
            )

    @property
    def command(self) -> tuple[Any, ...]:
        """The command that waits: ``WAIT`` or ``WAITAOF``, with the timeout in milliseconds."""
        ms = max(1, math.ceil(self.timeout * 1000))
        if self.aof:
            return ("WAITAOF", 1, self.replicas, ms)
        return ("WAIT", self.replicas, ms)

    def confirmed(self, reply: Any) -> tuple[int, bool | None]:
        """What a ``WAIT``/``WAITAOF`` reply confirms: (replicas, AOF fsynced or None if not asked).

        An error reply (or one of another shape) confirms nothing: (-1, False).
        """
        if isinstance(reply, BaseException):
            return -1, (False if self.aof else None)
        try:
            if self.aof:
                local, replicas = reply
                return int(replicas), int(local) >= 1
            return int(reply), None
        except (TypeError, ValueError):
            return -1, (False if self.aof else None)

    def met(self, reply: Any) -> bool:
        """True when the reply confirms everything asked."""
        replicas, aof = self.confirmed(reply)
        return replicas >= self.replicas and aof is not False

    def not_durable(self, replies: Sequence[Any], key: str, op_id: str | None) -> NotDurableError:
        """The error for a write whose wait (the last of ``replies``) fell short."""
        reply = replies[-1]
        replicas, aof = self.confirmed(reply)
        errors = [r for r in replies if isinstance(r, BaseException)]
        if errors:
            got = f"the server refused to confirm it ({_kind(errors[0])})"
        else:
            parts = [f"{replicas} of {self.replicas} replicas acknowledged it"]
            if self.aof:
                parts[0] = f"{replicas} of {self.replicas} replicas fsynced it"
                parts.append(
                    "the primary's AOF fsync " + ("was" if aof else "was not") + " confirmed"
                )
            got = " and ".join(parts) + f" within {self.timeout:g} s"
        return NotDurableError(
            f"the write to {key!r} landed on the primary but is not confirmed durable: {got} "
            f"({self.command[0]}); a failover now may lose it. Calling again with the same "
            "op_id is safe: it is applied once, and waits again",
            op_id=op_id or "",
            replicas=replicas,
            replicas_wanted=self.replicas,
            aof=aof,
        )


def _safe_location(client: Any) -> str:
    """host:port of a client for reprs, never its password."""
    try:
        kwargs = client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    except AttributeError:
        return type(client).__name__


def default_client_options(*, asynchronous: bool) -> dict[str, Any]:
    """Timeouts and retries for clients that chatstate creates itself.

    The ``retry`` policy is the one for every command whose connection broke:
    redis-py applies it to connecting, ``ping`` and the sync Cluster's routing,
    chatstate to the commands it sends itself (``AsyncRedisIO._send``), where a
    write is re-sent safely, with its operation key and nonce.
    """
    return {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 5.0,
        "retry": _redis_retry(REDIS_CLIENT, asynchronous=asynchronous),
        "health_check_interval": 30,
    }


def connection_policy(client: Any) -> RetryPolicy:
    """The policy for a command whose connection broke: the one the client's ``retry`` has.

    A :class:`PolicyRetry` (what ``from_url`` makes) lends its policy and its
    count of retries (redis-py's ``update_retries()`` may have changed it); a
    redis-py ``Retry`` its count, with ``REDIS_CLIENT``'s delays; no retry at
    all means one attempt. chatstate's own commands and redis-py's are so
    retried under one policy.
    """
    if _is_cluster(client):
        retry = getattr(client, "retry", None)
    else:
        get_retry = getattr(client, "get_retry", None)
        retry = get_retry() if callable(get_retry) else None
    policy = getattr(retry, "policy", None)
    if not isinstance(policy, RetryPolicy):
        policy = REDIS_CLIENT
    get_retries = getattr(retry, "get_retries", None)
    retries = get_retries() if callable(get_retries) else 0
    if retries < 0:  # redis-py's "forever": the policy's own limit
        return policy
    return attrs.evolve(policy, attempts=retries + 1)


def _redis_retry(policy: RetryPolicy, *, asynchronous: bool) -> PolicyRetry | AsyncPolicyRetry:
    """redis-py's ``retry`` option for a policy (refused credentials are never retried)."""
    return AsyncPolicyRetry(policy) if asynchronous else PolicyRetry(policy)


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8")
    if isinstance(raw, str):
        return raw
    raise TypeError(f"a script replied with a {type(raw).__name__}")


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


def _stored_schema(fields: list[str], values: list[Any], key: str) -> int:
    """The schema version in a document hash's ``#m`` field (1 when it has none)."""
    if "#m" not in fields:
        return 1
    raw = values[fields.index("#m")]
    raw = raw.decode("ascii", "replace") if isinstance(raw, bytes) else str(raw)
    if not (raw.isascii() and raw.isdigit() and raw[0] != "0" and len(raw) <= 9):
        raise corrupt(key, "the schema field is not a whole number from 1 to 999999999")
    return int(raw)


class _Replies:
    """The pure half of the Redis backends: what a script's or command's reply means."""

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
        if status not in STATUSES:
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
        value = int(extra) if applied_now or status in SCHEMA_REFUSALS else None
        retry = int(extra) if status == "busy" else 0
        return Outcome(status, snapshot, version, value=value, retry_after_ms=retry)  # type: ignore[arg-type]

    @staticmethod
    def _reply_schema(status: str, sent: int | None, extra: str, dump: str, key: str) -> int:
        """The stored schema an apply reply tells of (only read when the write carried one).

        ``sent`` is ``None`` too when there is no document (1, as for none stored).
        """
        if sent is None:
            return 1
        if status in SCHEMA_REFUSALS:
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


@attrs.frozen
class _Translation:
    """What one kind of redis-py error means to chatstate (a row of ``_TRANSLATIONS``).

    Attributes:
        types: The redis-py (or socket) errors it covers.
        error: The chatstate error raised for them.
        why: What went wrong, as a message; ``{detail}`` is the error's own text,
            ``{kind}`` its class name, ``{key}`` the key.
        then: What that means for the call, added to ``why`` when it ends the
            call (``"nothing was sent"``); left out where a write's outcome is
            unknown for another reason.
        prefix: For error replies: the reply's first word (``"BUSY"``).
        within: The prefix may stand anywhere in the reply's first this many
            characters (an ACL refusal inside a script is quoted after its name).
        sent: The attempt may have run: the command was sent and its reply was
            lost, so a write's outcome is unknown.
        again: Sending again may help (a new connection, a server done
            loading): retried under the connection policy where that is safe.
        final: Stays itself even after an earlier attempt of the write was lost
            (a missing ACL permission is never an unknown outcome).
    """

    types: tuple[type[BaseException], ...]
    error: type[StateError]
    why: str
    then: str = ""
    prefix: str = ""
    within: int = 0
    sent: bool = False
    again: bool = False
    final: bool = False


_NOPERM_WHY: Final = (
    "the ACL user may not run a command chatstate needs ({detail}); "
    "see the ACL in the operations guide"
)

# The first row whose types (and reply prefix) match is the error's meaning. Order
# matters where redis-py's errors subclass each other: its AuthenticationError,
# BusyLoadingError and MaxConnectionsError are ConnectionErrors, and ReadOnlyError,
# OutOfMemoryError and NoPermissionError are ResponseErrors.
_TRANSLATIONS: Final = (
    _Translation(
        (NotSent,),
        BackendUnavailable,
        "no connection to the server ({detail})",
        then="nothing was sent",
    ),
    _Translation(
        (rex.AuthenticationError, rex.AuthorizationError),
        BackendAuthenticationError,
        "the server refused the credentials (check the password or ACL user)",
    ),
    _Translation((rex.NoPermissionError,), BackendPermissionError, _NOPERM_WHY, final=True),
    _Translation(
        (rex.BusyLoadingError,),
        StoreBusyError,
        "the server is loading its data set",
        then="try again shortly",
        again=True,
    ),
    _Translation(
        (rex.MaxConnectionsError,),
        BackendUnavailable,
        "every connection of the pool is in use",
        then="nothing was sent",
    ),
    _Translation(
        (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError, OSError),
        BackendUnavailable,
        "cannot reach the server ({kind}: {detail})",
        sent=True,
        again=True,
    ),
    _Translation(
        (rex.ReadOnlyError,),
        BackendUnavailable,
        "the server is a read-only replica (a failover in progress?)",
    ),
    _Translation(
        (rex.OutOfMemoryError,),
        StoreFullError,
        "the server is out of memory (maxmemory)",
        then="nothing was written",
    ),
    _Translation(
        (rex.ResponseError,),
        BackendPermissionError,
        _NOPERM_WHY,
        prefix="NOPERM",
        within=80,
        final=True,
    ),
    _Translation(
        (rex.ResponseError,),
        StoreFullError,
        "the server is out of memory (maxmemory)",
        then="nothing was written",
        prefix="OOM",
    ),
    _Translation(
        (rex.ResponseError,),
        StoreBusyError,
        "the server is busy running a script",
        then="try again shortly",
        prefix="BUSY",
    ),
    _Translation(
        (rex.ResponseError,),
        CorruptStateError,
        "the key holds the wrong type (key {key!r})",
        then="nothing was written",
        prefix="WRONGTYPE",
    ),
    _Translation((rex.ResponseError,), BackendError, "the server answered with an error: {detail}"),
    _Translation((rex.RedisError,), BackendError, "the Redis client failed: {kind}: {detail}"),
    # Not a RedisError: no node reachable, no slots.
    _Translation(
        (rex.RedisClusterException,), BackendUnavailable, "cannot use the cluster ({detail})"
    ),
)

TRANSLATED: Final = (NotSent, rex.RedisError, rex.RedisClusterException, OSError)
"""The errors :func:`translate` knows; any other (a bug: ``AttributeError``...) passes through."""


def translation(exc: BaseException) -> _Translation:
    """The row of ``_TRANSLATIONS`` that says what ``exc`` (one of ``TRANSLATED``) means."""
    text = str(exc) if isinstance(exc, rex.ResponseError) else ""
    for row in _TRANSLATIONS:
        if isinstance(exc, row.types) and (
            not row.prefix
            or text.startswith(row.prefix)
            or (row.within and row.prefix in text[: row.within])
        ):
            return row
    raise TypeError(f"chatstate does not translate {type(exc).__name__}")  # pragma: no cover


def translate(
    exc: BaseException,
    key: str,
    write: Write | None = None,
    *,
    lost: BaseException | None = None,
    unknown: bool = False,
) -> StateError:
    """The chatstate error for a redis-py error (one of ``TRANSLATED``), for both twins.

    ``write`` marks a write: when its attempt may have run (the connection was
    lost after sending it), or an earlier attempt of it may have (``lost``, the
    error that attempt ended with; or just ``unknown``), the error is
    :class:`OutcomeUnknown` and says so, and only so. Every other error says
    what went wrong and that nothing was sent or written.
    """
    row = translation(exc)
    why = row.why.format(detail=_short(exc), kind=type(exc).__name__, key=key)
    op_id = None if write is None else (write.op_id or write.op_key)
    if op_id is not None and not row.final and (row.sent or lost is not None or unknown):
        if row.sent:
            text = f"lost the connection after sending a write to {key!r} ({_kind(exc)})"
        else:
            earlier = "" if lost is None else f" ({_kind(lost)})"
            text = (
                f"lost the reply to a write to {key!r}{earlier}, then re-sending it failed: {why}"
            )
        return OutcomeUnknown(
            f"{text}; it may or may not have been applied: calling again with the same op_id "
            "is safe",
            op_id=op_id,
        )
    text = f"{why}; {row.then}" if row.then else why
    if row.error is CorruptStateError:
        return CorruptStateError(text, key=key)
    return row.error(text)


def _kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_short(exc)}"


@contextlib.contextmanager
def map_redis_errors(
    key: str, write: Write | None = None, *, unknown: bool = False
) -> Iterator[None]:
    """Translate redis-py errors into chatstate errors (see :func:`translate`), chained.

    ``unknown`` says an earlier attempt of the same write was lost: then every
    failure that is not an answer it cannot be (a missing permission) stays
    :class:`OutcomeUnknown`.
    """
    try:
        yield
    except TRANSLATED as exc:
        raise translate(exc, key, write, unknown=unknown) from exc


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
        keys: KeyScheme | None = None,
        durability: Durability | None = None,
        _owns_client: bool = False,
    ) -> None:
        if type(deadline_shards) is not int or not 0 <= deadline_shards <= 1024:
            raise ConfigurationError("deadline_shards must be a whole number from 0 to 1024")
        self.deadline_shards = deadline_shards
        if isinstance(resolve_attempts, bool) or not isinstance(resolve_attempts, int):
            raise ConfigurationError("resolve_attempts must be a whole number")
        if resolve_attempts < 0:
            raise ConfigurationError("resolve_attempts must not be negative")
        if keys is None:
            keys = KeyScheme(namespace, key_secret)
        elif not isinstance(keys, KeyScheme):
            raise ConfigurationError(f"keys must be a KeyScheme, not {keys!r}")
        elif namespace != DEFAULT_NAMESPACE or key_secret is not None:
            raise ConfigurationError(
                "give the namespace and key_secret in keys=KeyScheme(...), not beside it"
            )
        self.key_scheme = keys
        self._replies = _Replies()
        self.client = client
        self.resolve_attempts = resolve_attempts
        if resolve_retry is None:
            resolve_retry = attrs.evolve(RESOLVE, attempts=resolve_attempts + 1)
        elif not isinstance(resolve_retry, RetryPolicy):
            raise ConfigurationError(f"resolve_retry must be a RetryPolicy, got {resolve_retry!r}")
        self.resolve_retry = resolve_retry
        self._owns_client = _owns_client
        self._cluster = _is_cluster(client)
        self.connection_retry = connection_policy(client)
        self._reconnects = True  # False where the client retries a broken connection itself
        self._apply_script = client.register_script(APPLY_SCRIPT)
        self._load_script = client.register_script(LOAD_SCRIPT)
        self._lock_sha = client.register_script(LOCK_SCRIPT).sha
        self._scripts = {
            self._apply_script.sha: APPLY_SCRIPT,
            self._load_script.sha: LOAD_SCRIPT,
            self._lock_sha: LOCK_SCRIPT,
        }
        self._plain_reads = _hiredis(client)
        self.durability = self._check_durability(durability, client)
        # What follows every write when durability is on, on its connection: a
        # PUBLISH (propagated to the replicas and so a write of this connection,
        # even when the write itself changed nothing: a re-send answered from the
        # op log), then the WAIT that covers every earlier write of the connection.
        self._tail: tuple[tuple[Any, ...], ...] = ()
        if self.durability is not None:
            channel = f"{self.key_scheme.namespace}:durable"
            self._tail = (("PUBLISH", channel, ""), self.durability.command)
        self._durability_checked = self.durability is None or not self.durability.aof

    def _check_durability(self, durability: Any, client: Any) -> Durability | None:
        if durability is None:
            return None
        if not isinstance(durability, Durability):
            raise ConfigurationError(
                f"durability must be a Durability or None, not {type(durability).__name__}"
            )
        if self._cluster:
            raise ConfigurationError(
                "durability is not supported on a Redis Cluster yet: WAIT must follow the write "
                "on its node's connection, which redis-py's cluster client does not let us pick"
            )
        socket_timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
        if socket_timeout is not None and durability.timeout * 2 > socket_timeout:
            raise ConfigurationError(
                f"durability timeout {durability.timeout:g} s must be at most half the "
                f"client's socket_timeout ({socket_timeout:g} s), or a slow wait would read "
                "as a lost reply"
            )
        return durability

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
        retry = options.get("retry")
        if isinstance(retry, RetryPolicy):
            options = {**options, "retry": _redis_retry(retry, asynchronous=asynchronous)}
        elif retry is not None and not callable(getattr(retry, "call_with_retry", None)):
            raise ConfigurationError(
                f"retry must be a chatstate RetryPolicy or a redis-py Retry, got {retry!r}"
            )
        return {**default_client_options(asynchronous=asynchronous), **options}

    kind = "redis"
    stores_schema = True

    def describe(self) -> dict[str, Any]:
        """What observers may say of this backend (OpenTelemetry's database attributes)."""
        out: dict[str, Any] = {"db.system.name": "redis", "db.namespace": self.key_scheme.namespace}
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
        durable = "" if self.durability is None else f" durability={self.durability!r}"
        return (
            f"<{type(self).__name__} {location} namespace={self.key_scheme.namespace!r}{durable}>"
        )

    def _confirm(self, replies: Sequence[Any] | None, key: str, op_id: str | None = None) -> None:
        """Raise :class:`NotDurableError` if a write's wait (``replies``: its tail's) fell short."""
        durability = self.durability
        if durability is None or replies is None:
            return
        if any(isinstance(r, BaseException) for r in replies) or not durability.met(replies[-1]):
            raise durability.not_durable(replies, key, op_id)

    def _aof_refused(self, exc: BaseException) -> ConfigurationError:
        return ConfigurationError(
            "durability=Durability(aof=True) needs WAITAOF (Redis 7.2+, Valkey 7.2+) and "
            f"appendonly yes on the primary; the server answered: {_short(exc)}"
        )

    def keys(self, user_id: str) -> list[str]:
        """The Redis keys of a user's data (for an already checked user id)."""
        return list(self.key_scheme.keys(user_id))

    def _apply_args(self, write: Write, keys: Sequence[str], *, fresh: bool) -> tuple[Any, ...]:
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
        return ("EVAL", self._scripts[args[1]], *args[2:])

    def _users_pattern(self, prefix: str) -> str:
        """The ``SCAN MATCH`` pattern of documents of ids starting with ``prefix``."""
        check_prefix(prefix)
        if self.key_scheme.pseudonymous:
            raise ConfigurationError(
                f"{type(self).__name__} with a key_secret cannot list users: its keys hold "
                "keyed hashes of the user ids, which do not turn back into ids"
            )
        return self.key_scheme.pattern(prefix)

    def _lock_key(self, user_id: str, name: str) -> str:
        return self.key_scheme.lock(user_id, name)

    def _lock_args(self, key: str, action: str, token: str, lease: float) -> tuple[Any, ...]:
        lease_ms = max(1, math.ceil(lease * 1000))
        return ("EVALSHA", self._lock_sha, 1, key, action, token, lease_ms)

    def _erase_keys(self, user_id: str) -> list[str]:
        keys = self.key_scheme.keys(user_id)
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
        return self.key_scheme.deadline(shard)

    def _deadline_shard_key(self, user_id: str) -> str:
        return self.key_scheme.deadline_shard(user_id, self.deadline_shards)

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
