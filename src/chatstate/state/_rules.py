"""The merge rules, written once and shared by every backend.

A patch is compiled into a short list of *edits* (make an object, delete a path,
set a leaf). The memory backend applies edits to a nested dict with
:func:`apply_edits`; the Redis backend hands the same edits to a Lua script that
applies them to the flat form (see ``_codec``). Both therefore follow the same
rules, and the parity tests prove they reach the same document.

The default rule is RFC 7396 (JSON Merge Patch): nested objects merge, ``None``
deletes a key, lists and scalars replace. Per-field policies change that:
*replaced* fields take an object patch whole instead of merging it, and
*preserved* fields cannot be named by a patch at all.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

import attrs

from chatstate.exceptions import (
    ConfigurationError,
    PreservedFieldError,
    SerializationError,
    StateTooLargeError,
)
from chatstate.state._codec import encode_key, subtree_size, utf8_len, value_size
from chatstate.state._crypto import FieldEncryption
from chatstate.state._paths import (
    MISSING,
    drop_nones,
    format_path,
    lookup,
    parse_path,
    secret_paths,
)
from chatstate.typing import JSONObject, Path

__all__ = [
    "DELETE",
    "MAKE_OBJECT",
    "SET",
    "Edit",
    "StateData",
    "apply_edits",
    "diff",
    "format_path",
    "keep_preserved",
    "merge",
    "parse_path",
]

MAKE_OBJECT: Final = "o"
DELETE: Final = "d"
SET: Final = "s"

EditKind: TypeAlias = Literal["o", "d", "s"]
Edit: TypeAlias = tuple[EditKind, Path, Any]
"""``(kind, path, value)``; ``value`` is only meaningful for ``SET``."""

DEFAULT_MAX_DEPTH: Final = 32
DEFAULT_MAX_BYTES: Final = 128 * 1024
MAX_SCHEMA: Final = 999_999_999
"""The highest schema version (nine digits: every backend stores it exactly)."""


def _to_paths(specs: Iterable[str | Iterable[str]]) -> frozenset[Path]:
    if isinstance(specs, str):
        specs = [specs]
    return frozenset(parse_path(s) for s in specs)


Migration: TypeAlias = Callable[[JSONObject], JSONObject]
"""A schema migration: takes a document of schema ``n`` and returns it at ``n + 1``."""


def _to_migrations(value: object) -> Mapping[int, Migration]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"migrations must be a mapping of schema versions to functions, not {value!r}"
        )
    return MappingProxyType(dict(value))


def _to_secret_paths(specs: Iterable[str | Iterable[str]]) -> frozenset[Path]:
    return secret_paths(specs)


def _default_secret(rules: StateData) -> list[str]:
    return [rules.token_field] if rules.encryption is not None else []


def _to_digest_key(key: object) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes) or len(key) < 16:
        raise ConfigurationError("digest_key must be a secret of at least 16 bytes (or text)")
    return key


def _is_prefix(prefix: Path, path: Path) -> bool:
    return len(prefix) <= len(path) and path[: len(prefix)] == prefix


@attrs.frozen
class StateData:
    """The rules for one kind of state document.

    Args:
        preserved: Fields kept by ``reset()`` and by every patch. A patch may not
            name them, delete them with ``None`` or replace an object that holds
            them; they change only through ``set_preserved``. Give dotted
            strings (``"auth.jwt_token"``) or tuples of keys.
        replaced: Fields whose object value a patch replaces whole instead of
            merging into (a shopping cart, a form snapshot).
        max_depth: The deepest nesting of objects and lists a value may have.
        max_bytes: The largest stored size of a document, in UTF-8 bytes of its
            flat paths and values (a little over its JSON size).
        max_user_id_length: The longest user id, in characters.
        token_field: The top-level field where :mod:`chatstate.auth` keeps a
            user's JWT. The auth helpers require it to be preserved.
        schema_version: The version of the document's shape this code reads
            and writes (a whole number from 1), stored with every document as
            metadata; ``None`` (the default) stores and checks none. A document
            stored without one counts as version 1. See :doc:`migrations`.
        migrations: ``{n: fn}`` for every ``n`` from 1 to ``schema_version - 1``:
            ``fn`` takes a document (a plain dict) of schema ``n`` and returns
            it at ``n + 1``. It must be a pure function of the document (it may
            run again on the same document) and leave preserved fields alone.
        encryption: A :class:`~chatstate.state.FieldEncryption` key ring: the
            values of the ``secret`` fields are then encrypted (AES-256-GCM)
            before they leave the process and decrypted on read. ``None`` (the
            default): nothing is encrypted.
        secret: Fields that hold secrets. They are redacted by ``export()``
            and, with ``encryption``, stored encrypted, each as one whole value:
            a patch replaces a secret object instead of merging into it (as for
            ``replaced``), and it cannot be incremented. Defaults to
            ``[token_field]`` when ``encryption`` is given, else none.
        digest_key: A secret of at least 16 bytes (``bytes``, or text read as
            UTF-8) shared by every process of the deployment, like the
            encryption keys. The digests the operation log keeps beside an op
            id (to refuse an id reused for another request) are then
            HMAC-SHA256 under it, so nothing in the store can be matched
            against guesses of what was sent. Without it, a message's content
            (``fingerprint=``) is never digested (an id reused for other
            content is not detected), and request digests of ``update_once``
            and the like are plain 48-bit hashes of the values written
            (secret fields left out: a request that differs only in a secret
            value is taken for the same one, so a reused op id does not store
            a new PIN).

    Raises:
        ConfigurationError: a field is both preserved and replaced, a replaced
            field holds a preserved one, a limit is not positive, the schema
            version or migrations are not as described, a secret field lies
            inside another or holds a preserved field, ``encryption`` is
            not a ``FieldEncryption``, or ``digest_key`` is shorter than 16 bytes.
    """

    preserved: frozenset[Path] = attrs.field(default=frozenset(), converter=_to_paths)
    replaced: frozenset[Path] = attrs.field(default=frozenset(), converter=_to_paths)
    max_depth: int = DEFAULT_MAX_DEPTH
    max_bytes: int = DEFAULT_MAX_BYTES
    max_user_id_length: int = 256
    token_field: str = "jwt_token"  # noqa: S105 - a field name, not a secret
    schema_version: int | None = None
    migrations: Mapping[int, Migration] = attrs.field(
        factory=dict, converter=_to_migrations, repr=lambda m: repr(sorted(m)), hash=False
    )
    encryption: FieldEncryption | None = attrs.field(default=None, repr=False)
    secret: frozenset[Path] = attrs.field(
        default=attrs.Factory(_default_secret, takes_self=True), converter=_to_secret_paths
    )
    digest_key: bytes | None = attrs.field(
        default=None, converter=_to_digest_key, repr=False, eq=False, kw_only=True
    )
    _whole: frozenset[Path] = attrs.field(init=False, repr=False, eq=False)
    _redacted: frozenset[Path] = attrs.field(init=False, repr=False, eq=False)
    _preserved_ancestors: frozenset[Path] = attrs.field(init=False, repr=False, eq=False)
    _guarded: frozenset[Path] = attrs.field(init=False, repr=False, eq=False)
    _max_entries: int = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        for r in self.replaced:
            for p in self.preserved:
                if _is_prefix(r, p) or _is_prefix(p, r):
                    raise ConfigurationError(
                        f"field {format_path(r)} is replaced but overlaps preserved "
                        f"field {format_path(p)}"
                    )
        if self.max_depth < 1 or self.max_bytes < 2 or self.max_user_id_length < 1:
            raise ConfigurationError("max_depth, max_bytes and max_user_id_length must be positive")
        self._check_migrations()
        self._check_secret()
        object.__setattr__(self, "_whole", self.replaced | self.secret)
        object.__setattr__(self, "_redacted", self.preserved | self.secret)
        ancestors = {p[:i] for p in self.preserved for i in range(1, len(p))}
        object.__setattr__(self, "_preserved_ancestors", frozenset(ancestors))
        # Paths a patch must look twice at: preserved, holding one, replaced or secret.
        object.__setattr__(self, "_guarded", self.preserved | ancestors | self._whole)
        object.__setattr__(self, "_max_entries", max(16, self.max_bytes // 3))

    def _check_migrations(self) -> None:
        version, migrations = self.schema_version, self.migrations
        if version is None:
            if migrations:
                raise ConfigurationError("migrations need a schema_version")
            return
        ok = type(version) is int and 1 <= version <= MAX_SCHEMA  # True is no version
        if not ok:
            raise ConfigurationError(
                f"schema_version must be a whole number from 1 to {MAX_SCHEMA}, got {version!r}"
            )
        # Not isinstance: True == 1 must not stand for migration 1.
        keys = [n for n in migrations if type(n) is int and 1 <= n < version]
        if len(keys) != len(migrations) or len(migrations) != version - 1:
            missing = [n for n in range(1, min(version, 12)) if n not in keys][:10]
            extra = [n for n in migrations if not (type(n) is int and 1 <= n < version)][:10]
            raise ConfigurationError(
                f"schema_version {version} needs migrations for exactly 1..{version - 1} "
                f"(from each version to the next); {len(migrations)} given; missing "
                f"{missing}{'...' if version > 12 else ''}, unexpected {extra!r}"
            )
        for n, fn in migrations.items():
            if not callable(fn):
                raise ConfigurationError(f"migration {n} is not callable: {fn!r}")

    def _check_secret(self) -> None:
        if self.encryption is not None and not isinstance(self.encryption, FieldEncryption):
            raise ConfigurationError(
                f"encryption must be a FieldEncryption, not {type(self.encryption).__name__}"
            )
        for s in self.secret:
            for p in self.preserved:
                if len(p) > len(s) and p[: len(s)] == s:
                    raise ConfigurationError(
                        f"preserved field {format_path(p)} lies inside secret field "
                        f"{format_path(s)}, which is written whole"
                    )

    def compile(self, patch: Mapping[str, Any]) -> list[Edit]:
        """Validate a patch and compile it into edits.

        Raises:
            SerializationError: the patch is not a JSON object, or holds a value
                that is not JSON, or is nested deeper than ``max_depth``.
            PreservedFieldError: the patch names a preserved field.
        """
        if type(patch) is not dict:
            if not isinstance(patch, Mapping):
                raise SerializationError(
                    f"a patch must be a JSON object (a dict), not {type(patch).__name__}",
                    path="$",
                )
            patch = dict(patch)
        edits: list[Edit] = []
        self._compile_object(patch, (), 1, edits)
        return edits

    @property
    def redacted_fields(self) -> frozenset[Path]:
        """The fields whose values exports and reprs hide: the preserved and the secret ones."""
        return self._redacted

    @property
    def max_entries(self) -> int:
        """The most entries (fields and objects) a patch may name.

        Every stored entry takes at least 3 bytes, so a document within
        ``max_bytes`` never holds more; a patch naming more is refused before
        any work is done on it (it would also hold the store for long).
        """
        return self._max_entries

    def _too_many(self, count: int) -> StateTooLargeError:
        return StateTooLargeError(
            size=3 * count,
            limit=self.max_bytes,
            detail=f"the patch names over {self.max_entries} entries; a document within "
            f"max_bytes={self.max_bytes} holds at most that many",
        )

    def _compile_object(  # noqa: C901, PLR0912 - the hot path of every update, kept flat
        self, obj: Mapping[str, Any], path: Path, depth: int, edits: list[Edit]
    ) -> None:
        if depth > self.max_depth:
            raise SerializationError(
                f"value at {format_path(path)} is nested deeper than {self.max_depth}",
                path=format_path(path),
            )
        if len(edits) + len(obj) > self._max_entries:
            raise self._too_many(len(edits) + len(obj))
        guarded = self._guarded
        for key, value in obj.items():
            if type(key) is not str or not key.isascii():
                _check_key(key, path)
            here = (*path, key)
            is_object = type(value) is dict
            if guarded and here in guarded:
                self._check_guarded(here, value, is_object)
            if value is None:
                edits.append((DELETE, here, None))
            elif is_object:
                if here in self._whole:
                    edits.append((DELETE, here, None))
                    edits.append((MAKE_OBJECT, here, None))
                    self._compile_object(drop_nones(value), here, depth + 1, edits)
                else:
                    edits.append((MAKE_OBJECT, here, None))
                    self._compile_object(value, here, depth + 1, edits)
            else:
                kind = type(value)
                if kind is str:
                    if not value.isascii():
                        _check_text(value, here, "the string")
                elif kind is not int and kind is not bool and kind is not float:
                    check_json(value, here, depth, self.max_depth)
                    if kind is list:
                        edits.append((SET, here, copy_json(value)))
                        continue
                elif kind is float or value <= -_BIG_INT or value >= _BIG_INT:
                    check_json(value, here, depth, self.max_depth)
                edits.append((SET, here, value))

    def _check_guarded(self, here: Path, value: Any, is_object: bool) -> None:
        if here in self.preserved:
            raise PreservedFieldError(
                f"{format_path(here)} is preserved; change it with set_preserved()",
                path=format_path(here),
            )
        if here in self._preserved_ancestors and (value is None or not is_object):
            raise PreservedFieldError(
                f"{format_path(here)} holds a preserved field and cannot be "
                "deleted or replaced by a patch",
                path=format_path(here),
            )

    def check_document(self, doc: Mapping[str, Any]) -> JSONObject:
        """Validate a whole document (as a transaction returns it).

        Returns:
            The document as a plain dict.

        Raises:
            SerializationError: the document is not a JSON object within limits.
        """
        if not isinstance(doc, Mapping):
            raise SerializationError(
                f"a state document must be a JSON object (a dict), not {type(doc).__name__}",
                path="$",
            )
        doc = dict(doc)
        check_json(doc, (), 0, self.max_depth)
        return doc

    def set_preserved_edits(self, path: Path, value: Any) -> list[Edit]:
        """Edits that set (or, with ``None``, delete) one preserved field.

        Raises:
            PreservedFieldError: ``path`` is not a declared preserved field.
            SerializationError: ``value`` is not JSON.
        """
        if path not in self.preserved:
            raise PreservedFieldError(
                f"{format_path(path)} is not declared preserved in StateData",
                path=format_path(path),
            )
        if value is None:
            return [(DELETE, path, None)]
        return self._exact_edits(path, value)

    def assign_edits(self, values: Mapping[Any, Any]) -> list[Edit]:
        """Edits that set each path to exactly its value.

        Keys are top-level field names (a str is one key, dots and all) or
        tuples of keys. An object replaces what was there, ``None`` is stored
        as JSON null, missing parent objects are created.

        Raises:
            PreservedFieldError: a path is, holds or lies under a preserved field.
            SerializationError: a value is not JSON or a path is not str keys.
        """
        if not isinstance(values, Mapping):
            raise SerializationError(
                f"assign() takes a mapping of paths to values, not {type(values).__name__}",
                path="$",
            )
        if len(values) > self.max_entries:
            raise self._too_many(len(values))
        edits: list[Edit] = []
        for spec, value in values.items():
            path: Path = (spec,) if isinstance(spec, str) else tuple(spec)
            if not path:
                raise SerializationError("assign() got an empty path", path="$")
            for i, key in enumerate(path):
                _check_key(key, path[:i])
            self._check_not_preserved(path)
            edits.extend(self._exact_edits(path, value))
            if len(edits) > self.max_entries:
                raise self._too_many(len(edits))
        return edits

    def increment_path(self, spec: str | Path) -> Path:
        """Check the path of a counter: str keys, within ``max_depth``, not preserved.

        Raises:
            PreservedFieldError: the path is, holds or lies under a preserved field.
            SerializationError: the path is empty or too deep.
        """
        path: Path = tuple(spec.split(".")) if isinstance(spec, str) else tuple(spec)
        if not path:
            raise SerializationError("increment() got an empty path", path="$")
        for i, key in enumerate(path):
            _check_key(key, path[:i])
        if len(path) > self.max_depth:
            raise SerializationError(
                f"{format_path(path)} is nested deeper than {self.max_depth}",
                path=format_path(path),
            )
        self._check_not_preserved(path)
        return path

    def _check_not_preserved(self, path: Path) -> None:
        for p in self.preserved:
            if _is_prefix(p, path) or _is_prefix(path, p):
                raise PreservedFieldError(
                    f"{format_path(path)} is or holds a preserved field; "
                    "change it with set_preserved()",
                    path=format_path(p),
                )

    def _exact_edits(self, path: Path, value: Any) -> list[Edit]:
        check_json(value, path, len(path), self.max_depth)
        edits: list[Edit] = [(MAKE_OBJECT, path[:i], None) for i in range(1, len(path))]
        edits.append((DELETE, path, None))
        if type(value) is dict:
            edits.append((MAKE_OBJECT, path, None))
            edits.extend(_leaf_edits(value, path))
        else:
            edits.append((SET, path, copy_json(value) if type(value) is list else value))
        return edits

    def check_replacement(self, old: JSONObject, new: JSONObject) -> None:
        """Refuse a whole-document replacement that changes a preserved field.

        Raises:
            PreservedFieldError: a preserved field differs between ``old`` and ``new``.
        """
        for path in self.preserved:
            if not same_json(lookup(old, path), lookup(new, path)):
                raise PreservedFieldError(
                    f"{format_path(path)} is preserved; a transaction cannot change "
                    "it (use set_preserved())",
                    path=format_path(path),
                )


def same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same JSON: ``True`` is not ``1``, nor ``1.0``."""
    if type(a) is not type(b):
        return False
    if type(a) is dict:
        return a.keys() == b.keys() and all(same_json(v, b[k]) for k, v in a.items())
    if type(a) is list:
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def copy_json(value: Any) -> Any:
    """A deep copy of a JSON value, faster than ``copy.deepcopy``.

    Used so that stored or returned data never aliases the caller's.
    """
    if type(value) is list:
        return [copy_json(v) for v in value]
    if type(value) is dict:
        return {k: copy_json(v) for k, v in value.items()}
    return value


@lru_cache(maxsize=8192)
def _path_len(path: Path) -> int:
    return sum(utf8_len(encode_key(k)) for k in path)


def _leaf_edits(obj: JSONObject, path: Path) -> list[Edit]:
    edits: list[Edit] = []
    for key, value in obj.items():
        here = (*path, key)
        if type(value) is dict:
            edits.append((MAKE_OBJECT, here, None))
            edits.extend(_leaf_edits(value, here))
        else:
            edits.append((SET, here, copy_json(value) if type(value) is list else value))
    return edits


def _check_key(key: object, path: Path) -> None:
    if type(key) is not str:
        raise SerializationError(
            f"keys must be str; {format_path(path)} has a key of type {type(key).__name__}",
            path=format_path(path),
        )
    if not key.isascii():
        _check_text(key, path, "a key")


def _check_text(text: str, path: tuple[str | int, ...], what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SerializationError(
            f"{what} at {format_path(path)} holds a lone surrogate, which is not valid UTF-8",
            path=format_path(path),
        ) from None


_BIG_INT: Final = 10**600  # below the smallest limit sys.set_int_max_str_digits() accepts


def _check_int_text(value: int, path: tuple[str | int, ...]) -> None:
    try:
        str(value)
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise SerializationError(
            f"the integer at {format_path(path)} has more than {limit} digits, "
            "more than Python writes as text (sys.set_int_max_str_digits)",
            path=format_path(path),
        ) from None


def check_json(  # noqa: C901, PLR0912 - one branch per JSON type
    value: Any, path: tuple[str | int, ...], depth: int, max_depth: int
) -> None:
    """Raise :class:`SerializationError` unless ``value`` is plain JSON within ``max_depth``."""
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_text(value, path, "the string")
    elif kind is int:
        if not -_BIG_INT < value < _BIG_INT:
            _check_int_text(value, path)
    elif kind is bool or value is None:
        return
    elif kind is float:
        if not math.isfinite(value):
            raise SerializationError(
                f"value at {format_path(path)} is {value!r}, which JSON cannot hold",
                path=format_path(path),
            )
    elif kind is list or kind is dict:
        if depth + 1 > max_depth:
            raise SerializationError(
                f"value at {format_path(path)} is nested deeper than {max_depth}",
                path=format_path(path),
            )
        if kind is list:
            for i, item in enumerate(value):
                check_json(item, (*path, i), depth + 1, max_depth)
        else:
            for key, item in value.items():
                _check_key(key, path)  # type: ignore[arg-type]
                check_json(item, (*path, key), depth + 1, max_depth)
    else:
        raise SerializationError(
            f"value at {format_path(path)} is a {kind.__name__}, not JSON "
            "(use str, int, float, bool, None, list or dict)",
            path=format_path(path),
        )


def apply_edits(doc: JSONObject, edits: Iterable[Edit]) -> JSONObject:
    """Apply compiled edits to a nested document, in place, and return it."""
    _apply(doc, edits, None, None)
    return doc


def apply_edits_sized(doc: JSONObject, edits: Iterable[Edit], size: int) -> int:
    """Apply edits like :func:`apply_edits` and return the new stored size.

    ``size`` is the document's stored size before; only the touched fields are
    measured, so an update costs what it changes, not what the document holds.
    """
    return _apply(doc, edits, size, None)


def apply_edits_shared(doc: JSONObject, edits: Iterable[Edit], size: int) -> tuple[JSONObject, int]:
    """Apply edits to a document that must stay as it is; return the new one and its size.

    Only the objects on the edited paths are copied; the rest is shared with
    ``doc``, which the memory backend never changes once stored.
    """
    new = dict(doc)
    return new, _apply(new, edits, size, {id(new)})


def _apply(  # noqa: C901, PLR0912 - one walk, with or without copying on write
    doc: JSONObject, edits: Iterable[Edit], size: int | None, fresh: set[int] | None
) -> int:
    """Apply edits; keep ``size`` up to date unless it is ``None``.

    With ``fresh`` (the ids of objects this call made), objects not made here
    are copied before they are changed.
    """
    total = size or 0
    for kind, path, value in edits:
        parent: Any = doc
        for key in path[:-1]:
            child = parent.get(key) if type(parent) is dict else None
            if fresh is not None and type(child) is dict and id(child) not in fresh:
                child = dict(child)
                parent[key] = child
                fresh.add(id(child))
            parent = child
        if type(parent) is not dict:
            # Only a delete can name a path whose parent is missing: nothing to do.
            continue
        last = path[-1]
        old = parent.get(last, MISSING)
        if kind == MAKE_OBJECT and type(old) is dict:
            continue
        if size is not None:
            path_len = _path_len(path)
            if old is not MISSING:
                total -= _node_size(old, path_len)
            if kind == MAKE_OBJECT:
                total += path_len + 2
            elif kind == SET:
                total += path_len + value_size(value)
        if kind == SET:
            parent[last] = value
        elif kind == DELETE:
            parent.pop(last, None)
        else:
            made: JSONObject = {}
            parent[last] = made
            if fresh is not None:
                fresh.add(id(made))
    return total


def _node_size(value: Any, path_len: int) -> int:
    if type(value) is dict:
        return path_len + 2 + subtree_size(value, path_len)
    return path_len + value_size(value)


def keep_preserved(doc: JSONObject, preserved: Iterable[Path]) -> JSONObject:
    """The document a reset leaves: only the preserved fields, with their parents."""
    out: JSONObject = {}
    for path in sorted(preserved):
        value = lookup(doc, path)
        if value is MISSING:
            continue
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def merge(doc: JSONObject, patch: Mapping[str, Any], rules: StateData | None = None) -> JSONObject:
    """Merge ``patch`` into a copy of ``doc`` under ``rules`` and return the copy.

    This is the pure reference every backend agrees with. ``doc`` is not changed,
    and the result shares no list with ``patch`` (compiling copies list values).
    """
    rules = rules or StateData()
    return apply_edits(copy_json(doc), rules.compile(patch))


def diff(old: JSONObject, new: JSONObject) -> JSONObject:
    """The smallest merge patch that turns ``old`` into ``new`` (RFC 7396).

    ``None`` values inside objects of ``new`` cannot be expressed (a merge patch
    reads them as deletions) and are dropped.
    """
    patch: JSONObject = {key: None for key in old if new.get(key) is None}
    for key, value in new.items():
        if value is None:
            continue
        before = old.get(key, MISSING)
        if type(before) is type(value) and before == value:
            continue
        if type(value) is dict and type(before) is dict:
            sub = diff(before, value)
            if sub:
                patch[key] = sub
        else:
            patch[key] = value
    return patch
