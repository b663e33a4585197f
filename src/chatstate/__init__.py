"""chatstate: per-user conversation state and flows for chat bots, correct under concurrency.

The top level holds what a bot uses every day: the services, the rules, the
backends, the claim and cached-user handles, and the root of the error tree.
Everything else lives in its module: :mod:`chatstate.exceptions` (every error),
:mod:`chatstate.state` (the manager and the merge helpers),
:mod:`chatstate.state.backend` (for backend authors), :mod:`chatstate.flow`,
:mod:`chatstate.auth`, :mod:`chatstate.observe`, :mod:`chatstate.testing` and
:mod:`chatstate.integrations`.
"""

import warnings as _warnings
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from chatstate import exceptions, state
from chatstate._retry import RetryPolicy
from chatstate.exceptions import ChatstateError
from chatstate.state import (
    AsyncCachedUser,
    AsyncClaim,
    AsyncMemoryBackend,
    AsyncSqliteBackend,
    AsyncStateService,
    CachedUser,
    Claim,
    Document,
    FieldEncryption,
    MemoryBackend,
    Outcome,
    Snapshot,
    SqliteBackend,
    StateData,
    StateService,
)

if _TYPE_CHECKING:
    from chatstate.state import AsyncRedisBackend, RedisBackend

try:
    __version__ = _version("chatstate")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "AsyncCachedUser",
    "AsyncClaim",
    "AsyncMemoryBackend",
    "AsyncRedisBackend",
    "AsyncSqliteBackend",
    "AsyncStateService",
    "CachedUser",
    "ChatstateError",
    "Claim",
    "Document",
    "FieldEncryption",
    "MemoryBackend",
    "Outcome",
    "RedisBackend",
    "RetryPolicy",
    "Snapshot",
    "SqliteBackend",
    "StateData",
    "StateService",
    "__version__",
]

_LAZY = frozenset({"RedisBackend", "AsyncRedisBackend"})
# Names the top level exported before 0.2; each now lives in the module named here.
_MOVED = {
    **{name: "chatstate.exceptions" for name in exceptions.__all__ if name != "ChatstateError"},
    **dict.fromkeys(
        ("REMEMBERED_OPS", "AsyncBackend", "Backend", "AsyncStateManager", "StateManager", "merge"),
        "chatstate.state",
    ),
}


def __getattr__(name: str) -> _Any:
    """The Redis backends (importing redis-py on first use), and the moved names.

    A name that moved (an error, the manager, the protocols) still resolves, with
    a ``DeprecationWarning`` that says where it lives now.
    """
    if name in _LAZY:  # chatstate.state imports redis-py on first use
        value = getattr(state, name)
        globals()[name] = value
        return value
    home = _MOVED.get(name)
    if home is not None:
        _warnings.warn(
            f"chatstate.{name} moved: import it from {home} "
            f"(the top level keeps the everyday names only; see the changelog)",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(exceptions if home == "chatstate.exceptions" else state, name)
    raise AttributeError(f"module 'chatstate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
