"""chatstate: per-user conversation state and flows for chat bots, correct under concurrency."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendUnavailable,
    ChatstateError,
    ConflictError,
    CorruptStateError,
    InvalidUserIdError,
    OutcomeUnknown,
    PreservedFieldError,
    SerializationError,
    StateError,
    StateTooLargeError,
    StoreBusyError,
    StoreFullError,
    ValidationError,
)
from chatstate.state import (
    AsyncBackend,
    AsyncCachedUser,
    AsyncMemoryBackend,
    AsyncRedisBackend,
    AsyncStateManager,
    AsyncStateService,
    Backend,
    CachedUser,
    MemoryBackend,
    Outcome,
    RedisBackend,
    Snapshot,
    StateData,
    StateManager,
    StateService,
    merge,
)

try:
    __version__ = _version("chatstate")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "AsyncBackend",
    "AsyncCachedUser",
    "AsyncMemoryBackend",
    "AsyncRedisBackend",
    "AsyncStateManager",
    "AsyncStateService",
    "Backend",
    "BackendAuthenticationError",
    "BackendError",
    "BackendUnavailable",
    "CachedUser",
    "ChatstateError",
    "ConflictError",
    "CorruptStateError",
    "InvalidUserIdError",
    "MemoryBackend",
    "Outcome",
    "OutcomeUnknown",
    "PreservedFieldError",
    "RedisBackend",
    "SerializationError",
    "Snapshot",
    "StateData",
    "StateError",
    "StateManager",
    "StateService",
    "StateTooLargeError",
    "StoreBusyError",
    "StoreFullError",
    "ValidationError",
    "__version__",
    "merge",
]
