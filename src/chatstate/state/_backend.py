"""The contract between the state manager and a storage backend.

A backend stores, per user id, one document (with its version and stored size)
and an *operation log*: the recent operation ids it has applied, and at most one
claim (a lease a message handler holds while it handles one message of the user).
It applies a :class:`Write` to both atomically. Everything a write needs is in
the write itself (compiled edits, limits, TTL, operation key, nonce), so a
backend holds no merge rules of its own.

A backend that can hold a lock or a transaction around a read and a write (the
memory backend, a SQL table) loads the user's record, calls :func:`apply_write`
and stores what it returns; the Redis backend does the same work in a Lua script.
Both follow this module's rules, and the contract suite in
:mod:`chatstate.testing` proves it.
"""

from __future__ import annotations

import marshal
import os
from base64 import urlsafe_b64encode
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from typing import Any, Final, Literal, NoReturn, TypeAlias, get_args

import attrs

from chatstate.exceptions import (
    CorruptStateError,
    CounterError,
    OpIdReusedError,
    StateTooLargeError,
    UsageError,
)
from chatstate.state._codec import encode_key, encode_value, stored_size, utf8_len
from chatstate.state._rules import (
    Edit,
    apply_edits,
    apply_edits_shared,
    apply_edits_sized,
    format_path,
    keep_preserved,
)
from chatstate.typing import JSONObject, Path

__all__ = [
    "ERASED_PARTS",
    "INT64_MAX",
    "INT64_MIN",
    "OPS_TRIM_AT",
    "REMEMBERED_OPS",
    "Acquire",
    "Delete",
    "Document",
    "Edits",
    "Increment",
    "Lease",
    "OpLog",
    "OpRecord",
    "Operation",
    "Outcome",
    "Release",
    "Renew",
    "Replace",
    "Reset",
    "Snapshot",
    "Write",
    "WriteResult",
    "apply_operation",
    "apply_write",
    "check_deadline",
    "check_limit",
    "check_prefix",
]

ERASED_PARTS: Final = ("document", "operations", "claim", "lock", "deadline")
"""What ``erase`` may report removing for a user, in this order."""

REMEMBERED_OPS: Final = 100
"""The newest operation ids every backend remembers per user, at least.

An id stays remembered until ``dedupe_window`` has passed since the user's last
write, whatever happens to the document meanwhile (expiry, ``delete``). Older
ids may be remembered a little longer: a backend trims the log in batches.
"""

OPS_TRIM_AT: Final = REMEMBERED_OPS + 24
"""The log is trimmed back to the newest :data:`REMEMBERED_OPS` ids when it holds this many.

With its counter this keeps a Redis log within the compact listpack encoding
(``hash-max-listpack-entries`` is 128 by default).
"""

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


def new_op_id() -> str:
    """A fresh random operation id (96 bits, URL-safe text)."""
    return urlsafe_b64encode(os.urandom(12)).decode("ascii")


class Snapshot:
    """One user's document and its version.

    ``version`` is 0 for a user with no stored document and goes up by one with
    every write. ``data`` belongs to the caller: changing it changes nothing
    stored. A backend may hand over a snapshot whose data is decoded only when
    ``data`` is first read (a decoding failure then raises
    :class:`~chatstate.exceptions.CorruptStateError` from ``data``).

    Args:
        data: The document.
        version: Its version.
        schema: The schema version stored with the document (see
            ``StateData(schema_version=...)``); 1 for a document stored
            without one, and for no document.
    """

    __slots__ = ("_data", "_load", "schema", "version")

    def __init__(self, data: JSONObject | None = None, version: int = 0, schema: int = 1) -> None:
        self._data = data if data is not None else {}
        self._load: Callable[[], JSONObject] | None = None
        self.version = version
        self.schema = schema

    @classmethod
    def lazy(cls, version: int, load: Callable[[], JSONObject], schema: int = 1) -> Snapshot:
        """A snapshot whose data ``load()`` makes when it is first read."""
        snapshot = cls(None, version, schema)
        snapshot._load = load
        return snapshot

    @property
    def data(self) -> JSONObject:
        """The document (decoded now if it was not yet)."""
        load = self._load
        if load is not None:
            self._data = load()
            self._load = None
        return self._data

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return (
            self.version == other.version
            and self.schema == other.schema
            and self.data == other.data
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        # Values are left out: a document may hold tokens and personal data.
        schema = f", schema={self.schema}" if self.schema != 1 else ""
        return f"Snapshot(version={self.version}{schema}, keys={sorted(self.data)!r})"


class _Masked:
    """Stands for a preserved value in a :class:`Document`'s repr."""

    def __repr__(self) -> str:
        return "<hidden>"


_MASKED: Final = _Masked()


class _Pending:
    """The one key a :class:`Document` holds until it is first read (see there)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<not decoded yet>"


_PENDING: Final = _Pending()


def _read_only(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError("a Document is read-only; to_dict() or dict(doc) gives a mutable copy")


class Document(dict[str, Any]):
    """A document a write returns: a read-only ``dict``, decoded when first read.

    It is a ``dict``: ``json.dumps(doc)``, ``JSONResponse(doc)``, ``dict(doc)``,
    ``{**doc}`` and ``==`` against a dict work as for the dict :meth:`get
    <chatstate.StateService.get>` returns. It cannot be changed (``doc["k"] =
    v``, ``update``, ``pop`` … raise ``TypeError``); :meth:`to_dict` gives a deep,
    mutable copy. Its ``repr`` hides the values of preserved and secret fields
    (tokens, PINs).

    A write's document is decoded only when it is first read, so a caller that
    ignores it pays nothing. Until then it holds one private placeholder key,
    which C code that reads a dict's storage without calling its methods (such
    as ``orjson``) refuses as a key that is not a string; read it once (``len(doc)``)
    or pass ``doc.to_dict()`` to such code.

    Attributes:
        version: The version this document has.
    """

    __slots__ = ("_preserved", "_snapshot", "version")

    def __init__(self, snapshot: Snapshot, preserved: frozenset[Path] = frozenset()) -> None:
        dict.__init__(self)
        dict.__setitem__(self, _PENDING, None)  # type: ignore[misc]  # see the class docstring
        self._snapshot: Snapshot | None = snapshot
        self._preserved = preserved
        self.version = snapshot.version

    def _data(self) -> dict[str, Any]:
        """Decodes the snapshot into this dict's own storage, once."""
        snapshot = self._snapshot
        if snapshot is not None:
            data = snapshot.data  # may raise CorruptStateError; nothing changed then
            dict.clear(self)
            dict.update(self, data)
            self._snapshot = None
        return self

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self._data(), key)

    def __iter__(self) -> Iterator[str]:
        return dict.__iter__(self._data())

    def __reversed__(self) -> Iterator[str]:
        return dict.__reversed__(self._data())

    def __len__(self) -> int:
        return dict.__len__(self._data())

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self._data(), key)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Document):
            other = other._data()
        return dict.__eq__(self._data(), other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # a dict's; stated for the linter

    def __or__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]  # a plain dict
        if not isinstance(other, dict):
            return NotImplemented
        return dict(self._data()) | other

    def __ror__(self, other: Any) -> dict[str, Any]:  # type: ignore[override]  # a plain dict
        if not isinstance(other, dict):
            return NotImplemented
        return dict(other) | dict(self._data())

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        return dict.keys(self._data())

    def values(self) -> ValuesView[Any]:  # type: ignore[override]
        return dict.values(self._data())

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return dict.items(self._data())

    def get(self, key: str, default: Any = None) -> Any:
        return dict.get(self._data(), key, default)

    def copy(self) -> dict[str, Any]:
        """A shallow copy, as a plain ``dict``."""
        return dict(self._data())

    def to_dict(self) -> JSONObject:
        """A deep, mutable copy of the document."""
        copy: JSONObject = _copy(dict(self._data()))
        return copy

    __setitem__ = __delitem__ = __ior__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[dict[str, Any]]]:
        # Pickled, copied and deep-copied as a plain dict: the copy is the caller's.
        return (dict, (dict(self._data()),))

    def __copy__(self) -> dict[str, Any]:
        return dict(self._data())

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return _copy(dict(self._data()))  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return repr(_mask(dict(self._data()), self._preserved))


def _copy(value: Any) -> Any:
    if type(value) is dict:
        return {k: _copy(v) for k, v in value.items()}
    if type(value) is list:
        return [_copy(v) for v in value]
    return value


def _mask(doc: JSONObject, preserved: frozenset[Path]) -> JSONObject:
    if not preserved:
        return doc
    out = dict(doc)
    for path in preserved:
        node: Any = out
        for key in path[:-1]:
            child = node.get(key) if type(node) is dict else None
            if type(child) is not dict:
                break
            node[key] = child = dict(child)
            node = child
        else:
            if type(node) is dict and path[-1] in node:
                node[path[-1]] = _MASKED
    return out


# -- operations ----------------------------------------------------------------


@attrs.frozen
class Edits:
    """Apply compiled edits (an ``update``, ``assign`` or ``set_preserved``).

    With ``expected_version`` set, the edits apply only if the stored version is
    that one (a conditional update); otherwise the outcome is ``"conflict"``.
    """

    edits: tuple[Edit, ...]
    expected_version: int | None = None

    def __repr__(self) -> str:
        # Values are left out: a preserved field may hold a token.
        paths = ", ".join(f"{kind}:{'.'.join(path)}" for kind, path, _ in self.edits)
        return f"Edits({paths})"


@attrs.frozen
class Increment:
    """Add ``by`` to the integer at ``path`` (0 when missing), creating missing parent objects."""

    path: Path
    by: int


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
    """Remove the document, preserved fields included (the operation log is kept).

    ``force`` removes whatever the document's storage holds, even data that is
    not a chatstate document (the Redis backend deletes a key of any type).
    """

    force: bool = False


@attrs.frozen
class Acquire:
    """Take the user's claim for the write's operation key, for ``lease_ms``.

    Answers ``"claimed"`` (with the document), ``"duplicate"`` when the key was
    applied already, or ``"busy"`` when another claim is held, for another key
    or for this one (``retry_after_ms`` says how long at most): a copy of a
    message being handled waits for that handling to commit, fail or lapse.
    """

    lease_ms: int


@attrs.frozen
class Renew(Acquire):
    """Extend the claim held under the write's nonce to ``lease_ms`` from now.

    Answers ``"claimed"``, or ``"lost"`` when the claim is not (or no longer)
    held under that nonce: a renewal never takes a free or lapsed claim, so one
    that arrives after its claim was committed or released changes nothing. The
    write's operation key is neither looked up nor recorded. (A subclass of
    :class:`Acquire`: a backend that stores what an ``Acquire`` changes stores
    what this changes the same way.)
    """


@attrs.frozen
class Release:
    """Give up the claim held under the write's nonce without recording anything."""


Operation: TypeAlias = Edits | Increment | Reset | Replace | Delete | Acquire | Renew | Release


class Write:
    """One atomic write, as a backend receives it.

    Attributes:
        operation: What to do.
        op_key: The short, printable key under which the operation is
            remembered (the manager derives it from the caller's ``op_id`` and
            its purpose, or makes one up).
        nonce: Identifies this call: its re-sends carry the same nonce, so a
            write that finds its own key *and* nonce recorded was applied by an
            earlier attempt of the same call and answers ``"applied"``.
        digest: A digest of the request (``""``: none). The same key with
            another digest is refused (:class:`~chatstate.exceptions.OpIdReusedError`).
        ttl_ms: If set, the document expires this many milliseconds after the write.
        max_bytes: The largest stored size the result may have
            (:func:`chatstate.state.stored_size`).
        dedupe_ms: How long the operation log is kept after the user's last write.
        completes_claim: The write ends the claim held under ``nonce``: it
            applies only while that claim is the user's (else ``"lost"``), and
            it releases the claim (unless ``keeps_claim``).
        keeps_claim: With ``completes_claim``: the claim stays held after the
            write (its holder ends it later with another write that completes
            the claim, or a :class:`Release`; else it lapses with its lease).
            The router commits a message's step and replies so, and keeps the
            user until the replies are acknowledged sent.
        op_id: The caller's operation id, for error messages (``None`` when
            chatstate made it up).
        want_document: ``False`` when the caller does not need the document
            back (a backend may then leave it out of the outcome's snapshot,
            whose ``data`` is then ``{}``).
        schema: The schema version of the code that sends the write (``None``:
            no schema configured, no check). A write to a stored document of an
            older schema answers ``"stale_schema"`` (a :class:`Replace` instead
            stores it: it carries a migrated document), one to a newer schema
            ``"newer_schema"``; either way nothing is written and the operation
            key is not remembered. A write that creates a document stores its
            schema. See :func:`apply_write`.
    """

    __slots__ = (
        "completes_claim",
        "dedupe_ms",
        "digest",
        "keeps_claim",
        "max_bytes",
        "nonce",
        "op_id",
        "op_key",
        "operation",
        "schema",
        "ttl_ms",
        "want_document",
    )

    def __init__(  # noqa: PLR0917 - a plain record, built by the manager only
        self,
        operation: Operation,
        op_key: str,
        nonce: str,
        digest: str,
        ttl_ms: int | None,
        max_bytes: int,
        dedupe_ms: int,
        completes_claim: bool = False,
        op_id: str | None = None,
        want_document: bool = True,
        schema: int | None = None,
        keeps_claim: bool = False,
    ) -> None:
        self.operation = operation
        self.op_key = op_key
        self.nonce = nonce
        self.digest = digest
        self.ttl_ms = ttl_ms
        self.max_bytes = max_bytes
        self.dedupe_ms = dedupe_ms
        self.completes_claim = completes_claim
        self.op_id = op_id
        self.want_document = want_document
        self.schema = schema
        self.keeps_claim = keeps_claim

    def __repr__(self) -> str:
        return f"Write({self.operation!r}, op_key={self.op_key!r})"


Status: TypeAlias = Literal[
    "applied",
    "duplicate",
    "conflict",
    "claimed",
    "busy",
    "released",
    "lost",
    "stale_schema",
    "newer_schema",
]
STATUSES: Final = frozenset(get_args(Status))
"""Every status an outcome may have."""
SCHEMA_REFUSALS: Final = frozenset({"stale_schema", "newer_schema"})
"""The statuses of a write refused for the stored document's schema (nothing written)."""


class Outcome:
    """What a backend did with a write.

    Attributes:
        status: ``"applied"``; ``"duplicate"`` when the operation id was seen
            before (nothing was written); ``"conflict"`` when a conditional
            write found another version (nothing was written); for claims,
            ``"claimed"``, ``"busy"``, ``"released"`` or ``"lost"``;
            ``"stale_schema"`` or ``"newer_schema"`` when the stored document's
            schema is older or newer than the write's (nothing was written).
        snapshot: The document after the write, or as it stands (its
            ``schema`` is the stored one).
        version: The version this write produced: for a duplicate, the one it
            produced when it was first applied; 0 for a delete or a conflict.
        value: The new value of an :class:`Increment`; for a schema refusal,
            the stored schema.
        retry_after_ms: For ``"busy"``: when the other claim lapses at the latest.
    """

    __slots__ = ("retry_after_ms", "snapshot", "status", "value", "version")

    def __init__(
        self,
        status: Status,
        snapshot: Snapshot,
        version: int,
        value: Any = None,
        retry_after_ms: int = 0,
    ) -> None:
        self.status = status
        self.snapshot = snapshot
        self.version = version
        self.value = value
        self.retry_after_ms = retry_after_ms

    @property
    def applied(self) -> bool:
        """True when this call applied the write."""
        return self.status == "applied"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Outcome):
            return NotImplemented
        return (self.status, self.version, self.value, self.retry_after_ms, self.snapshot) == (
            other.status,
            other.version,
            other.value,
            other.retry_after_ms,
            other.snapshot,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Outcome(status={self.status!r}, version={self.version}, snapshot={self.snapshot!r})"
        )


# -- the operation log ---------------------------------------------------------


class OpRecord:
    """One remembered operation: its place in the log, the version it made, nonce, digest."""

    __slots__ = ("digest", "nonce", "seq", "version")

    def __init__(self, seq: int, version: int, nonce: str, digest: str) -> None:
        self.seq = seq
        self.version = version
        self.nonce = nonce
        self.digest = digest

    def __repr__(self) -> str:
        return f"OpRecord(seq={self.seq}, version={self.version})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OpRecord):
            return NotImplemented
        mine = (self.seq, self.version, self.nonce, self.digest)
        return mine == (other.seq, other.version, other.nonce, other.digest)

    __hash__ = None  # type: ignore[assignment]


@attrs.define
class Lease:
    """The claim on a user: who holds it, until when, and for which operation key."""

    nonce: str
    expires_ms: int
    op_key: str


@attrs.define
class OpLog:
    """A user's operation log (oldest first) and claim, as a backend keeps them."""

    records: dict[str, OpRecord] = attrs.Factory(dict)
    seq: int = 0
    lease: Lease | None = None

    def remember(self, write: Write, version: int) -> None:
        """Record ``write``'s key with the version it made; trim to the newest ids."""
        self.seq += 1
        self.records[write.op_key] = OpRecord(self.seq, version, write.nonce, write.digest)
        if len(self.records) >= OPS_TRIM_AT:
            oldest = self.seq - REMEMBERED_OPS
            self.records = {k: r for k, r in self.records.items() if r.seq > oldest}


@attrs.frozen
class WriteResult:
    """What :func:`apply_write` decided.

    Attributes:
        outcome: What to answer.
        data: The new document to store; ``None`` when the document must be
            removed (a delete); :data:`UNCHANGED` when nothing changes.
        size: The new document's stored size.
        log_changed: True when the operation log changed and must be stored.
        schema: The schema version to store with the new document.
    """

    outcome: Outcome
    data: JSONObject | object | None
    size: int
    log_changed: bool
    schema: int = 1


UNCHANGED: Final = object()
"""``WriteResult.data`` when the document is left as it is."""


def apply_write(  # noqa: C901, PLR0911, PLR0912 - one branch per rule, in the Lua script's order
    current: Snapshot | None,
    log: OpLog,
    write: Write,
    now_ms: int,
    current_size: int | None = None,
    *,
    shared: bool = False,
) -> WriteResult:
    """Decide what ``write`` does to a user's document and operation log.

    This is a backend's whole job between reading a user's record and storing
    it, under whatever lock or transaction makes the two atomic. A backend that
    stores schemas (``stores_schema = True``) passes the stored schema in
    ``current.schema`` and stores :attr:`WriteResult.schema` with the document. ``log`` is
    changed in place; ``current.data`` may be too (pass a copy you own).

    Args:
        current: The stored document, or ``None`` when there is none.
        log: The user's operation log (an empty :class:`OpLog` when none is stored).
        write: The write.
        now_ms: The backend's clock in milliseconds (claims expire by it).
        current_size: The stored size of ``current`` if the backend keeps it.
        shared: ``current.data`` must not change (the memory backend keeps
            stored documents immutable): the result copies only what it edits,
            and every snapshot in the outcome is a private copy made when read.

    Returns:
        What to answer and what to store.

    Raises:
        OpIdReusedError: the operation key was used with another digest.
        StateTooLargeError: the result would exceed ``write.max_bytes``.
        CounterError: an :class:`Increment` met a non-integer or overflowed.
        UsageError: ``current`` is not a :class:`Snapshot` or ``log`` not an :class:`OpLog`.
    """
    _check_inputs(current, log)
    version = current.version if current is not None else 0
    stored_schema = current.schema if current is not None else 1
    op = write.operation

    def found(
        status: Status, made: int, *, changed: bool = False, wait: int = 0, value: Any = None
    ) -> WriteResult:
        outcome = Outcome(status, _as_found(current, shared), made, value, wait)
        return WriteResult(outcome, UNCHANGED, 0, log_changed=changed, schema=stored_schema)

    lease = log.lease
    if isinstance(op, Renew):
        if lease is None or lease.nonce != write.nonce or lease.expires_ms <= now_ms:
            return found("lost", version)
        lease.expires_ms = now_ms + op.lease_ms
        return found("claimed", version, changed=True)
    record = log.records.get(write.op_key)
    if record is not None and not isinstance(op, Release):
        if write.digest and record.digest and record.digest != write.digest:
            raise OpIdReusedError(
                "this op_id was already used for a different request",
                op_id=write.op_id or write.op_key,
            )
        own = record.nonce == write.nonce and not isinstance(op, Acquire)
        return found("applied" if own else "duplicate", record.version)
    if isinstance(op, Acquire):
        if lease is not None and lease.nonce != write.nonce and lease.expires_ms > now_ms:
            # Held by another message, or by another copy of this one that may still
            # fail: wait, then find the key recorded, or the claim released or lapsed.
            return found("busy", version, wait=lease.expires_ms - now_ms)
        log.lease = Lease(write.nonce, now_ms + op.lease_ms, write.op_key)
        return found("claimed", version, changed=True)
    if isinstance(op, Release):
        mine = lease is not None and lease.nonce == write.nonce
        if mine:
            log.lease = None
        return found("released", 0, changed=mine)
    if write.completes_claim and (
        lease is None or lease.nonce != write.nonce or lease.expires_ms <= now_ms
    ):
        return found("lost", version)
    schema = write.schema
    if schema is not None and current is not None and not isinstance(op, Delete):
        # The schema guard: never mix shapes. A replace carries a whole (migrated)
        # document, so it may move a document to a newer schema, never back.
        if stored_schema > schema:
            return found("newer_schema", version, value=stored_schema)
        if stored_schema < schema and not isinstance(op, Replace):
            return found("stale_schema", version, value=stored_schema)
    if isinstance(op, Edits) and not op.edits:
        # Nothing to change: no version, no document made; only the id is remembered.
        if op.expected_version is not None and op.expected_version != version:
            return found("conflict", 0)
        log.remember(write, version)
        if write.completes_claim and not write.keeps_claim:
            log.lease = None
        return found("applied", version, changed=True)
    status_, data, size, value = _apply_document(
        current, op, write.max_bytes, current_size, shared=shared
    )
    if status_ == "conflict":
        return found("conflict", 0)
    new_version = 0 if data is None else version + 1
    log.remember(write, new_version)
    if write.completes_claim and not write.keeps_claim:
        log.lease = None
    new_schema = stored_schema if schema is None else schema
    if data is None:
        snapshot = Snapshot({}, 0)
    elif shared:
        snapshot = _private(data, new_version, new_schema)
    else:
        snapshot = Snapshot(data, new_version, new_schema)
    outcome = Outcome("applied", snapshot, new_version, value=value)
    return WriteResult(outcome, data, size, log_changed=True, schema=new_schema)


def apply_operation(
    current: Snapshot | None,
    operation: Operation,
    max_bytes: int,
    current_size: int | None = None,
) -> tuple[Literal["applied", "conflict"], JSONObject | None, int]:
    """Compute what a document operation makes of ``current``, ignoring operation ids.

    :func:`apply_write` calls it; it is public for backends that keep their own
    operation log.

    Args:
        current: The stored document, or ``None``. Its ``data`` is changed in
            place; pass a copy you own.
        operation: What to do (not an :class:`Acquire` or :class:`Release`).
        max_bytes: The largest stored size the result may have.
        current_size: The stored size of ``current`` if the backend keeps it.

    Returns:
        ``(status, data, size)``: ``("applied", new_data, its stored size)``,
        ``("applied", None, 0)`` for a delete, or ``("conflict", None, 0)``.

    Raises:
        StateTooLargeError: the result would exceed ``max_bytes``.
        CounterError: an :class:`Increment` met a non-integer or overflowed.
        UsageError: ``current`` is not a :class:`Snapshot`.
    """
    _check_inputs(current, None)
    status, data, size, _ = _apply_document(current, operation, max_bytes, current_size)
    return status, data, size


def _check_inputs(current: object, log: object) -> None:
    """A backend author's mistake, named (a dict for a snapshot gives no AttributeError)."""
    if current is not None and not isinstance(current, Snapshot):
        raise UsageError(
            f"current must be a Snapshot(data, version) or None, not {type(current).__name__}"
        )
    if log is not None and not isinstance(log, OpLog):
        raise UsageError(f"log must be an OpLog, not {type(log).__name__}")


def clone(doc: JSONObject) -> JSONObject:
    """A deep copy of a JSON document (marshal is the fastest deep copy of plain data).

    Only ever loads what it dumped a moment before, in this process.
    """
    return marshal.loads(marshal.dumps(doc))  # type: ignore[no-any-return]  # noqa: S302


def _private(data: JSONObject, version: int, schema: int = 1) -> Snapshot:
    return Snapshot.lazy(version, lambda: clone(data), schema)


def _as_found(current: Snapshot | None, shared: bool) -> Snapshot:
    """The outcome's snapshot of a document as the write found it."""
    if current is None:
        return Snapshot({}, 0)
    return _private(current.data, current.version, current.schema) if shared else current


def _apply_document(  # noqa: C901, PLR0912 - one branch per operation
    current: Snapshot | None,
    operation: Operation,
    max_bytes: int,
    current_size: int | None,
    *,
    shared: bool = False,
) -> tuple[Literal["applied", "conflict"], JSONObject | None, int, Any]:
    if isinstance(operation, Delete):
        return "applied", None, 0, None
    data = current.data if current is not None else {}
    version = current.version if current is not None else 0
    size: int | None = None
    value: Any = None
    if isinstance(operation, Edits):
        if operation.expected_version is not None and operation.expected_version != version:
            return "conflict", None, 0, None
        if shared:
            data, size = apply_edits_shared(data, operation.edits, current_size or 0)
            if current_size is None and current is not None:
                size = None  # the edits only count the change: measured whole below
        elif current_size is not None or current is None:
            size = apply_edits_sized(data, operation.edits, current_size or 0)
        else:
            data = apply_edits(data, operation.edits)
    elif isinstance(operation, Increment):
        if shared:
            data = _copy_path(data, operation.path)
        value, delta = increment_in_place(data, operation.path, operation.by)
        if current_size is not None or current is None:
            size = (current_size or 0) + delta
    elif isinstance(operation, Reset):
        data = keep_preserved(data, operation.preserved)
    elif isinstance(operation, Replace):
        if version != operation.expected_version:
            return "conflict", None, 0, None
        data = operation.data
        if shared:
            data = clone(data)
    else:
        raise TypeError(f"{type(operation).__name__} is not a document operation")
    if size is None:
        size = stored_size(data)
    if size > max_bytes:
        raise StateTooLargeError(size=size, limit=max_bytes)
    return "applied", data, size, value


def _copy_path(doc: JSONObject, path: Path) -> JSONObject:
    """A shallow copy of ``doc`` with the objects on ``path`` (above its leaf) copied too."""
    new = dict(doc)
    node = new
    for key in path[:-1]:
        child = node.get(key)
        if type(child) is not dict:
            break
        node[key] = child = dict(child)
        node = child
    return new


def increment_in_place(doc: JSONObject, path: Path, by: int) -> tuple[int, int]:
    """Add ``by`` to the integer at ``path`` in ``doc``; return the new value and the size change.

    Missing parent objects are created. Raises :class:`CounterError` when a
    parent is not an object, the value is not an int, or the result leaves the
    signed 64-bit range; ``doc`` is then unchanged.
    """
    node: Any = doc
    delta = 0
    prefix = 0
    missing_from = None
    for i, key in enumerate(path[:-1]):
        prefix += utf8_len(encode_key(key))
        child = node.get(key) if missing_from is None else None
        if missing_from is None and child is None and key not in node:
            missing_from = i
        if missing_from is None:
            if type(child) is not dict:
                raise counter_not_integer(path)
            node = child
        else:
            delta += prefix + 2
    last = path[-1]
    leaf_len = prefix + utf8_len(encode_key(last))
    old: Any = 0
    if missing_from is None and last in node:
        old = node[last]
        if type(old) is not int or not INT64_MIN <= old <= INT64_MAX:
            raise counter_not_integer(path)
        delta -= leaf_len + len(str(old))
    new = old + by
    if not INT64_MIN <= new <= INT64_MAX:
        raise counter_overflow(path)
    if missing_from is not None:
        for key in path[missing_from:-1]:
            node = node.setdefault(key, {})
    node[last] = new
    delta += leaf_len + len(encode_value(new))
    return new, delta


def counter_not_integer(path: Path) -> CounterError:
    where = format_path(path)
    return CounterError(
        f"the value at {where} (or a parent) is not a 64-bit integer",
        path=where,
        reason="not_integer",
    )


def counter_overflow(path: Path) -> CounterError:
    """The error for an increment that leaves the signed 64-bit range."""
    where = format_path(path)
    return CounterError(
        f"incrementing {where} would overflow the signed 64-bit range",
        path=where,
        reason="overflow",
    )


def corrupt(key: str, why: str) -> CorruptStateError:
    """The error for stored data that is not a chatstate record."""
    return CorruptStateError(f"{why} (key {key!r}); nothing was written", key=key)


def check_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a str (the start of user ids to list)."""
    if not isinstance(prefix, str):
        raise UsageError(f"prefix must be a str, not {prefix!r}")
    return prefix


def check_deadline(at_ms: object) -> int:
    """Return ``at_ms`` if it is a whole number of milliseconds a double holds exactly."""
    if isinstance(at_ms, bool) or not isinstance(at_ms, int):
        raise UsageError(f"a deadline is a whole number of milliseconds, not {at_ms!r}")
    if not -(2**53) <= at_ms <= 2**53:
        raise UsageError("a deadline must be within 2**53 ms (a sorted-set score)")
    return at_ms


def check_limit(limit: object) -> int:
    """Return ``limit`` if it is a positive whole number."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"limit must be a positive whole number, not {limit!r}")
    return limit
