"""chatstate: per-user conversation state and flows for chat bots, correct under concurrency."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from chatstate._retry import RetryPolicy
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendPermissionError,
    BackendUnavailable,
    ChatstateError,
    ClaimLostError,
    ConfigurationError,
    ConflictError,
    CorruptStateError,
    CounterError,
    DecryptionError,
    ExpiredTokenError,
    FlowError,
    ImmatureTokenError,
    InvalidFlowDefinition,
    InvalidMessageError,
    InvalidOpIdError,
    InvalidScreenError,
    InvalidTokenError,
    InvalidUserIdError,
    LockError,
    LockLostError,
    LockTimeoutError,
    MigrationError,
    OpIdReusedError,
    OutcomeUnknown,
    PreservedFieldError,
    SchemaVersionError,
    SecretFieldError,
    SerializationError,
    StateError,
    StateTooLargeError,
    StoreBusyError,
    StoreFullError,
    TokenError,
    TokenRefreshError,
    UsageError,
    UserBusyError,
    ValidationError,
)
from chatstate.state import (
    REMEMBERED_OPS,
    AsyncBackend,
    AsyncCachedUser,
    AsyncClaim,
    AsyncMemoryBackend,
    AsyncSqliteBackend,
    AsyncStateManager,
    AsyncStateService,
    Backend,
    CachedUser,
    Claim,
    Document,
    FieldEncryption,
    MemoryBackend,
    Outcome,
    Snapshot,
    SqliteBackend,
    StateData,
    StateManager,
    StateService,
    merge,
)

if _TYPE_CHECKING:
    from chatstate.state import AsyncRedisBackend, RedisBackend

try:
    __version__ = _version("chatstate")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "REMEMBERED_OPS",
    "AsyncBackend",
    "AsyncCachedUser",
    "AsyncClaim",
    "AsyncMemoryBackend",
    "AsyncRedisBackend",
    "AsyncSqliteBackend",
    "AsyncStateManager",
    "AsyncStateService",
    "Backend",
    "BackendAuthenticationError",
    "BackendError",
    "BackendPermissionError",
    "BackendUnavailable",
    "CachedUser",
    "ChatstateError",
    "Claim",
    "ClaimLostError",
    "ConfigurationError",
    "ConflictError",
    "CorruptStateError",
    "CounterError",
    "DecryptionError",
    "Document",
    "ExpiredTokenError",
    "FieldEncryption",
    "FlowError",
    "ImmatureTokenError",
    "InvalidFlowDefinition",
    "InvalidMessageError",
    "InvalidOpIdError",
    "InvalidScreenError",
    "InvalidTokenError",
    "InvalidUserIdError",
    "LockError",
    "LockLostError",
    "LockTimeoutError",
    "MemoryBackend",
    "MigrationError",
    "OpIdReusedError",
    "Outcome",
    "OutcomeUnknown",
    "PreservedFieldError",
    "RedisBackend",
    "RetryPolicy",
    "SchemaVersionError",
    "SecretFieldError",
    "SerializationError",
    "Snapshot",
    "SqliteBackend",
    "StateData",
    "StateError",
    "StateManager",
    "StateService",
    "StateTooLargeError",
    "StoreBusyError",
    "StoreFullError",
    "TokenError",
    "TokenRefreshError",
    "UsageError",
    "UserBusyError",
    "ValidationError",
    "__version__",
    "merge",
]


def __getattr__(name: str) -> _Any:
    """``RedisBackend`` and ``AsyncRedisBackend`` import redis-py on first use."""
    if name in {"RedisBackend", "AsyncRedisBackend"}:
        from chatstate import state  # noqa: PLC0415

        value = getattr(state, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'chatstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "RedisBackend", "AsyncRedisBackend"})
