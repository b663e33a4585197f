"""Every error chatstate raises, rooted at :class:`ChatstateError`.

The tree::

    ChatstateError
    ├── ConfigurationError (ValueError)    an option or declaration is invalid (at construction)
    ├── UsageError (TypeError)             the API was used the wrong way (the wrong twin, ...)
    ├── StateError                         a state operation failed
    │   ├── ValidationError (ValueError)      the input was refused; nothing was stored
    │   │   ├── SerializationError            a value is not JSON (``path`` names it)
    │   │   ├── StateTooLargeError            the document would exceed ``max_bytes``
    │   │   ├── InvalidUserIdError            the user id is empty, too long or not a str
    │   │   ├── InvalidOpIdError              the op_id is empty, too long or not printable
    │   │   ├── PreservedFieldError           a patch tried to touch a preserved field
    │   │   ├── CounterError                  increment() met a non-integer or overflowed
    │   │   ├── SecretFieldError              a write would change an encrypted field in place
    │   │   └── OpIdReusedError               an op_id came back with a different request
    │   ├── ConflictError                     a transaction kept losing its race
    │   ├── CorruptStateError                 stored data is not a chatstate document
    │   ├── DecryptionError                   an encrypted field cannot be decrypted
    │   ├── SchemaVersionError                a document's schema is newer than the code's
    │   ├── MigrationError                    a schema migration failed or broke a preserved field
    │   ├── UserBusyError                     another message of the user is being handled
    │   ├── ClaimLostError                    a claim expired and another handler took over
    │   ├── LockError                         a backend lock (single-flight refresh)
    │   │   ├── LockTimeoutError (TimeoutError)  not acquired in time
    │   │   └── LockLostError                 its lease ran out while held
    │   ├── BackendError                      the store failed
    │   │   ├── BackendUnavailable (ConnectionError)   unreachable; retrying may help
    │   │   │   └── OutcomeUnknown            a write was sent; whether it applied is unknown
    │   │   │       └── NotDurableError       it applied on the primary, not confirmed durable
    │   │   ├── BackendAuthenticationError (PermissionError)   refused credentials
    │   │   │   └── BackendPermissionError    the ACL user lacks a command the library needs
    │   │   ├── StoreFullError                the store is out of memory
    │   │   └── StoreBusyError                the store is busy (a long script, loading)
    │   └── TokenError                        a JWT could not be stored or used
    │       ├── InvalidTokenError (ValueError)   not a usable JWT
    │       ├── ExpiredTokenError             its exp has passed
    │       ├── ImmatureTokenError            its nbf or iat lies in the future
    │       └── TokenRefreshError             the refresh callable failed
    └── FlowError                          a conversation flow went wrong
        ├── InvalidFlowDefinition (TypeError)   a Flow subclass is inconsistent (at import)
        ├── InvalidScreenError (ValueError)     a screen breaks WhatsApp's limits
        └── InvalidMessageError (ValueError)    a Message's kind and contents disagree

Guarantees: a :class:`ValidationError` (and every error below :class:`StateError`
except :class:`OutcomeUnknown`) means nothing was written. :class:`OutcomeUnknown`
means a write was sent and may have applied; calling again with the same
``op_id`` is safe. Its subclass :class:`NotDurableError` means the write applied
on the primary but the replicas or the AOF did not confirm it in time (a
failover may still lose it); calling again with the same ``op_id`` is safe too.
Each message starts with what failed (``"Failed to update state"``, ...)
followed by why. Messages and attributes never carry the value of
a field, a token or a password: they name paths and keys instead.

Errors Python itself raises for programming mistakes inside *your* callables (a
validator that raises ``KeyError``) pass through unchanged, except inside a schema
migration: that becomes a :class:`MigrationError` (the original chained as its cause).
"""

from __future__ import annotations

__all__ = [
    "BackendAuthenticationError",
    "BackendError",
    "BackendPermissionError",
    "BackendUnavailable",
    "ChatstateError",
    "ClaimLostError",
    "ConfigurationError",
    "ConflictError",
    "CorruptStateError",
    "CounterError",
    "DecryptionError",
    "ExpiredTokenError",
    "FlowError",
    "ImmatureTokenError",
    "InvalidFlowDefinition",
    "InvalidMessageError",
    "InvalidOpIdError",
    "InvalidScreenError",
    "InvalidTokenError",
    "InvalidUserIdError",
    "LockError",
    "LockLostError",
    "LockTimeoutError",
    "MigrationError",
    "NotDurableError",
    "OpIdReusedError",
    "OutcomeUnknown",
    "PreservedFieldError",
    "RedactedError",
    "SchemaVersionError",
    "SecretFieldError",
    "SerializationError",
    "StateError",
    "StateTooLargeError",
    "StoreBusyError",
    "StoreFullError",
    "TokenError",
    "TokenRefreshError",
    "UsageError",
    "UserBusyError",
    "ValidationError",
]


class ChatstateError(Exception):
    """Root of every error raised by chatstate."""


class ConfigurationError(ChatstateError, ValueError):
    """An option or a declaration is invalid; raised when the object is built."""


class UsageError(ChatstateError, TypeError):
    """The API was used the wrong way: the sync twin with an async backend, and the like."""


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
    """The document (or the patch) would be larger than the configured limit.

    Attributes:
        size: The stored size the write would have produced, in bytes (a lower
            bound when the write was refused before it was sent).
        limit: The configured ``max_bytes``.
    """

    def __init__(
        self, *, size: int, limit: int, action: str | None = None, detail: str | None = None
    ) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            detail or f"the document would take {size} bytes, over the limit of {limit}",
            action=action,
        )


class InvalidUserIdError(ValidationError):
    """The user id is not a non-empty str within the length limit."""


class InvalidOpIdError(ValidationError):
    """The operation id is not a non-empty printable str within the length limit."""


class PreservedFieldError(ValidationError):
    """A patch named a preserved field, or tried to replace or delete one.

    Preserved fields change only through ``set_preserved``.

    Attributes:
        path: The preserved field's path, such as ``$.jwt_token``.
    """

    def __init__(self, detail: str, *, path: str, action: str | None = None) -> None:
        self.path = path
        super().__init__(detail, action=action)


class CounterError(ValidationError):
    """``increment()`` found something other than an integer, or would overflow.

    Attributes:
        path: The counter's path, such as ``$.stats.visits``.
        reason: ``"not_integer"`` (the value is not an integer, or an ancestor
            is not an object) or ``"overflow"`` (the result leaves the signed
            64-bit range).
    """

    def __init__(self, detail: str, *, path: str, reason: str, action: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(detail, action=action)


class OpIdReusedError(ValidationError):
    """An ``op_id`` already used for a different request came back.

    Like an HTTP idempotency key: the same id with the same request is a
    harmless duplicate, the same id with another request is a mistake (two
    messages given one id, an id reused across users' actions) and is refused
    rather than silently dropped.

    Attributes:
        op_id: The operation id.
    """

    def __init__(self, detail: str, *, op_id: str, action: str | None = None) -> None:
        self.op_id = op_id
        super().__init__(detail, action=action)


class SecretFieldError(ValidationError):
    """A write would change an encrypted secret field in place.

    A secret field is encrypted as one whole value: it can be replaced or
    deleted, not incremented or merged into.

    Attributes:
        path: The secret field, such as ``$.profile.pin``.
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


class SchemaVersionError(StateError):
    """A stored document has a newer schema version than this code knows.

    Raised instead of reading or writing it: older code never downgrades, nor
    writes its own shape into, a document newer code has migrated. Nothing was
    written.

    Attributes:
        user_id: Whose document it is.
        stored: The document's schema version.
        supported: The newest this code knows (``StateData.schema_version``).
    """

    def __init__(
        self,
        detail: str,
        *,
        user_id: str,
        stored: int,
        supported: int,
        action: str | None = None,
    ) -> None:
        self.user_id = user_id
        self.stored = stored
        self.supported = supported
        super().__init__(detail, action=action)


class MigrationError(StateError):
    """A schema migration failed; nothing was written.

    The migration raised (the cause is chained), returned something that is not
    a JSON object, or changed or dropped a preserved field. The document keeps
    its old schema.

    Attributes:
        user_id: Whose document it is.
        from_version: The schema version the failing migration starts from.
        path: The preserved field it changed or dropped, or ``None``.
    """

    def __init__(
        self,
        detail: str,
        *,
        user_id: str,
        from_version: int,
        path: str | None = None,
        action: str | None = None,
    ) -> None:
        self.user_id = user_id
        self.from_version = from_version
        self.path = path
        super().__init__(detail, action=action)


class DecryptionError(StateError):
    """A stored secret field could not be decrypted; nothing is returned in its place.

    Raised for a token whose key id is not configured, that does not authenticate
    (altered, written under the same id with another key, or moved from another
    user or field), or that is not a well-formed token.

    Attributes:
        user_id: The user whose document holds the field.
        path: The field, such as ``$.jwt_token``.
        key_id: The key id the token names, or ``None`` when it names none.
        reason: ``"unknown_key"``, ``"authentication"``, ``"malformed"``,
            ``"unsupported_version"`` or ``"plaintext"`` (a plaintext value met
            by a key ring built with ``accept_plaintext=False``).
    """

    default_action = "Failed to decrypt state"

    def __init__(
        self,
        detail: str,
        *,
        user_id: str,
        path: str,
        key_id: str | None,
        reason: str,
        action: str | None = None,
    ) -> None:
        self.user_id = user_id
        self.path = path
        self.key_id = key_id
        self.reason = reason
        super().__init__(detail, action=action)


class UserBusyError(StateError):
    """Another message of the same user was still being handled when the wait ran out.

    Nothing was written. Let the platform deliver the message again later (a
    webhook answers 503), or raise the claim's ``wait``.

    Attributes:
        retry_after: Seconds until the other handler's claim lapses at the latest.
    """

    def __init__(self, detail: str, *, retry_after: float, action: str | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(detail, action=action)


class ClaimLostError(StateError):
    """A claim outlived its lease and another handler took the user over.

    Nothing of this handler was written; the other handler handles the message.
    """


class LockError(StateError):
    """A backend lock (the single-flight token refresh uses one) failed."""


class LockTimeoutError(LockError, TimeoutError):
    """The lock was not acquired within the wait."""


class LockLostError(LockError):
    """The lock's lease ran out while it was held: another holder may have run too."""


class BackendError(StateError):
    """The storage backend failed."""


class BackendUnavailable(BackendError, ConnectionError):  # noqa: N818 - the name reads as a state
    """The backend could not be reached (refused, reset, timed out); retrying may help."""


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


class NotDurableError(OutcomeUnknown):
    """A write applied on the primary, but is not confirmed durable (Redis ``durability=``).

    The primary ran it (never "nothing was written"), but within the timeout
    fewer replicas acknowledged it, or the AOF fsync was not confirmed, than
    the backend's ``durability`` asks: a failover now may still lose it. It is
    an :class:`OutcomeUnknown` because that is what it is after a failover, and
    every handler of one does the right thing: calling again with the same
    ``op_id`` is safe (the store answers ``"duplicate"`` or ``"applied"`` and
    waits again), and a claim's commit stays open to be settled.

    Attributes:
        op_id: The operation id the write carried; ``""`` for a write that has
            none (the deadline index, a lock, an erase: each safe to repeat).
        replicas: How many replicas acknowledged it (with ``aof``: fsynced it to
            their AOF); -1 when the server gave no count (an error, below).
        replicas_wanted: How many the backend's durability asks for.
        aof: Whether the primary confirmed the AOF fsync; ``None`` when not asked.
    """

    def __init__(
        self,
        detail: str,
        *,
        op_id: str,
        replicas: int,
        replicas_wanted: int,
        aof: bool | None,
        action: str | None = None,
    ) -> None:
        self.replicas = replicas
        self.replicas_wanted = replicas_wanted
        self.aof = aof
        super().__init__(detail, op_id=op_id, action=action)


class BackendAuthenticationError(BackendError, PermissionError):
    """The backend refused the credentials; retrying will not help."""


class BackendPermissionError(BackendAuthenticationError):
    """The backend user lacks a command or key chatstate needs (a Redis ACL ``NOPERM``)."""


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

    The stored token is left as it was. The refresh callable's own exception is
    not chained (its message might quote a token): ``__cause__`` is a
    :class:`RedactedError` naming its type, with its traceback.

    Attributes:
        old_token_valid: True when the stored token has not expired yet and can
            still be used until it does.
    """

    def __init__(self, detail: str, *, old_token_valid: bool, action: str | None = None) -> None:
        self.old_token_valid = old_token_valid
        super().__init__(detail, action=action)


class RedactedError(Exception):
    """Stands in for an exception whose message may hold a secret: its type and traceback only.

    Attributes:
        original_type: The qualified name of the hidden exception's class.
    """

    def __init__(self, original: BaseException) -> None:
        kind = type(original)
        self.original_type = f"{kind.__module__}.{kind.__qualname__}"
        super().__init__(f"{self.original_type} (message hidden: it may hold a secret)")
        self.__traceback__ = original.__traceback__


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


class InvalidMessageError(FlowError, ValueError):
    """A :class:`~chatstate.flow.Message` was built with a kind its contents do not match."""
