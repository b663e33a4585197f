"""Keep a user's JWT in preserved state, refresh it before it lapses, never leak it."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any, Final

from chatstate._actions import CLEAR_TOKEN, REFRESH_TOKEN, SET_TOKEN, failing
from chatstate._locks import AsyncKeyedLocks, KeyedLocks
from chatstate.auth._jwt import TokenInfo, TokenVerifier, fingerprint, read_token
from chatstate.exceptions import (
    ConfigurationError,
    ExpiredTokenError,
    ImmatureTokenError,
    InvalidTokenError,
    LockLostError,
    LockTimeoutError,
    RedactedError,
    TokenError,
    TokenRefreshError,
    UsageError,
)
from chatstate.observe import notify_token_refresh
from chatstate.state import AsyncCachedUser, CachedUser

__all__ = [
    "ApiClient",
    "AsyncApiClient",
    "aclear_jwt_token",
    "aget_valid_token",
    "aset_jwt_token",
    "clear_jwt_token",
    "get_jwt_token",
    "get_valid_token",
    "set_jwt_token",
]

log = logging.getLogger("chatstate.auth")

DEFAULT_MARGIN: Final = timedelta(seconds=60)
LOCK_NAME: Final = "jwt-refresh"

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


def set_jwt_token(user: CachedUser, token: str, *, verifier: TokenVerifier | None = None) -> None:
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
        user.state.set_preserved(field, token)
    log.info("stored JWT %s for user %r", info.fingerprint, user.user_id)


def get_jwt_token(user: CachedUser | AsyncCachedUser) -> str | None:
    """The user's stored token, or ``None`` (from the user's cached state)."""
    _field(user)
    return user.state.jwt_token


def clear_jwt_token(user: CachedUser) -> None:
    """Remove the user's token (a logout)."""
    field = _field(user)
    with failing(CLEAR_TOKEN):
        user.state.set_preserved(field, None)
    log.info("cleared JWT for user %r", user.user_id)


async def aset_jwt_token(
    user: AsyncCachedUser, token: str, *, verifier: TokenVerifier | None = None
) -> None:
    """The asyncio twin of :func:`set_jwt_token`."""
    field = _field(user)
    with failing(SET_TOKEN):
        info = _check(token, verifier)
        await (await user.load()).set_preserved(field, token)
    log.info("stored JWT %s for user %r", info.fingerprint, user.user_id)


async def aclear_jwt_token(user: AsyncCachedUser) -> None:
    """The asyncio twin of :func:`clear_jwt_token`."""
    field = _field(user)
    with failing(CLEAR_TOKEN):
        await (await user.load()).set_preserved(field, None)
    log.info("cleared JWT for user %r", user.user_id)


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


_local_locks = KeyedLocks()
_async_local_locks = AsyncKeyedLocks()
_warned: set[str] = set()


def _backend_lock(backend: object) -> Any:
    lock = getattr(backend, "lock", None)
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


@contextlib.contextmanager
def _sync_lock(user: CachedUser, lease: float, wait: float) -> Iterator[None]:
    backend = user.service.manager.backend
    lock = _backend_lock(backend)
    if lock is not None:
        with lock(user.user_id, LOCK_NAME, lease=lease, wait=wait):
            yield
        return
    with _local_locks.hold((id(backend), user.user_id), wait, LOCK_NAME):
        yield


@contextlib.asynccontextmanager
async def _async_lock(user: AsyncCachedUser, lease: float, wait: float) -> AsyncIterator[None]:
    backend = user.service.manager.backend
    lock = _backend_lock(backend)
    if lock is not None:
        async with lock(user.user_id, LOCK_NAME, lease=lease, wait=wait):
            yield
        return
    async with _async_local_locks.hold((id(backend), user.user_id), wait, LOCK_NAME):
        yield


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
        "the token refresh lock of user %r expired before the refresh ended: raise "
        "lock_timeout, another process may have refreshed at the same time",
        user_id,
    )


def get_valid_token(
    user: CachedUser,
    refresh: Refresh,
    *,
    margin: timedelta = DEFAULT_MARGIN,
    verifier: TokenVerifier | None = None,
    lock_timeout: float = 30.0,
    wait: float = 30.0,
) -> str:
    """Return a token that is good for at least ``margin``, refreshing it if needed.

    ``refresh`` gets the old token (or ``None``) and returns a new one. Only one
    refresh runs at a time per user: across threads and processes with a
    backend that has ``lock()`` (Redis: a short lock in the user's own hash
    slot), across threads otherwise. The others wait, then reuse the token it
    stored.

    Args:
        user: The user whose token it is.
        refresh: Makes a new token (calls your API's login or refresh endpoint).
        margin: Refresh when the token lapses within this long.
        verifier: If given, tokens are verified (signature and claims), not just read.
        lock_timeout: The refresh lock expires after this many seconds if its
            holder dies. A refresh that takes longer is logged as a warning.
        wait: How long to wait for another refresh before giving up.

    Raises:
        TokenRefreshError: the refresh failed or returned an unusable token; the
            stored token is kept (``old_token_valid`` says whether it still works).
            The refresh callable's own exception is not chained (its message
            could quote a token): ``__cause__`` is a ``RedactedError``.
    """
    field = _field(user)
    token = user.state.jwt_token
    if _usable(token, verifier, margin):
        assert token is not None
        return token
    result: str | None = None
    with failing(REFRESH_TOKEN):
        try:
            with _sync_lock(user, lock_timeout, wait):
                # Another thread or process may have refreshed while we waited.
                token = user.state.refresh().get(field)
                if _usable(token, verifier, margin):
                    assert isinstance(token, str)
                    notify_token_refresh("reused")
                    result = token
                else:
                    failure: TokenRefreshError | None = None
                    try:
                        new = refresh(token)
                    except Exception as exc:  # noqa: BLE001 - any failure of the refresh is reported
                        notify_token_refresh("failed")
                        failure = _refresh_failed_by(exc, token, verifier)
                    if failure is not None:
                        raise failure  # out of the handler: no __context__ to quote a token
                    info = _checked_new(new, token, verifier)
                    user.state.set_preserved(field, new)
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


async def aget_valid_token(
    user: AsyncCachedUser,
    refresh: AsyncRefresh,
    *,
    margin: timedelta = DEFAULT_MARGIN,
    verifier: TokenVerifier | None = None,
    lock_timeout: float = 30.0,
    wait: float = 30.0,
) -> str:
    """The asyncio twin of :func:`get_valid_token`; ``refresh`` may be async."""
    field = _field(user)
    state = await user.load()
    token = state.jwt_token
    if _usable(token, verifier, margin):
        assert token is not None
        return token
    result: str | None = None
    with failing(REFRESH_TOKEN):
        try:
            async with _async_lock(user, lock_timeout, wait):
                token = (await state.refresh()).get(field)
                if _usable(token, verifier, margin):
                    assert isinstance(token, str)
                    notify_token_refresh("reused")
                    result = token
                else:
                    failure: TokenRefreshError | None = None
                    try:
                        made = refresh(token)
                        new = await made if inspect.isawaitable(made) else made
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


class ApiClient:
    """A base for a bot's API clients: every client of one user shares its state and token.

    Subclass it for each backend API the bot talks to. A client made from
    another (``Payments(accounts)``) shares the same :class:`CachedUser`, so a
    token set through one is seen by all::

        accounts = Accounts(CachedUser(user_id, service))
        accounts.jwt_token = login_response["token"]     # writes through
        assert accounts.parent.state.jwt_token == accounts.jwt_token
        assert Payments(accounts).jwt_token == accounts.jwt_token

    Args:
        parent: The user (a :class:`CachedUser`) or another client of that user.
    """

    def __init__(self, parent: CachedUser | ApiClient) -> None:
        self.parent: CachedUser = parent.parent if isinstance(parent, ApiClient) else parent

    @property
    def jwt_token(self) -> str | None:
        """The user's token; assigning a token stores it (see :func:`set_jwt_token`)."""
        return get_jwt_token(self.parent)

    @jwt_token.setter
    def jwt_token(self, token: str) -> None:
        set_jwt_token(self.parent, token)

    def logout(self) -> None:
        """Remove the user's token."""
        clear_jwt_token(self.parent)

    def __repr__(self) -> str:
        token = get_jwt_token(self.parent)
        shown = fingerprint(token) if token else None
        return f"<{type(self).__name__} user_id={self.parent.user_id!r} token={shown}>"


class AsyncApiClient:
    """The asyncio twin of :class:`ApiClient` (``await client.parent.load()`` first)."""

    def __init__(self, parent: AsyncCachedUser | AsyncApiClient) -> None:
        self.parent: AsyncCachedUser = (
            parent.parent if isinstance(parent, AsyncApiClient) else parent
        )

    @property
    def jwt_token(self) -> str | None:
        """The user's token from the loaded state."""
        return get_jwt_token(self.parent)

    async def set_jwt_token(self, token: str) -> None:
        """Store a token (see :func:`aset_jwt_token`)."""
        await aset_jwt_token(self.parent, token)

    async def logout(self) -> None:
        """Remove the user's token."""
        await aclear_jwt_token(self.parent)

    def __repr__(self) -> str:
        try:
            token = get_jwt_token(self.parent)
        except UsageError:
            token = None
        shown = fingerprint(token) if token else None
        return f"<{type(self).__name__} user_id={self.parent.user_id!r} token={shown}>"
