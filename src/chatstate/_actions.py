"""What an operation was doing when it failed: the first words of every error message.

Shared by every room (state, auth, flow): an error raised deep inside a call is
relabelled once, by the outermost operation, so its message starts with what the
caller asked for ("Failed to set JWT token: ...").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final

from chatstate.exceptions import StateError

__all__ = ["CLEAR_TOKEN", "REFRESH_TOKEN", "SET_TOKEN", "failing", "relabel"]

SET_TOKEN: Final = "Failed to set JWT token"  # noqa: S105 - a message, not a secret
CLEAR_TOKEN: Final = "Failed to clear JWT token"  # noqa: S105 - a message
REFRESH_TOKEN: Final = "Failed to refresh JWT token"  # noqa: S105 - a message


def relabel(exc: StateError, action: str) -> StateError:
    """Give ``exc`` the action it failed in, unless a deeper layer named one."""
    if exc.action == type(exc).default_action:
        exc.action = action
    return exc


@contextlib.contextmanager
def failing(action: str) -> Iterator[None]:
    """Start the message of any :class:`StateError` raised inside with ``action``."""
    try:
        yield
    except StateError as exc:
        relabel(exc, action)
        raise
