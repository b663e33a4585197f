"""The contract between the state manager and a storage backend.

A backend stores one document per user id and applies a :class:`Write` to it
atomically. Everything a write needs is in the write itself (compiled edits,
limits, TTL, operation id), so a backend holds no merge rules of its own: it
runs the edits with :func:`chatstate.state.apply_edits` (or, like the Redis
backend, an equivalent on the server) and reports what happened.

Third-party backends implement :class:`Backend` or :class:`AsyncBackend` and
prove themselves with the contract suite in :mod:`chatstate.testing`.
"""

from __future__ import annotations

from typing import Final, Literal, Protocol, TypeAlias, runtime_checkable

import attrs

from chatstate.exceptions import StateTooLargeError
from chatstate.state._codec import stored_size
from chatstate.state._rules import Edit, apply_edits, apply_edits_sized, keep_preserved
from chatstate.typing import JSONObject, Path

__all__ = [
    "AsyncBackend",
    "Backend",
    "Delete",
    "Edits",
    "Operation",
    "Outcome",
    "Replace",
    "Reset",
    "Snapshot",
    "Write",
    "apply_operation",
]


MAX_REMEMBERED_OPS: Final = 128
"""Operation ids every backend remembers per user, at least, for deduplication."""


@attrs.frozen
class Snapshot:
    """One user's document and its version.

    ``version`` is 0 for a user with no stored document and goes up by one with
    every write. ``data`` belongs to the caller: changing it changes nothing stored.
    """

    data: JSONObject = attrs.field(repr=False)
    version: int

    def __repr__(self) -> str:
        # Values are left out: a document may hold tokens and personal data.
        return f"Snapshot(version={self.version}, keys={sorted(self.data)!r})"


@attrs.frozen
class Edits:
    """Apply compiled edits (an ``update`` or a ``set_preserved``).

    With ``expected_version`` set, the edits apply only if the stored version is
    that one (a conditional update, as a flow step uses); otherwise the outcome
    is ``"conflict"``.
    """

    edits: tuple[Edit, ...]
    expected_version: int | None = None

    def __repr__(self) -> str:
        # Values are left out: a preserved field may hold a token.
        paths = ", ".join(f"{kind}:{'.'.join(path)}" for kind, path, _ in self.edits)
        return f"Edits({paths})"


@attrs.frozen
class Reset:
    """Drop everything but the preserved fields."""

    preserved: tuple[Path, ...]


@attrs.frozen
class Replace:
    """Compare-and-set: store ``data`` only if the stored version is ``expected_version``."""

    data: JSONObject = attrs.field(repr=False)
    expected_version: int

    def __repr__(self) -> str:
        return f"Replace(expected_version={self.expected_version}, keys={sorted(self.data)!r})"


@attrs.frozen
class Delete:
    """Remove the document, preserved fields included."""


Operation: TypeAlias = Edits | Reset | Replace | Delete


@attrs.frozen
class Write:
    """One atomic write, as a backend receives it.

    Attributes:
        operation: What to do.
        op_id: A unique id for this write. A backend that sees the same id
            again for the same user within ``dedupe_ms`` must not apply it again
            and answers ``"duplicate"`` instead.
        ttl_ms: If set, the document expires this many milliseconds after the write.
        max_bytes: The largest stored size the result may have
            (:func:`chatstate.state.stored_size`).
        dedupe_ms: How long ``op_id`` is remembered after the user's last write
            (a backend remembers at most the 128 newest ids per user).
        generated_id: True when chatstate made ``op_id`` up, so a duplicate can
            only be a retry of this very call (a backend may ignore it).
    """

    operation: Operation
    op_id: str
    ttl_ms: int | None
    max_bytes: int
    dedupe_ms: int
    generated_id: bool = False


@attrs.frozen
class Outcome:
    """What a backend did with a write.

    Attributes:
        status: ``"applied"``; ``"duplicate"`` when ``op_id`` was seen before
            (nothing was written); ``"conflict"`` when a :class:`Replace` found
            another version (nothing was written).
        snapshot: The document after the write, or as it stands for a
            duplicate or a conflict.
        version: The version this write produced: for a duplicate, the one it
            produced when it was first applied; 0 for a delete or a conflict.
    """

    status: Literal["applied", "duplicate", "conflict"]
    snapshot: Snapshot
    version: int

    @property
    def applied(self) -> bool:
        """True when this call applied the write."""
        return self.status == "applied"


@runtime_checkable
class Backend(Protocol):
    """A synchronous store of one document per user id."""

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``. Never creates anything."""
        ...

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically.

        Raises:
            StateTooLargeError: the result would exceed ``write.max_bytes``;
                nothing was written.
            CorruptStateError: the stored data is not a document; nothing was written.
            BackendError: the store failed.
        """
        ...

    def close(self) -> None:
        """Release what the backend owns. Clients passed in by the caller stay open."""
        ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The asyncio twin of :class:`Backend`."""

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``. Never creates anything."""
        ...

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically (see :meth:`Backend.apply`)."""
        ...

    async def aclose(self) -> None:
        """Release what the backend owns. Clients passed in by the caller stay open."""
        ...


def apply_operation(
    current: Snapshot | None,
    operation: Operation,
    max_bytes: int,
    current_size: int | None = None,
) -> tuple[Literal["applied", "conflict"], JSONObject | None, int]:
    """Compute what ``operation`` makes of ``current``: the shared logic of a backend.

    A backend that can hold a lock or a transaction around a read and a write
    (the memory backend, a SQL table) calls this in between and stores the result.

    Args:
        current: The stored document, or ``None`` when there is none. Its
            ``data`` is changed in place; pass a copy you own.
        operation: What to do.
        max_bytes: The largest stored size the result may have.
        current_size: The stored size of ``current`` if the backend keeps it:
            edits then update it from the fields they touch instead of
            measuring the whole document.

    Returns:
        ``(status, data, size)``: ``("applied", new_data, its stored size)``,
        ``("applied", None, 0)`` for a delete, or ``("conflict", None, 0)`` when
        a :class:`Replace` or a conditional :class:`Edits` expected another version.

    Raises:
        StateTooLargeError: the result would exceed ``max_bytes``.
    """
    if isinstance(operation, Delete):
        return "applied", None, 0
    data = current.data if current is not None else {}
    version = current.version if current is not None else 0
    size: int | None = None
    if isinstance(operation, Edits):
        if operation.expected_version is not None and operation.expected_version != version:
            return "conflict", None, 0
        if current_size is not None or current is None:
            size = apply_edits_sized(data, operation.edits, current_size or 0)
        else:
            data = apply_edits(data, operation.edits)
    elif isinstance(operation, Reset):
        data = keep_preserved(data, operation.preserved)
    else:
        if version != operation.expected_version:
            return "conflict", None, 0
        data = operation.data
    if size is None:
        size = stored_size(data)
    if size > max_bytes:
        raise StateTooLargeError(size=size, limit=max_bytes)
    return "applied", data, size
