"""Store, clear and refresh a user's JWT: the I/O around :mod:`.._tokens`.

This module is the one body of both twins: ``_sync/tokens.py`` (``get_valid_token``,
``set_jwt_token``, ``clear_jwt_token``) is generated from it by
``tools/unasync.py``. Edit this one, then ``make unasync``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta

from chatstate._actions import CLEAR_TOKEN, REFRESH_TOKEN, SET_TOKEN, failing
from chatstate._twins import resolved_async
from chatstate.auth._jwt import TokenVerifier
from chatstate.auth._tokens import (
    DEFAULT_LOCK_LEASE,
    DEFAULT_MARGIN,
    LOCK_NAME,
    AsyncRefresh,
    _backend_lock,
    _check,
    _checked_new,
    _field,
    _local_locks_async,
    _lost_lock,
    _refresh_failed,
    _refresh_failed_by,
    _usable,
    log,
)
from chatstate.exceptions import LockLostError, LockTimeoutError, TokenRefreshError
from chatstate.observe import notify_token_refresh
from chatstate.state import AsyncCachedUser

__all__ = ["aclear_jwt_token", "aget_valid_token", "aset_jwt_token"]


async def aset_jwt_token(
    user: AsyncCachedUser, token: str, *, verifier: TokenVerifier | None = None
) -> None:
    """Store ``token`` in the user's preserved token field (a login).

    The token is checked first: a JWT, signed (not ``alg: none``), and verified
    when a ``verifier`` is given.

    Raises:
        InvalidTokenError: ``None``, empty or malformed; the message starts with
            ``"Failed to set JWT token"`` and never holds the token.
        ExpiredTokenError: with a verifier, the token has expired.
    """
    field = _field(user)
    with failing(SET_TOKEN):
        info = _check(token, verifier)
        state = await user.load()
        await state.set_preserved(field, token)
    log.info("stored JWT %s for user %r", info.fingerprint, user.user_id)


async def aclear_jwt_token(user: AsyncCachedUser) -> None:
    """Remove the user's token (a logout)."""
    field = _field(user)
    with failing(CLEAR_TOKEN):
        state = await user.load()
        await state.set_preserved(field, None)
    log.info("cleared JWT for user %r", user.user_id)


@contextlib.asynccontextmanager
async def _lock(user: AsyncCachedUser, lease: float, wait: float) -> AsyncIterator[None]:
    backend = user.service.manager.backend
    lock = _backend_lock(backend)
    if lock is not None:
        async with lock(user.user_id, LOCK_NAME, lease=lease, wait=wait):
            yield
        return
    async with _local_locks_async.hold((id(backend), user.user_id), wait, LOCK_NAME):
        yield


async def aget_valid_token(
    user: AsyncCachedUser,
    refresh: AsyncRefresh,
    *,
    margin: timedelta = DEFAULT_MARGIN,
    verifier: TokenVerifier | None = None,
    lock_timeout: float = DEFAULT_LOCK_LEASE,
    wait: float = 30.0,
) -> str:
    """Return a token that is good for at least ``margin``, refreshing it if needed.

    ``refresh`` gets the old token (or ``None``) and returns a new one (the
    asyncio twin also takes a coroutine function). Only one refresh runs at a
    time per user: across threads and processes with a backend that has
    ``lock()`` (Redis: a short lock in the user's own hash slot), across threads
    (or tasks) otherwise. The others wait, then reuse the token it stored.

    Args:
        user: The user whose token it is.
        refresh: Makes a new token (calls your API's login or refresh endpoint).
        margin: Refresh when the token lapses within this long.
        verifier: If given, tokens are verified (signature and claims), not just read.
        lock_timeout: The refresh lock's lease, in seconds: renewed every
            third of it while the refresh runs (on Redis; on a backend whose
            lock cannot renew, the longest a refresh may take), it lapses this
            long after its holder died or failed to release it, so other
            callers wait at most about this long for a dead refresh.
        wait: How long to wait for another refresh before giving up.

    Raises:
        TokenRefreshError: the refresh failed or returned an unusable token; the
            stored token is kept (``old_token_valid`` says whether it still works).
            The refresh callable's own exception is not chained (its message
            could quote a token): ``__cause__`` is a ``RedactedError``.
    """
    field = _field(user)
    state = await user.load()
    token = state.jwt_token
    if _usable(token, verifier, margin):
        assert token is not None
        return token
    result: str | None = None
    with failing(REFRESH_TOKEN):
        try:
            async with _lock(user, lock_timeout, wait):
                # Another thread or process may have refreshed while we waited.
                fresh = await state.refresh()
                token = fresh.get(field)
                if _usable(token, verifier, margin):
                    assert isinstance(token, str)
                    notify_token_refresh("reused")
                    result = token
                else:
                    failure: TokenRefreshError | None = None
                    try:
                        new = await resolved_async(refresh(token))
                    except Exception as exc:  # noqa: BLE001 - any failure of the refresh is reported
                        notify_token_refresh("failed")
                        failure = _refresh_failed_by(exc, token, verifier)
                    if failure is not None:
                        raise failure  # out of the handler: no __context__ to quote a token
                    info = _checked_new(new, token, verifier)
                    await state.set_preserved(field, new)
                    log.info("refreshed JWT for user %r: now %s", user.user_id, info.fingerprint)
                    notify_token_refresh("refreshed")
                    result = new
        except LockTimeoutError:
            raise _refresh_failed(
                "timed out waiting for another refresh", token, verifier
            ) from None
        except LockLostError:
            if result is None:
                raise
            _lost_lock(user.user_id)
    assert result is not None
    return result
