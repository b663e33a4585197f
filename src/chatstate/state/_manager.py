"""The state manager's core: validates every operation and builds its write.

The logic (user id checks, compiling patches, operation keys, nonces and
digests, building writes, reading outcomes) lives in :class:`_ManagerCore` and
is pure. ``AsyncStateManager`` (``state/_async/manager.py``) is the thin shell
that adds the backend calls (and the sleeps between retries, which
:class:`~chatstate._retry.RetryPolicy` decides); ``StateManager``
(``state/_sync/manager.py``) is generated from it by ``tools/unasync.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import unicodedata
from base64 import urlsafe_b64encode
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, Final

import attrs

from chatstate import _retry
from chatstate._durations import to_ms
from chatstate._retry import Retrying, RetryPolicy
from chatstate.exceptions import (
    ClaimLostError,
    ConfigurationError,
    ConflictError,
    InvalidOpIdError,
    InvalidUserIdError,
    MigrationError,
    PreservedFieldError,
    SchemaVersionError,
    StateTooLargeError,
    UsageError,
    UserBusyError,
    ValidationError,
)
from chatstate.state._backend import (
    INT64_MAX,
    INT64_MIN,
    Acquire,
    Delete,
    Document,
    Edits,
    Increment,
    Operation,
    Outcome,
    Release,
    Renew,
    Replace,
    Reset,
    Snapshot,
    Write,
    counter_overflow,
)
from chatstate.state._codec import encode_path, encode_value
from chatstate.state._protocols import AsyncBackend, Backend, stores_schema
from chatstate.state._rules import SET, Edit, StateData, copy_json, parse_path
from chatstate.state._sealing import mask, reveal, seal
from chatstate.typing import JSONObject, Path

__all__ = ["digest_text", "request_digest"]


READ: Final = "Failed to read state"
UPDATE: Final = "Failed to update state"
ASSIGN: Final = "Failed to assign state"
INCREMENT: Final = "Failed to increment counter"
RESET: Final = "Failed to reset state"
DELETE: Final = "Failed to delete state"
SET_PRESERVED: Final = "Failed to set preserved field"
TRANSACTION: Final = "Failed to run state transaction"
CLAIM: Final = "Failed to claim user"
COMMIT: Final = "Failed to commit claim"

DEFAULT_DEDUPE: Final = timedelta(minutes=10)
DEFAULT_LEASE: Final = timedelta(seconds=5)
DEFAULT_WAIT: Final = timedelta(seconds=10)
MAX_OP_ID_LENGTH: Final = 200
APP: Final = "app"
"""The purpose of op ids given to the service's write methods."""

TransactionFn = Callable[[JSONObject], JSONObject | None]
AsyncTransactionFn = Callable[[JSONObject], JSONObject | Awaitable[JSONObject | None] | None]
"""A transaction function of the asyncio twin: a plain function or a coroutine function."""


def _b64(raw: bytes) -> str:
    return urlsafe_b64encode(raw).decode("ascii")


def digest_text(text: str, key: bytes | None = None) -> str:
    """A short digest of a request: enough to tell two requests apart.

    With ``key``, HMAC-SHA256 under it (96 bits, 16 characters): without the key
    nothing can be matched against guesses. Without, 48 bits of BLAKE2b.
    """
    raw = text.encode("utf-8", "surrogatepass")
    if key is not None:
        return _b64(hmac.new(key, raw, hashlib.sha256).digest()[:12])
    return _b64(hashlib.blake2b(raw, digest_size=6).digest())


def request_digest(operation: Operation, key: bytes | None = None) -> str:
    """The digest of what an operation asks for (its precondition left out)."""
    if isinstance(operation, Edits):
        parts = [
            kind + encode_path(path) + ("\x00" + encode_value(value) if kind == SET else "")
            for kind, path, value in operation.edits
        ]
        return digest_text("e\n" + "\n".join(parts), key)
    if isinstance(operation, Increment):
        return digest_text(f"i\n{encode_path(operation.path)}\n{operation.by}", key)
    if isinstance(operation, Delete):
        return digest_text("D", key)
    if isinstance(operation, Reset):
        return digest_text("r", key)
    return ""


OPERATIONS: Final = {
    READ: "get",
    UPDATE: "update",
    ASSIGN: "assign",
    INCREMENT: "increment",
    RESET: "reset",
    DELETE: "delete",
    SET_PRESERVED: "set_preserved",
}


def outcome_name(result: Any) -> str:
    status = getattr(result, "status", None)
    return str(status) if status is not None else "read"


def operation_name(operation: str | None, args: tuple[Any, ...]) -> str:
    """What an observed manager call reports: ``operation``, else its ``action`` argument's."""
    return operation or OPERATIONS.get(args[1], "write")


# Where the twins differ, each has its own variant here and tools/unasync.py swaps the
# name: the async source calls the first of each pair, its generated sync twin the second.


def check_backend_async(backend: object) -> None:
    """Refuse a backend whose ``apply`` is not a coroutine function (the sync twin's)."""
    if not isinstance(backend, AsyncBackend) or not inspect.iscoroutinefunction(backend.apply):
        raise UsageError(
            f"{type(backend).__name__} is synchronous: use StateManager or StateService"
        )


def check_backend_sync(backend: object) -> None:
    """Refuse a non-backend, or one whose ``apply`` is a coroutine function (the async twin's)."""
    if isinstance(backend, Backend | AsyncBackend) and inspect.iscoroutinefunction(backend.apply):
        raise UsageError(
            f"{type(backend).__name__} is asynchronous: use AsyncStateManager or AsyncStateService"
        )
    if not isinstance(backend, Backend):
        raise UsageError(f"{type(backend).__name__} is not a chatstate backend")


def _attempts(value: object, name: str = "max_attempts") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def _policy(value: object, name: str) -> RetryPolicy:
    if not isinstance(value, RetryPolicy):
        raise ConfigurationError(f"{name} must be a chatstate RetryPolicy, got {value!r}")
    return value


class _ManagerCore:
    """Everything a manager does that is not I/O."""

    def __init__(
        self,
        rules: StateData | None,
        ttl: float | timedelta | None,
        dedupe_window: float | timedelta,
        max_attempts: int | None,
        backend: object = None,
        *,
        retry: RetryPolicy | None = None,
        claim_retry: RetryPolicy | None = None,
    ) -> None:
        if rules is not None and not isinstance(rules, StateData):
            raise ConfigurationError(f"rules must be a StateData, not {type(rules).__name__}")
        self.rules = rules if rules is not None else StateData()
        self.schema = self.rules.schema_version
        if self.schema is not None and not stores_schema(backend):
            raise ConfigurationError(
                f"{type(backend).__name__} does not store schema versions (it has no "
                "stores_schema = True), so StateData(schema_version=...) cannot be used "
                "with it; see the backend author's recipe in docs/backends.md"
            )
        # What writes carry: code without a schema writes as schema 1 (the shape of
        # documents stored before schemas), so that it never writes into a document a
        # newer release has migrated, on every backend that stores schemas.
        self.write_schema = self.schema
        if self.schema is None and stores_schema(backend):
            self.write_schema = 1
        self.ttl_ms = to_ms(ttl, "ttl")
        dedupe_ms = to_ms(dedupe_window, "dedupe_window")
        assert dedupe_ms is not None
        self.dedupe_ms = dedupe_ms
        if retry is None:
            retry = _retry.TRANSACTION
            if max_attempts is not None:
                retry = attrs.evolve(retry, attempts=_attempts(max_attempts))
        elif max_attempts is not None:
            raise ConfigurationError("pass max_attempts or retry, not both")
        self.retry = _policy(retry, "retry")
        self.claim_retry = _policy(
            _retry.CLAIM if claim_retry is None else claim_retry, "claim_retry"
        )
        self.max_attempts = self.retry.attempts
        # A write refused for its schema is sent again at once after the migration
        # (no wait: the document was just brought up to date), this many times at most.
        self.resend_limit = self.retry.attempts or _retry.TRANSACTION.attempts or 8
        self.cipher = self.rules.encryption
        self.secret = self.rules.secret if self.cipher is not None else frozenset()

    def seal(self, user_id: str, write: Write, previous: Snapshot | None = None) -> Write:
        """Encrypt what ``write`` stores at secret paths (with encryption configured).

        ``previous``: the stored snapshot a whole-document write was made from;
        its ciphertexts of unchanged values are kept.
        """
        if self.cipher is None:
            return write
        raw = previous.data if previous is not None else None
        return seal(write, user_id, self.secret, self.cipher, raw)

    def reveal(self, user_id: str, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with its secret values decrypted when read (with encryption)."""
        if self.cipher is None:
            return snapshot
        return reveal(snapshot, user_id, self.secret, self.cipher)

    def revealed(self, user_id: str, outcome: Outcome) -> Outcome:
        """``outcome`` with its snapshot revealed (see :meth:`reveal`)."""
        if self.cipher is not None:
            outcome.snapshot = reveal(outcome.snapshot, user_id, self.secret, self.cipher)
        return outcome

    def user_id(self, user_id: object) -> str:
        """Check a user id and return its NFC form.

        Canonically equivalent ids (the same text in NFC and NFD) name one user.
        """
        if type(user_id) is not str:
            raise InvalidUserIdError(f"a user id must be a str, not {type(user_id).__name__}")
        if not user_id:
            raise InvalidUserIdError("a user id must not be empty")
        if not user_id.isascii():
            try:
                user_id.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidUserIdError("a user id must be valid unicode text") from None
            user_id = unicodedata.normalize("NFC", user_id)
        limit = self.rules.max_user_id_length
        if len(user_id) > limit:
            raise InvalidUserIdError(
                f"a user id must be at most {limit} characters, got {len(user_id)}"
            )
        return user_id

    def write(
        self,
        operation: Operation,
        op_id: str | None,
        *,
        purpose: str = APP,
        fingerprint: str | None = None,
        digest_request: bool = True,
    ) -> Write:
        """Build the write of ``operation``: its operation key, nonce and digest.

        An explicit ``op_id`` is remembered under a key derived from it and
        ``purpose`` (so the router's ids and yours never collide), with the
        digest of the request (or of ``fingerprint``) beside it.
        """
        ids = _b64(os.urandom(15))  # 20 characters: a nonce of 8, a key of 12
        nonce = ids[:8]
        if op_id is None:
            key = ids[8:]
            digest = ""
        else:
            if (
                type(op_id) is not str
                or not op_id
                or len(op_id) > MAX_OP_ID_LENGTH
                or not op_id.isprintable()
            ):
                raise InvalidOpIdError(
                    "op_id must be a non-empty printable str of at most "
                    f"{MAX_OP_ID_LENGTH} characters"
                )
            material = f"{purpose}\x1f{op_id}".encode("utf-8", "surrogatepass")
            key = _b64(hashlib.blake2b(material, digest_size=9).digest())
            secret = self.rules.digest_key
            if fingerprint is not None:
                # What a user typed: only ever digested under a key (a PIN's
                # unkeyed digest falls to trying every PIN).
                digest = "" if secret is None else digest_text(fingerprint, secret)
            elif digest_request:
                # Secret values are left out of the digest when it is unkeyed (a PIN's
                # plain hash falls to trying every PIN), encrypted or not, and always
                # when they are encrypted (the digest then never depends on them).
                hidden = self.rules.secret if self.cipher is not None or secret is None else ()
                digest = request_digest(mask(operation, hidden) if hidden else operation, secret)
            else:
                digest = ""
        return Write(
            operation, key, nonce, digest, self.ttl_ms, self.rules.max_bytes, self.dedupe_ms,
            op_id=op_id, schema=self.write_schema,
        )  # fmt: skip

    def edits_write(
        self,
        edits: list[Edit],
        op_id: str | None,
        if_version: int | None = None,
        fingerprint: str | None = None,
    ) -> Write:
        if if_version is not None and (type(if_version) is not int or if_version < 0):
            raise UsageError(f"if_version must be a version number, not {if_version!r}")
        return self.write(Edits(tuple(edits), if_version), op_id, fingerprint=fingerprint)

    def update_write(
        self,
        patch: Mapping[str, Any],
        op_id: str | None,
        if_version: int | None = None,
        fingerprint: str | None = None,
    ) -> Write:
        return self.edits_write(self.rules.compile(patch), op_id, if_version, fingerprint)

    def assign_write(self, values: Mapping[Any, Any], op_id: str | None) -> Write:
        return self.write(Edits(tuple(self.rules.assign_edits(values))), op_id)

    def increment_write(self, path: str | Path, by: int, op_id: str | None) -> Write:
        if type(by) is not int:
            raise UsageError(f"increment() adds an int, not {type(by).__name__}")
        checked = self.rules.increment_path(path)
        if not INT64_MIN <= by <= INT64_MAX:
            raise counter_overflow(checked)
        return self.write(Increment(checked, by), op_id)

    def preserved_write(self, path: str | Path, value: Any, op_id: str | None) -> Write:
        key = parse_path(path)
        return self.write(Edits(tuple(self.rules.set_preserved_edits(key, value))), op_id)

    def reset_write(self, op_id: str | None) -> Write:
        return self.write(Reset(tuple(sorted(self.rules.preserved))), op_id)

    def delete_write(self, op_id: str | None, *, force: bool = False) -> Write:
        return self.write(Delete(force), op_id)

    def replace_write(self, current: Snapshot, draft: JSONObject, result: Any) -> Write:
        """The compare-and-set write of a transaction step (``result`` None: the draft)."""
        data = self.rules.check_document(draft if result is None else result)
        self.rules.check_replacement(current.data, data)
        return self.write(Replace(data, current.version), None)

    def document(self, outcome: Outcome) -> Document:
        """The read-only document a write returns."""
        return Document(outcome.snapshot, self.rules.redacted_fields)

    # -- schema migrations -----------------------------------------------------------

    def needs_migration(self, user_id: str, snapshot: Snapshot) -> bool:
        """True when ``snapshot`` is stored at an older schema than this code's.

        Raises:
            SchemaVersionError: it is stored at a newer one.
        """
        schema = self.schema
        if schema is None or snapshot.version == 0 or snapshot.schema == schema:
            return False
        if snapshot.schema > schema:
            raise self.newer(user_id, snapshot.schema)
        return True

    def newer(self, user_id: str, stored: int) -> SchemaVersionError:
        supported = self.schema or 1
        return SchemaVersionError(
            f"the document is at schema version {stored}, newer than the {supported} "
            "this code knows; nothing was read or written (deploy the newer code)",
            user_id=user_id,
            stored=stored,
            supported=supported,
        )

    def migrated(self, user_id: str, snapshot: Snapshot) -> JSONObject:
        """Run the missing migrations on a copy of ``snapshot``'s document.

        Raises:
            MigrationError: a migration raised, returned no JSON object, or
                changed or dropped a preserved field.
        """
        assert self.schema is not None
        old = snapshot.data
        doc = copy_json(old)
        for n in range(snapshot.schema, self.schema):
            try:
                doc = self.rules.migrations[n](doc)
            except Exception as exc:
                raise MigrationError(
                    f"migration {n} -> {n + 1} raised {type(exc).__name__}; nothing was written",
                    user_id=user_id,
                    from_version=n,
                ) from exc
            if type(doc) is not dict:
                raise MigrationError(
                    f"migration {n} -> {n + 1} returned a {type(doc).__name__}, not a dict",
                    user_id=user_id,
                    from_version=n,
                )
        try:
            data = self.rules.check_document(doc)
            self.rules.check_replacement(old, data)
        except PreservedFieldError as exc:
            raise MigrationError(
                f"the migrations to schema {self.schema} changed or dropped preserved "
                f"field {exc.path}; nothing was written",
                user_id=user_id,
                from_version=snapshot.schema,
                path=exc.path,
            ) from exc
        except ValidationError as exc:
            raise MigrationError(
                f"the migrations to schema {self.schema} made a document that is not "
                f"valid ({exc.detail}); nothing was written",
                user_id=user_id,
                from_version=snapshot.schema,
            ) from exc
        return data

    def too_large(
        self, user_id: str, snapshot: Snapshot, exc: StateTooLargeError
    ) -> MigrationError:
        """The error for a migrated document the store refused as too large."""
        return MigrationError(
            f"the migrations to schema {self.schema} made a document over max_bytes "
            f"({exc.detail}); nothing was written",
            user_id=user_id,
            from_version=snapshot.schema,
        )

    def migration_write(self, snapshot: Snapshot, data: JSONObject) -> Write:
        """The compare-and-set write that stores a migrated document (and the new schema).

        It has no op id of its own: a lost reply is settled by its nonce, and a
        crash before it lands leaves the old document for the next reader.
        """
        return self.write(Replace(data, snapshot.version), None)

    def conflict(self, attempts: int) -> ConflictError:
        return ConflictError(
            f"the document kept changing; gave up after {attempts} attempts",
            attempts=attempts,
        )

    def retrying(self, max_attempts: int | None) -> Retrying:
        """The retries of a transaction that lost its first race."""
        attempts = None if max_attempts is None else _attempts(max_attempts)
        return self.retry.begin("transaction", attempts=attempts)

    def claim_retrying(self, wait_ms: int) -> Retrying:
        """The retries of a claim that found the user busy: for up to ``wait``."""
        return self.claim_retry.begin("claim", budget=wait_ms / 1000)

    # -- claims ------------------------------------------------------------------

    def acquire_write(
        self,
        op_id: str | None,
        *,
        purpose: str,
        fingerprint: str | None,
        lease_ms: int,
    ) -> Write:
        return self.write(
            Acquire(lease_ms),
            op_id,
            purpose=purpose,
            fingerprint=fingerprint,
            digest_request=False,
        )

    def commit_write(self, claim: _ClaimCore, *, keep: bool = False) -> Write:
        write = self._claim_write(claim, Edits(tuple(claim.edits)), completes=True)
        write.keeps_claim = keep
        return write

    def renew_write(self, claim: _ClaimCore, lease_ms: int) -> Write:
        """Extend the claim held under ``claim``'s nonce (``"lost"`` once it is not held)."""
        return self._claim_write(claim, Renew(lease_ms), completes=False)

    def release_write(self, claim: _ClaimCore) -> Write:
        return self._claim_write(claim, Release(), completes=False)

    def _claim_write(self, claim: _ClaimCore, operation: Operation, *, completes: bool) -> Write:
        return Write(
            operation, claim.op_key, claim.nonce, claim.digest, self.ttl_ms,
            self.rules.max_bytes, self.dedupe_ms, completes_claim=completes, op_id=claim.op_id,
            want_document=False, schema=self.write_schema,
        )  # fmt: skip

    @staticmethod
    def busy(outcome: Outcome, waited: float) -> UserBusyError:
        return UserBusyError(
            f"another message of this user was still being handled after {waited:.1f} s",
            retry_after=outcome.retry_after_ms / 1000,
        )


class _ClaimCore:
    """What a claim holds: its identity, the snapshot it saw, the staged changes."""

    def __init__(self, core: _ManagerCore, user_id: str, write: Write, outcome: Outcome) -> None:
        self._core = core
        self.user_id = user_id
        self.op_key = write.op_key
        self.nonce = write.nonce
        self.digest = write.digest
        self.op_id = write.op_id
        self.status = outcome.status
        self.snapshot = outcome.snapshot
        self.edits: list[Edit] = []
        self.state = "open" if outcome.status == "claimed" else "done"
        self.kept = False  # committed with keep=True: the message's write is stored
        self.lease = 0.0  # seconds, as claimed

    def stage_update(self, patch: Mapping[str, Any]) -> None:
        self._open()
        self.edits.extend(self._core.rules.compile(patch))

    def stage_assign(self, values: Mapping[Any, Any]) -> None:
        self._open()
        self.edits.extend(self._core.rules.assign_edits(values))

    def stage_preserved(self, path: str | Path, value: Any) -> None:
        self._open()
        self.edits.extend(self._core.rules.set_preserved_edits(parse_path(path), value))

    def _open(self) -> None:
        if self.state != "open":
            raise UsageError(
                "this claim is not open (a duplicate, or already committed or released)"
            )

    def settle_commit(self, outcome: Outcome, *, keep: bool = False) -> Outcome:
        self.state = "done"
        if keep and outcome.status == "applied":
            # Still held: a follow-up commit (under a key of its own, the message's is
            # recorded now) or a release ends it.
            self.state = "open"
            self.edits = []
            self.op_key = _b64(os.urandom(9))
            self.digest = ""
            self.kept = True
        if outcome.status == "lost":
            raise ClaimLostError(
                "the claim's lease ran out and another handler took the user over; "
                "nothing was written"
            )
        return outcome
