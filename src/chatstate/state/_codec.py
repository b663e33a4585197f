"""The flat form of a document: one entry per object and per leaf.

A document is stored as a map from an encoded *path* to an encoded *value*:

- a path is the concatenation of its keys, each written as a JSON string
  (``("a", "b")`` becomes ``"a""b"``). JSON strings are a prefix-free code, so a
  path is an ancestor of another exactly when its text is a prefix of the
  other's, which lets a Lua script find a subtree with a string comparison;
- an object is stored as the marker ``{}`` at its path (the root is implicit);
- every other value (str, number, bool, null, list) is stored as its compact JSON
  text, written by Python and never decoded or re-encoded by Lua. Lua's cjson
  would round numbers, turn ``[]`` into ``{}`` and escape ``/``: it never sees one.

The Redis backend keeps this form in a hash; every backend measures a document's
size with :func:`stored_size`, so the size limit is the same number everywhere.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any, Final

from chatstate.typing import JSONObject, Path

OBJECT_MARKER = "{}"

_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_decode = json.JSONDecoder().decode
_loads = json.loads
_CONTROL = re.compile(r"[\x00-\x1f]")
_SEGMENT = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def encode_value(value: Any) -> str:
    """Encode a validated JSON value as compact JSON text."""
    return _encode(value)


@lru_cache(maxsize=8192)
def encode_key(key: str) -> str:
    """Encode one key of a path as a JSON string literal."""
    return _encode(key)


def encode_path(path: Path) -> str:
    """Encode a path: its keys as JSON strings, concatenated."""
    return "".join([encode_key(k) for k in path])


@lru_cache(maxsize=8192)
def decode_path(text: str) -> Path:
    """Decode a path written by :func:`encode_path`.

    Raises:
        ValueError: ``text`` is not a concatenation of JSON strings.
    """
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise ValueError("a path is a concatenation of JSON strings")
    if _CONTROL.search(text):
        raise ValueError("a path holds an unescaped control character")
    if "\\" not in text:
        # No escapes means no quote inside a key, so the boundaries are '""'.
        parts = text[1:-1].split('""')
        if any('"' in part for part in parts):
            raise ValueError("a path is a concatenation of JSON strings")
        return tuple(parts)
    segments = _SEGMENT.findall(text)
    if sum(len(s) for s in segments) != len(text):
        raise ValueError("a path is a concatenation of JSON strings")
    return tuple(_decode(s) for s in segments)


def utf8_len(text: str) -> int:
    """Length of ``text`` in UTF-8 bytes, as Lua's ``#`` counts it."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


_ESCAPED: Final = re.compile(r'["\\\x00-\x1f]')


def value_size(value: Any) -> int:
    """``utf8_len(encode_value(value))``, without encoding the common scalars."""
    kind = type(value)
    if kind is str:
        if _ESCAPED.search(value) is None:
            return (len(value) if value.isascii() else len(value.encode("utf-8"))) + 2
    elif kind is int:
        return len(int.__repr__(value))
    elif kind is bool:
        return 4 if value else 5
    elif value is None:
        return 4
    elif kind is float:
        return len(float.__repr__(value))
    return utf8_len(_encode(value))


def stored_size(doc: JSONObject) -> int:
    """The stored size of a document: the UTF-8 bytes of every flat path and value.

    This is what ``StateData.max_bytes`` limits, on every backend.
    """
    return subtree_size(doc, 0)


def subtree_size(obj: JSONObject, prefix_len: int) -> int:
    """The stored size of an object's contents under a path of ``prefix_len`` bytes."""
    total = 0
    for key, value in obj.items():
        path_len = prefix_len + utf8_len(encode_key(key))
        if type(value) is dict:
            total += path_len + 2 + subtree_size(value, path_len)
        else:
            total += path_len + value_size(value)
    return total


def flatten(doc: JSONObject) -> dict[str, str]:
    """The flat form of a validated document."""
    out: dict[str, str] = {}
    _flatten_into(out, doc, "")
    return out


def _flatten_into(out: dict[str, str], obj: JSONObject, prefix: str) -> None:
    for key, value in obj.items():
        path = prefix + encode_key(key)
        if type(value) is dict:
            out[path] = OBJECT_MARKER
            _flatten_into(out, value, path)
        else:
            out[path] = _encode(value)


_META_FIELDS: Final = frozenset({"#v", "#s", "#m"})


def decode_stored(text: str) -> Any:
    """Decode one stored value."""
    return _decode(text)


def unflatten_joined(text: str) -> JSONObject:
    """Rebuild a document from fields and values joined by newlines (a script's reply).

    Fields that are not paths (``#v``, ``#s``, ``#m``) are skipped. All values are
    decoded in one C-level parse.

    Raises:
        ValueError: the text does not hold a document.
    """
    if not text:
        return {}
    return unflatten_parts(text.split("\n"))


def unflatten_parts(parts: list[str]) -> JSONObject:
    """Rebuild a document from its fields and values, alternating in one list.

    Raises:
        ValueError: the list does not hold a document.
    """
    if len(parts) % 2:
        raise ValueError("a field without a value (a value holds a raw newline?)")
    return unflatten_columns(parts[0::2], "[[" + "],[".join(parts[1::2]) + "]]")


def unflatten_columns(fields: list[str], values: str | bytes) -> JSONObject:
    """Rebuild a document from its fields and its values as the text ``[[v1],[v2],...]``.

    The values are decoded in one C-level parse (``json.loads`` takes UTF-8
    bytes as they come from the server). Each value sits in brackets of its own:
    a stored value that is not exactly one JSON value (``[1``, ``2,3``) cannot
    pair up with its neighbours, and the counts below catch it.

    Raises:
        ValueError: the fields and values do not form a document.
    """
    wrapped = _decode(values) if isinstance(values, str) else _loads(values)
    n = len(fields)
    if len(wrapped) != n or (n and (min(map(len, wrapped)) != 1 or max(map(len, wrapped)) != 1)):
        raise ValueError("a stored value is not one JSON value")
    decoded = [v[0] for v in wrapped]
    steps, flat = _plan(tuple(fields))
    if flat is not None:  # every field top-level: no containers to build
        return _flat_document(fields, decoded, flat)
    containers: list[JSONObject] = [{}]
    try:
        for at, parent, key, is_parent in steps:
            value = decoded[at]
            if type(value) is dict:
                if value:
                    raise ValueError(f"entry {fields[at]!r} holds an object, not the marker")
                if is_parent:
                    containers.append(value)
            elif is_parent:
                raise ValueError(f"entry {fields[at]!r} has children but is not an object")
            containers[parent][key] = value
    except (TypeError, IndexError) as exc:  # pragma: no cover - the plan was checked
        raise ValueError(f"the fields do not form a document: {exc}") from None
    return containers[0]


def _flat_document(
    fields: list[str], decoded: list[Any], flat: tuple[tuple[int, str], ...]
) -> JSONObject:
    """A document whose fields are all top-level, from its plan's ``(index, key)`` pairs."""
    doc = {key: decoded[at] for at, key in flat}
    for at, _ in flat:
        value = decoded[at]
        if type(value) is dict and value:
            raise ValueError(f"entry {fields[at]!r} holds an object, not the marker")
    return doc


@lru_cache(maxsize=2048)
def _plan(
    fields: tuple[str, ...],
) -> tuple[tuple[tuple[int, int, str, bool], ...], tuple[tuple[int, str], ...] | None]:
    """How to build a document with these fields: parents first, each into its container.

    Documents of one bot have few shapes, so the parsing and checking of paths is
    done once per shape. A field with children gets a container slot (its value
    must then be the object marker); an empty object is a marker with none. The
    second part, for a document whose fields are all top-level, is each field's
    index and key, in the same order: a dict built straight from it.

    Raises:
        ValueError: a field is not a path, or has no parent object.
    """
    paths = [f for f in fields if f[:1] == '"']
    for field in fields:
        if field[:1] != '"' and field not in _META_FIELDS:
            raise ValueError(f"field {field!r} is not a path")
    index = {field: at for at, field in enumerate(fields)}
    if len(index) != len(fields):
        raise ValueError("a field appears twice")
    parents = {_split_path(field)[0] for field in paths}
    parents.discard("")
    container_of: dict[str, int] = {"": 0}
    steps: list[tuple[int, int, str, bool]] = []
    for field in sorted(paths, key=decode_path):  # parents sort before their children
        parent_text, key = _split_path(field)
        parent = container_of.get(parent_text)
        if parent is None:
            raise ValueError(f"entry {field!r} has no parent object")
        is_parent = field in parents
        if is_parent:
            container_of[field] = len(container_of)
        steps.append((index[field], parent, key, is_parent))
    flat = None if parents else tuple((at, key) for at, _, key, _ in steps)
    return tuple(steps), flat


@lru_cache(maxsize=8192)
def _split_path(text: str) -> tuple[str, str]:
    """A path's parent path (as text) and its last key."""
    path = decode_path(text)
    last = encode_key(path[-1])
    if not text.endswith(last):  # pragma: no cover - encode/decode are inverses
        raise ValueError(f"path {text!r} does not end in its last key")
    return text[: len(text) - len(last)], path[-1]


def unflatten(fields: dict[str, str]) -> JSONObject:
    """Rebuild a document from its flat form.

    Raises:
        ValueError: the entries do not form a document (a bad path, a value that
            is not JSON, a child without its parent object).
    """
    return unflatten_joined("\n".join(x for item in fields.items() for x in item))
