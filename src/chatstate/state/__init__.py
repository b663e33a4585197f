"""Per-user state: merge rules, services, the manager and the backends."""

from chatstate.state._backend import (
    AsyncBackend,
    Backend,
    Delete,
    Edits,
    Operation,
    Outcome,
    Replace,
    Reset,
    Snapshot,
    Write,
    apply_operation,
)
from chatstate.state._codec import stored_size
from chatstate.state._manager import AsyncStateManager, StateManager
from chatstate.state._memory import AsyncMemoryBackend, MemoryBackend
from chatstate.state._redis import AsyncRedisBackend, RedisBackend
from chatstate.state._rules import Edit, StateData, apply_edits, diff, merge
from chatstate.state._service import (
    AsyncCachedState,
    AsyncCachedUser,
    AsyncStateService,
    CachedState,
    CachedUser,
    StateService,
)

__all__ = [
    "AsyncBackend",
    "AsyncCachedState",
    "AsyncCachedUser",
    "AsyncMemoryBackend",
    "AsyncRedisBackend",
    "AsyncStateManager",
    "AsyncStateService",
    "Backend",
    "CachedState",
    "CachedUser",
    "Delete",
    "Edit",
    "Edits",
    "MemoryBackend",
    "Operation",
    "Outcome",
    "RedisBackend",
    "Replace",
    "Reset",
    "Snapshot",
    "StateData",
    "StateManager",
    "StateService",
    "Write",
    "apply_edits",
    "apply_operation",
    "diff",
    "merge",
    "stored_size",
]
