"""Every error chatstate raises, rooted at :class:`ChatstateError`.

The tree::

    ChatstateError
    └── StateError                      a state operation failed
        ├── ValidationError (ValueError)   the input was refused; nothing was stored
        │   ├── SerializationError         a value is not JSON (``path`` names it)
        │   ├── StateTooLargeError         the document would exceed ``max_bytes``
        │   ├── InvalidUserIdError         the user id is empty, too long or not a str
        │   └── PreservedFieldError        a patch tried to touch a preserved field
        ├── ConflictError                  a transaction kept losing its race
        ├── CorruptStateError              stored data is not a chatstate document
        └── BackendError                   the store failed
            ├── BackendUnavailable (ConnectionError)
            │   ├── BackendAuthenticationError   wrong password or ACL user
            │   └── OutcomeUnknown         a write was sent; whether it applied is unknown
            ├── StoreFullError             the store is out of memory
            └── StoreBusyError             the store is busy (a long script, loading)
        TokenError                         a JWT could not be stored or used
        ├── InvalidTokenError (ValueError) not a usable JWT (malformed, unsigned, bad signature)
        ├── ExpiredTokenError              its exp has passed
        ├── ImmatureTokenError             its nbf or iat lies in the future
        └── TokenRefreshError              the refresh callable failed
    FlowError                              a conversation flow went wrong
    ├── InvalidFlowDefinition (TypeError)  a Flow subclass is inconsistent (raised at import)
    └── InvalidScreenError (ValueError)    a screen breaks WhatsApp's limits

Each message starts with what failed (``"Failed to update state"``, ``"Failed to
read state"``, ...) followed by why. Messages and attributes never carry the value
of a preserved field, a token or a password: they name paths and keys instead.
"""

from __future__ import annotations

__all__ = [
    "BackendAuthenticationError",
    "BackendError",
    "BackendUnavailable",
    "ChatstateError",
    "ConflictError",
    "CorruptStateError",
    "ExpiredTokenError",
    "FlowError",
    "ImmatureTokenError",
    "InvalidFlowDefinition",
    "InvalidScreenError",
    "InvalidTokenError",
    "InvalidUserIdError",
    "OutcomeUnknown",
    "PreservedFieldError",
    "SerializationError",
    "StateError",
    "StateTooLargeError",
    "StoreBusyError",
    "StoreFullError",
    "TokenError",
    "TokenRefreshError",
    "ValidationError",
]


class ChatstateError(Exception):
    """Root of every error raised by chatstate."""


class StateError(ChatstateError):
    """A state operation failed.

    The message reads ``"<action>: <detail>"``, for example ``"Failed to update
    state: value at $.cart[2] is a set, not JSON"``.

    Attributes:
        action: What was being done (``"Failed to update state"``).
        detail: Why it failed.
    """

    default_action = "State operation failed"

    def __init__(self, detail: str, *, action: str | None = None) -> None:
        self.detail = detail
        self.action = action or self.default_action
        super().__init__(detail)

    def __str__(self) -> str:
        return f"{self.action}: {self.detail}"


class ValidationError(StateError, ValueError):
    """The input was refused before anything was stored."""


class SerializationError(ValidationError):
    """A value is not representable as JSON.

    Attributes:
        path: A JSONPath-like location of the bad value, such as ``$.cart[2]``.
    """

    def __init__(self, detail: str, *, path: str, action: str | None = None) -> None:
        self.path = path
        super().__init__(detail, action=action)


class StateTooLargeError(ValidationError):
    """The document would be larger than the configured limit.

    Attributes:
        size: The stored size the write would have produced, in bytes.
        limit: The configured ``max_bytes``.
    """

    def __init__(self, *, size: int, limit: int, action: str | None = None) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the document would take {size} bytes, over the limit of {limit}", action=action
        )


class InvalidUserIdError(ValidationError):
    """The user id is not a non-empty str within the length limit."""


class PreservedFieldError(ValidationError):
    """A patch named a preserved field, or tried to replace or delete one.

    Preserved fields change only through ``set_preserved``.

    Attributes:
        path: The preserved field's path, such as ``$.jwt_token``.
    """

    def __init__(self, detail: str, *, path: str, action: str | None = None) -> None:
        self.path = path
        super().__init__(detail, action=action)


class ConflictError(StateError):
    """A compare-and-set transaction lost its race more times than allowed.

    Attributes:
        attempts: How many times it tried.
    """

    def __init__(self, detail: str, *, attempts: int, action: str | None = None) -> None:
        self.attempts = attempts
        super().__init__(detail, action=action)


class CorruptStateError(StateError):
    """Stored data is not a chatstate document; nothing was overwritten.

    Attributes:
        key: The storage key that holds the bad data.
    """

    def __init__(self, detail: str, *, key: str, action: str | None = None) -> None:
        self.key = key
        super().__init__(detail, action=action)


class BackendError(StateError):
    """The storage backend failed."""


class BackendUnavailable(BackendError, ConnectionError):  # noqa: N818 - the name reads as a state
    """The backend could not be reached (refused, reset, timed out)."""


class BackendAuthenticationError(BackendUnavailable):
    """The backend refused the credentials; retrying will not help."""


class OutcomeUnknown(BackendUnavailable):
    """A write was sent but no reply came back, even after retrying it.

    It may or may not have been applied. Retrying the same call with the same
    ``op_id`` is safe: it is applied at most once.

    Attributes:
        op_id: The operation id the write carried.
    """

    def __init__(self, detail: str, *, op_id: str, action: str | None = None) -> None:
        self.op_id = op_id
        super().__init__(detail, action=action)


class StoreFullError(BackendError):
    """The store refused the write because it is out of memory (``maxmemory``)."""


class StoreBusyError(BackendError):
    """The store is busy (a long-running script, or loading its data set)."""


class TokenError(StateError):
    """A JWT could not be stored, read or refreshed. The token is never in the message."""

    default_action = "Failed to use JWT token"


class InvalidTokenError(TokenError, ValueError):
    """Not a usable JWT: missing, malformed, unsigned, or failing verification."""


class ExpiredTokenError(TokenError):
    """The token's ``exp`` has passed."""


class ImmatureTokenError(TokenError):
    """The token's ``nbf`` or ``iat`` lies in the future."""


class TokenRefreshError(TokenError):
    """The refresh callable failed or returned something that is not a usable token.

    The stored token is left as it was.

    Attributes:
        old_token_valid: True when the stored token has not expired yet and can
            still be used until it does.
    """

    def __init__(self, detail: str, *, old_token_valid: bool, action: str | None = None) -> None:
        self.old_token_valid = old_token_valid
        super().__init__(detail, action=action)


class FlowError(ChatstateError):
    """A conversation flow or a screen went wrong."""


class InvalidFlowDefinition(FlowError, TypeError):  # noqa: N818 - named like the subclassing error
    """A ``Flow`` subclass is inconsistent; raised when the class is defined.

    Attributes:
        flow: The class name.
    """

    def __init__(self, message: str, *, flow: str) -> None:
        self.flow = flow
        super().__init__(f"flow {flow}: {message}")


class InvalidScreenError(FlowError, ValueError):
    """A screen breaks one of WhatsApp's limits (too many buttons, a title too long, ...)."""
