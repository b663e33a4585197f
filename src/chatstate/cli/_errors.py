"""How a command ends: the exit statuses and the two errors commands raise.

Exit status 0 when all went well, 1 when an operation failed (one line on
standard error), 2 for a usage error, 130 when interrupted. A command raises
:class:`CommandError` or :class:`CommandLineError`; chatstate's own errors are
operation failures too, and ``_core.main`` turns everything into one line and a
status.
"""

from __future__ import annotations

from typing import Final

import redis.exceptions as rex

from chatstate.exceptions import ChatstateError
from chatstate.state.redis import map_redis_errors

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "CommandLineError",
    "operational_message",
    "refused",
]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130


class CommandError(Exception):
    """An operation failed: one line on standard error, exit status 1."""


class CommandLineError(Exception):
    """The command line asks for something impossible: exit status 2."""


def refused(exc: rex.RedisError) -> bool:
    """True when the server refused a command to this ACL user."""
    return isinstance(exc, rex.NoPermissionError) or "NOPERM" in str(exc)[:80]


def operational_message(exc: BaseException) -> str:
    """The one line said for an error no command caught (a server, a socket, a file)."""
    if isinstance(exc, rex.RedisError):
        if refused(exc):
            return (
                f"the server refused a command to this user ({exc}); users, stats and doctor "
                "need more than the library's ACL"
            )
        try:
            with map_redis_errors("-"):
                raise exc
        except ChatstateError as mapped:
            return str(mapped)
        except rex.RedisError:
            return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, rex.RedisClusterException):
        return f"cannot use the Cluster: {exc}"
    return f"{type(exc).__name__}: {exc}"
