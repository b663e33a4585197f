"""JWT helpers: keep a user's token in preserved state, refresh it in time, never leak it.

The token lives in the field ``StateData.token_field`` (``"jwt_token"`` by
default), which must be declared preserved, so no patch, reset or cancelled
flow can lose it. Expiry is read with PyJWT, either without checking the
signature (:func:`read_token`: for a token another service issued, whose
contents the bot must not trust) or verified (:class:`TokenVerifier`). Logs and
reprs show a :func:`fingerprint`, never the token.
"""

from chatstate.auth._async.tokens import aclear_jwt_token, aget_valid_token, aset_jwt_token
from chatstate.auth._clients import ApiClient, AsyncApiClient
from chatstate.auth._jwt import TokenInfo, TokenVerifier, fingerprint, read_token
from chatstate.auth._sync.tokens import clear_jwt_token, get_valid_token, set_jwt_token
from chatstate.auth._tokens import get_jwt_token

__all__ = [
    "ApiClient",
    "AsyncApiClient",
    "TokenInfo",
    "TokenVerifier",
    "aclear_jwt_token",
    "aget_valid_token",
    "aset_jwt_token",
    "clear_jwt_token",
    "fingerprint",
    "get_jwt_token",
    "get_valid_token",
    "read_token",
    "set_jwt_token",
]
