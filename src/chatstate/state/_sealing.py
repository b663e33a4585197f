"""Where field encryption meets the write path: writes sealed on the way out, reads opened.

The manager calls :func:`seal` on every write and :func:`reveal` on every
snapshot when the rules carry a :class:`~chatstate.state.FieldEncryption`, so
every backend (memory, Redis, SQLite, yours) only ever holds ciphertext at the
secret paths, and the Lua script merges tokens it cannot read like any other
string. Without encryption neither is called.

Writes are sealed *after* they are compiled and validated (limits and checks
cannot see inside a ciphertext), at the level of compiled edits: the edits a
write makes at or inside a secret path are folded into the one value they
leave there, which is stored as a single encrypted string. Secret fields are
compiled as *replaced* fields (:class:`~chatstate.StateData`), so every patch
that reaches one rewrites it whole; an edit that would merge into a stored
ciphertext is refused.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

from chatstate.exceptions import DecryptionError, SecretFieldError
from chatstate.state._backend import Edits, Increment, Operation, Replace, Snapshot, Write
from chatstate.state._crypto import is_encrypted, key_id_of
from chatstate.state._paths import MISSING, format_path, lookup
from chatstate.state._rules import (
    DELETE,
    MAKE_OBJECT,
    SET,
    Edit,
    apply_edits,
)

if TYPE_CHECKING:
    from chatstate.state._crypto import FieldEncryption
    from chatstate.typing import JSONObject, Path

__all__ = ["mask", "reveal", "seal"]

MASK: Final = "<secret>"


def _inside(path: Path, outer: Path) -> bool:
    """``path`` is ``outer`` or lies inside it."""
    return path[: len(outer)] == outer


def _related(path: Path, secret: Path) -> bool:
    """``path`` is ``secret``, an ancestor of it, or lies inside it."""
    n = min(len(path), len(secret))
    return path[:n] == secret[:n]


def _touches(edits: Collection[Edit], secret: Collection[Path]) -> bool:
    tops = {p[0] for p in secret}
    return any(path and path[0] in tops for _, path, _ in edits)


def seal_edits(
    edits: Sequence[Edit], user_id: str, secret: Collection[Path], cipher: FieldEncryption
) -> Sequence[Edit]:
    """Fold the edits at or inside each secret path into one encrypted ``SET``.

    The value a secret path holds after the edits is worked out on a scratch
    document from the edits on its way (its ancestors) and in it; they are
    replaced by one ``SET`` of the token, placed after the last of them. A
    ``DELETE`` of the path itself stays. ``None`` (JSON null) is stored as it
    is: it carries no secret.

    Raises:
        SecretFieldError: an edit inside a secret field comes before anything
            rewrote the field whole (it would merge into the stored ciphertext).
    """
    if not _touches(edits, secret):
        return edits
    out = list(edits)
    for path in secret:
        related = [i for i, (_, p, _) in enumerate(out) if _related(p, path)]
        folded = {i for i in related if _inside(out[i][1], path)}
        if not folded:
            continue
        for i in related:
            kind, p, _ = out[i]
            if len(p) <= len(path) and kind != MAKE_OBJECT:
                break  # the field (or an ancestor) is rewritten first: nothing is merged
            if i in folded:
                raise SecretFieldError(
                    f"{format_path(p)} would change the encrypted field {format_path(path)} "
                    "in place; a secret field is written whole",
                    path=format_path(path),
                )
        value = lookup(apply_edits({}, [out[i] for i in related]), path)
        last = related[-1]
        sealed: list[Edit] = []
        for i, edit in enumerate(out):
            if i not in folded or (edit[0] == DELETE and edit[1] == path):
                sealed.append(edit)
            if i == last and value is not MISSING:
                token = None if value is None else _encrypt(cipher, user_id, path, value)
                sealed.append((SET, path, token))
        out = sealed
    return out


def seal_document(
    data: JSONObject,
    user_id: str,
    secret: Collection[Path],
    cipher: FieldEncryption,
    previous: JSONObject | None = None,
) -> JSONObject:
    """``data`` with its secret values encrypted; ``previous`` (as stored) lends unchanged ones.

    A secret value equal (as JSON text) to the one ``previous`` holds under the
    current key keeps that ciphertext: rewriting a whole document (a transaction,
    a migration) spends no fresh encryption on fields it did not change.
    """

    def change(path: Path, value: Any) -> Any:
        if previous is not None:
            old = lookup(previous, path)
            if key_id_of(old) == cipher.current:
                try:
                    same = _text(cipher.decrypt(user_id, path, old)) == _text(value)
                except DecryptionError:
                    same = False
                if same:
                    return old
        return _encrypt(cipher, user_id, path, value)

    return cipher._transform(data, (), secret, change)  # noqa: SLF001 - the ring's own walk


def _encrypt(cipher: FieldEncryption, user_id: str, path: Path, value: Any) -> str:
    """Encrypt one value, refusing one that is a ciphertext already.

    A ciphertext reaches a secret path when a migration moves a secret from a
    field no longer declared secret (it was never decrypted): encrypting it again
    would store a value that reads back as a ciphertext.
    """
    if is_encrypted(value):
        raise SecretFieldError(
            f"{format_path(path)} would store an encrypted value encrypted again; keep the "
            "secret field it came from declared secret (StateData.secret) so that it is "
            "decrypted first",
            path=format_path(path),
        )
    return cipher.encrypt(user_id, path, value)


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def seal(
    write: Write,
    user_id: str,
    secret: Collection[Path],
    cipher: FieldEncryption,
    previous: JSONObject | None = None,
) -> Write:
    """Encrypt what ``write`` stores at secret paths, in place; return it.

    ``previous`` is the stored document a :class:`Replace` was made from (see
    :func:`seal_document`).

    Raises:
        SecretFieldError: the write would increment or merge into a secret field.
    """
    op = write.operation
    if type(op) is Edits:
        edits = seal_edits(op.edits, user_id, secret, cipher)
        if edits is not op.edits:
            write.operation = attrs.evolve(op, edits=tuple(edits))
    elif type(op) is Replace:
        data = seal_document(op.data, user_id, secret, cipher, previous)
        write.operation = attrs.evolve(op, data=data)
    elif type(op) is Increment:
        for path in secret:
            if _inside(op.path, path):
                raise SecretFieldError(
                    f"{format_path(op.path)} is an encrypted field and cannot be incremented",
                    path=format_path(path),
                )
    return write


def mask(operation: Operation, secret: Collection[Path]) -> Operation:
    """``operation`` with the values it writes at secret paths replaced by one marker.

    The request digest an op id is remembered with is taken over this, so the
    store holds no unkeyed hash of a secret (a PIN could be found from one by
    trying every PIN).
    """
    if type(operation) is not Edits or not _touches(operation.edits, secret):
        return operation
    edits: list[Edit] = []
    marked: set[Path] = set()
    for kind, p, v in operation.edits:
        holder = next((s for s in secret if _inside(p, s)), None)
        if holder is None:
            edits.append((kind, p, v))
        elif kind == DELETE and p == holder:
            continue  # a rewrite starts with one; a lone delete is told apart below
        elif holder not in marked:
            marked.add(holder)
            edits.append((SET, holder, MASK))  # one marker, whatever the value's shape
    for kind, p, _ in operation.edits:
        if kind == DELETE and p in secret and p not in marked:
            edits.append((DELETE, p, None))  # a deletion is a different request
    return attrs.evolve(operation, edits=tuple(edits))


def reveal(
    snapshot: Snapshot, user_id: str, secret: Collection[Path], cipher: FieldEncryption
) -> Snapshot:
    """A snapshot whose data has its secret values decrypted when first read.

    Raises (from ``data``):
        DecryptionError: a stored token cannot be decrypted.
    """
    return Snapshot.lazy(
        snapshot.version,
        lambda: cipher.decrypt_document(snapshot.data, user_id, secret),
        snapshot.schema,
    )
