"""ApiClient and AsyncApiClient: a bot's API clients sharing one user's state and token.

The twins are written by hand: a property setter cannot wait, so the sync client
stores a token by assignment (``client.jwt_token = ...``) and the asyncio one
through ``await client.set_jwt_token(...)``.
"""

from __future__ import annotations

from chatstate.auth._async.tokens import aclear_jwt_token, aset_jwt_token
from chatstate.auth._jwt import fingerprint
from chatstate.auth._sync.tokens import clear_jwt_token, set_jwt_token
from chatstate.auth._tokens import get_jwt_token
from chatstate.exceptions import UsageError
from chatstate.state import AsyncCachedUser, CachedUser

__all__ = ["ApiClient", "AsyncApiClient"]


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
