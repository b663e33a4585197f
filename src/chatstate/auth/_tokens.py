"""What the JWT helper twins share: the token field, checks and errors, no I/O.

``aget_valid_token``, ``aset_jwt_token`` and ``aclear_jwt_token``
(``auth/_async/tokens.py``) are the one body of both twins; ``get_valid_token``
and the rest of the sync twin (``auth/_sync/tokens.py``) are generated from it by
``tools/unasync.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final

from chatstate._locks import AsyncKeyedLocks, KeyedLocks
from chatstate.auth._jwt import TokenInfo, TokenVerifier, read_token
from chatstate.exceptions import (
    ConfigurationError,
    ExpiredTokenError,
    ImmatureTokenError,
    InvalidTokenError,
    RedactedError,
    TokenError,
    TokenRefreshError,
)
from chatstate.state import AsyncCachedUser, AsyncLocking, CachedUser, Locking

__all__ = ["get_jwt_token"]

log = logging.getLogger("chatstate.auth")

DEFAULT_MARGIN: Final = timedelta(seconds=60)
LOCK_NAME: Final = "jwt-refresh"
DEFAULT_LOCK_LEASE: Final = 5.0
"""The refresh lock's lease: how long a dead or cut-off refresh holds the user at most."""

Refresh = Callable[[str | None], str]
AsyncRefresh = Callable[[str | None], str | Awaitable[str]]


def _field(user: CachedUser | AsyncCachedUser) -> str:
    rules = user.service.rules
    if (rules.token_field,) not in rules.preserved:
        raise ConfigurationError(
            f"the token field {rules.token_field!r} must be preserved: "
            f"StateData(preserved=[{rules.token_field!r}, ...])"
        )
    return rules.token_field


def _check(token: object, verifier: TokenVerifier | None) -> TokenInfo:
    return verifier.verify(token) if verifier is not None else read_token(token)


def get_jwt_token(user: CachedUser | AsyncCachedUser) -> str | None:
    """The user's stored token, or ``None`` (from the user's cached state)."""
    _field(user)
    return user.state.jwt_token


def _usable(token: str | None, verifier: TokenVerifier | None, margin: timedelta) -> bool:
    """True when ``token`` can be used as it is: present, valid, not lapsing within margin."""
    if token is None:
        return False
    try:
        info = _check(token, verifier)
    except (InvalidTokenError, ExpiredTokenError, ImmatureTokenError):
        return False
    return not info.expires_within(margin)


def _still_valid(token: str | None, verifier: TokenVerifier | None) -> bool:
    return _usable(token, verifier, timedelta(0))


def _refresh_failed(
    detail: str, old: str | None, verifier: TokenVerifier | None
) -> TokenRefreshError:
    return TokenRefreshError(detail, old_token_valid=_still_valid(old, verifier))


def _checked_new(new: object, old: str | None, verifier: TokenVerifier | None) -> TokenInfo:
    try:
        return _check(new, verifier)
    except TokenError as exc:
        raise _refresh_failed(
            f"the refresh returned an unusable token ({exc.detail})", old, verifier
        ) from None


# The refresh lock taken when the backend has no lock() of its own: thread locks for
# the sync twin, asyncio locks for the asyncio one.
_local_locks_sync = KeyedLocks()
_local_locks_async = AsyncKeyedLocks()
_warned: set[str] = set()


def _backend_lock(backend: object) -> Any:
    lock = backend.lock if isinstance(backend, Locking | AsyncLocking) else None
    if lock is None:
        name = type(backend).__name__
        if name not in _warned:
            _warned.add(name)
            log.warning(
                "%s has no lock(): token refreshes are single-flight within this "
                "process only (see 'Writing a backend' in the docs)",
                name,
            )
    return lock


def _refresh_failed_by(
    exc: Exception, old: str | None, verifier: TokenVerifier | None
) -> TokenRefreshError:
    """The error for a refresh callable that raised; its message is not kept (a secret?)."""
    error = _refresh_failed(f"the refresh callable raised {type(exc).__name__}", old, verifier)
    error.__cause__ = RedactedError(exc)
    error.__suppress_context__ = True
    return error


def _lost_lock(user_id: str) -> None:
    log.warning(
        "the token refresh lock of user %r lapsed before the refresh ended (it could "
        "not be renewed within lock_timeout): another process may have refreshed at "
        "the same time",
        user_id,
    )
