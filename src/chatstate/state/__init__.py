"""Per-user state: merge rules, services, the manager and the backends.

The Redis backends (the :mod:`chatstate.state.redis` package) and the
PostgreSQL backends (:mod:`chatstate.state.postgres`) are imported on first use
(``chatstate.state.RedisBackend``, ``chatstate.state.PostgresBackend``), so that
a bot on the memory backend never loads redis-py or psycopg.
"""

from typing import TYPE_CHECKING, Any

from chatstate.state._async.manager import AsyncStateManager
from chatstate.state._async.service import (
    AsyncCachedState,
    AsyncCachedUser,
    AsyncClaim,
    AsyncStateService,
)
from chatstate.state._backend import (
    ERASED_PARTS,
    INT64_MAX,
    INT64_MIN,
    REMEMBERED_OPS,
    UNCHANGED,
    Acquire,
    Delete,
    Document,
    Edits,
    Increment,
    Lease,
    Operation,
    OpLog,
    OpRecord,
    Outcome,
    Release,
    Renew,
    Replace,
    Reset,
    Snapshot,
    Write,
    WriteResult,
    apply_operation,
    apply_write,
    check_deadline,
    check_limit,
)
from chatstate.state._codec import stored_size
from chatstate.state._crypto import FieldEncryption, secret_paths
from chatstate.state._memory import AsyncMemoryBackend, MemoryBackend
from chatstate.state._protocols import (
    AsyncBackend,
    AsyncDeadlineIndex,
    AsyncListing,
    AsyncLocking,
    Backend,
    DeadlineIndex,
    Listing,
    Locking,
)
from chatstate.state._rules import (
    MAX_SCHEMA,
    Edit,
    StateData,
    apply_edits,
    diff,
    merge,
    parse_path,
)
from chatstate.state._sqlite import AsyncSqliteBackend, SqliteBackend
from chatstate.state._sync.manager import StateManager
from chatstate.state._sync.service import CachedState, CachedUser, Claim, StateService
from chatstate.state._sync_as_async import SyncServiceAsAsync

__all__ = [
    "ERASED_PARTS",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_SCHEMA",
    "REMEMBERED_OPS",
    "UNCHANGED",
    "Acquire",
    "AsyncBackend",
    "AsyncCachedState",
    "AsyncCachedUser",
    "AsyncClaim",
    "AsyncDeadlineIndex",
    "AsyncListing",
    "AsyncLocking",
    "AsyncMemoryBackend",
    "AsyncPostgresBackend",
    "AsyncRedisBackend",
    "AsyncSqliteBackend",
    "AsyncStateManager",
    "AsyncStateService",
    "Backend",
    "CachedState",
    "CachedUser",
    "Claim",
    "DeadlineIndex",
    "Delete",
    "Document",
    "Edit",
    "Edits",
    "FieldEncryption",
    "Increment",
    "KeyScheme",
    "Lease",
    "Listing",
    "Locking",
    "MemoryBackend",
    "OpLog",
    "OpRecord",
    "Operation",
    "Outcome",
    "ParsedKey",
    "PostgresBackend",
    "RedisBackend",
    "Release",
    "Renew",
    "Replace",
    "Reset",
    "Snapshot",
    "SqliteBackend",
    "StateData",
    "StateManager",
    "StateService",
    "SyncServiceAsAsync",
    "Write",
    "WriteResult",
    "apply_edits",
    "apply_operation",
    "apply_write",
    "check_deadline",
    "check_limit",
    "diff",
    "merge",
    "parse_path",
    "secret_paths",
    "stored_size",
]

if TYPE_CHECKING:
    from chatstate.state.postgres import AsyncPostgresBackend, PostgresBackend
    from chatstate.state.redis import AsyncRedisBackend, KeyScheme, ParsedKey, RedisBackend

_LAZY = frozenset({"RedisBackend", "AsyncRedisBackend", "KeyScheme", "ParsedKey"})
_LAZY_POSTGRES = frozenset({"PostgresBackend", "AsyncPostgresBackend"})


def __getattr__(name: str) -> Any:
    """Import the Redis or PostgreSQL backends (redis-py, psycopg) when first asked for."""
    if name in _LAZY_POSTGRES:
        from chatstate.state import postgres  # noqa: PLC0415 - psycopg loads on demand

        value = getattr(postgres, name)
        globals()[name] = value
        return value
    if name in _LAZY:
        from chatstate.state import redis  # noqa: PLC0415 - redis-py loads on demand

        value = getattr(redis, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chatstate.state' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_LAZY_POSTGRES})
