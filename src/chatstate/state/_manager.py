"""StateManager: validates every operation, then has a backend apply it atomically.

The logic (user id checks, compiling patches, building writes, reading outcomes)
lives in :class:`_ManagerCore` and is pure. :class:`StateManager` and
:class:`AsyncStateManager` are thin shells that only add the backend call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import random
import time
import unicodedata
from base64 import urlsafe_b64encode
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import timedelta
from typing import Any, Final, TypeVar

from chatstate.exceptions import (
    ConflictError,
    InvalidUserIdError,
    StateError,
)
from chatstate.state._backend import (
    AsyncBackend,
    Backend,
    Delete,
    Edits,
    Operation,
    Outcome,
    Replace,
    Reset,
    Snapshot,
    Write,
)
from chatstate.state._rules import StateData, copy_json
from chatstate.typing import JSONObject, Path

__all__ = ["AsyncStateManager", "StateManager"]

T = TypeVar("T")

READ: Final = "Failed to read state"
UPDATE: Final = "Failed to update state"
RESET: Final = "Failed to reset state"
DELETE: Final = "Failed to delete state"
SET_PRESERVED: Final = "Failed to set preserved field"
TRANSACTION: Final = "Failed to run state transaction"

DEFAULT_DEDUPE: Final = timedelta(minutes=10)
DEFAULT_MAX_ATTEMPTS: Final = 8
MAX_OP_ID_LENGTH: Final = 200

TransactionFn = Callable[[JSONObject], JSONObject | None]


def new_op_id() -> str:
    """A fresh random operation id (96 bits, URL-safe text)."""
    return urlsafe_b64encode(os.urandom(12)).decode("ascii")


@contextlib.contextmanager
def failing(action: str) -> Iterator[None]:
    """Start the message of any :class:`StateError` raised inside with ``action``."""
    try:
        yield
    except StateError as exc:
        if exc.action == type(exc).default_action:
            exc.action = action
        raise


def _to_ms(value: float | timedelta | None, name: str) -> int | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return max(1, round(seconds * 1000))


class _ManagerCore:
    """Everything a manager does that is not I/O."""

    def __init__(
        self,
        rules: StateData | None,
        ttl: float | timedelta | None,
        dedupe_window: float | timedelta,
        max_attempts: int,
    ) -> None:
        self.rules = rules if rules is not None else StateData()
        self.ttl_ms = _to_ms(ttl, "ttl")
        dedupe_ms = _to_ms(dedupe_window, "dedupe_window")
        assert dedupe_ms is not None
        self.dedupe_ms = dedupe_ms
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts

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

    def write(self, operation: Operation, op_id: str | None) -> Write:
        generated = op_id is None
        if op_id is None:
            op_id = new_op_id()
        elif (
            type(op_id) is not str
            or not op_id
            or len(op_id) > MAX_OP_ID_LENGTH
            or not op_id.isprintable()
        ):
            raise StateError(
                f"op_id must be a non-empty printable str of at most {MAX_OP_ID_LENGTH} characters"
            )
        return Write(operation, op_id, self.ttl_ms, self.rules.max_bytes, self.dedupe_ms, generated)

    @staticmethod
    def settle(write: Write, outcome: Outcome) -> Outcome:
        """A duplicate of an id chatstate generated is this call's own retry: it applied."""
        if outcome.status == "duplicate" and write.generated_id:
            return Outcome("applied", outcome.snapshot, outcome.version)
        return outcome

    def update_write(
        self, patch: Mapping[str, Any], op_id: str | None, if_version: int | None = None
    ) -> Write:
        return self.write(Edits(tuple(self.rules.compile(patch)), if_version), op_id)

    def preserved_write(self, path: str | Path, value: Any, op_id: str | None) -> Write:
        key = tuple(path.split(".")) if isinstance(path, str) else tuple(path)
        return self.write(Edits(tuple(self.rules.set_preserved_edits(key, value))), op_id)

    def reset_write(self, op_id: str | None) -> Write:
        return self.write(Reset(tuple(sorted(self.rules.preserved))), op_id)

    def delete_write(self, op_id: str | None) -> Write:
        return self.write(Delete(), op_id)

    def replace_write(self, current: Snapshot, draft: JSONObject, result: Any) -> Write:
        """The compare-and-set write of a transaction step (``result`` None: the draft)."""
        data = self.rules.check_document(draft if result is None else result)
        self.rules.check_replacement(current.data, data)
        return self.write(Replace(data, current.version), None)

    def conflict(self, attempts: int) -> ConflictError:
        return ConflictError(
            f"the document kept changing; gave up after {attempts} attempts",
            attempts=attempts,
        )

    @staticmethod
    def backoff(attempt: int) -> float:
        """Seconds to wait before the next transaction attempt (jittered)."""
        return random.uniform(0, min(0.05, 0.001 * 2**attempt))  # noqa: S311 - jitter only


class StateManager(_ManagerCore):
    """Applies state operations atomically on a synchronous backend.

    Args:
        backend: Where documents live.
        rules: The merge rules; ``StateData()`` when omitted.
        ttl: If set, a document expires this long after its last write.
        dedupe_window: How long an operation id is remembered.
        max_attempts: How often a transaction retries before ``ConflictError``.

    Raises:
        TypeError: ``backend`` is an async backend (use :class:`AsyncStateManager`).
    """

    def __init__(
        self,
        backend: Backend,
        rules: StateData | None = None,
        *,
        ttl: float | timedelta | None = None,
        dedupe_window: float | timedelta = DEFAULT_DEDUPE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if inspect.iscoroutinefunction(getattr(backend, "apply", None)):
            raise TypeError(
                f"{type(backend).__name__} is asynchronous: use AsyncStateManager "
                "or AsyncStateService"
            )
        super().__init__(rules, ttl, dedupe_window, max_attempts)
        self.backend = backend

    def __repr__(self) -> str:
        return f"<StateManager backend={self.backend!r}>"

    def load(self, user_id: str) -> Snapshot:
        """Return the user's document and version (``{}`` and 0 when there is none)."""
        with failing(READ):
            snapshot = self.backend.load(self.user_id(user_id))
            return snapshot if snapshot is not None else Snapshot({}, 0)

    def apply(self, user_id: str, action: str, make: Callable[[], Write]) -> Outcome:
        """Validate, then apply one write; errors start with ``action``."""
        with failing(action):
            uid = self.user_id(user_id)
            write = make()
            return self.settle(write, self.backend.apply(uid, write))

    def transaction(
        self, user_id: str, fn: TransactionFn, *, max_attempts: int | None = None
    ) -> Snapshot:
        """Run ``fn`` on the document and store its result if nothing changed meanwhile.

        See :meth:`chatstate.StateService.transaction`.
        """
        attempts = max_attempts or self.max_attempts
        with failing(TRANSACTION):
            uid = self.user_id(user_id)
            current = self.backend.load(uid) or Snapshot({}, 0)
            for attempt in range(attempts):
                draft = copy_json(current.data)
                result = fn(draft)
                outcome = self.backend.apply(uid, self.replace_write(current, draft, result))
                if outcome.status != "conflict":
                    return outcome.snapshot
                current = outcome.snapshot
                time.sleep(self.backoff(attempt))
            raise self.conflict(attempts)

    def close(self) -> None:
        """Close the backend."""
        self.backend.close()


class AsyncStateManager(_ManagerCore):
    """The asyncio twin of :class:`StateManager`.

    Raises:
        TypeError: ``backend`` is a sync backend (use :class:`StateManager`).
    """

    def __init__(
        self,
        backend: AsyncBackend,
        rules: StateData | None = None,
        *,
        ttl: float | timedelta | None = None,
        dedupe_window: float | timedelta = DEFAULT_DEDUPE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if not inspect.iscoroutinefunction(getattr(backend, "apply", None)):
            raise TypeError(
                f"{type(backend).__name__} is synchronous: use StateManager or StateService"
            )
        super().__init__(rules, ttl, dedupe_window, max_attempts)
        self.backend = backend

    def __repr__(self) -> str:
        return f"<AsyncStateManager backend={self.backend!r}>"

    async def load(self, user_id: str) -> Snapshot:
        """Return the user's document and version (``{}`` and 0 when there is none)."""
        with failing(READ):
            snapshot = await self.backend.load(self.user_id(user_id))
            return snapshot if snapshot is not None else Snapshot({}, 0)

    async def apply(self, user_id: str, action: str, make: Callable[[], Write]) -> Outcome:
        """Validate, then apply one write; errors start with ``action``."""
        with failing(action):
            uid = self.user_id(user_id)
            write = make()
            return self.settle(write, await self.backend.apply(uid, write))

    async def transaction(
        self,
        user_id: str,
        fn: Callable[[JSONObject], JSONObject | Awaitable[JSONObject | None] | None],
        *,
        max_attempts: int | None = None,
    ) -> Snapshot:
        """The asyncio twin of :meth:`StateManager.transaction`; ``fn`` may be async."""
        attempts = max_attempts or self.max_attempts
        with failing(TRANSACTION):
            uid = self.user_id(user_id)
            current = await self.backend.load(uid) or Snapshot({}, 0)
            for attempt in range(attempts):
                draft = copy_json(current.data)
                result = fn(draft)
                if inspect.isawaitable(result):
                    result = await result
                write = self.replace_write(current, draft, result)
                outcome = await self.backend.apply(uid, write)
                if outcome.status != "conflict":
                    return outcome.snapshot
                current = outcome.snapshot
                await asyncio.sleep(self.backoff(attempt))
            raise self.conflict(attempts)

    async def aclose(self) -> None:
        """Close the backend."""
        await self.backend.aclose()
