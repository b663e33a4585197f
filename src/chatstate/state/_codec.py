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
            total += path_len + utf8_len(_encode(value))
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


_META_FIELDS: Final = frozenset({"#v", "#s"})


@lru_cache(maxsize=4096)
def _decode_scalar(text: str) -> Any:
    return _decode(text)


def decode_stored(text: str) -> Any:
    """Decode one stored value; scalars (immutable) come from a cache."""
    if text[:1] in ("[", "{"):
        return _decode(text)
    return _decode_scalar(text)


def unflatten_joined(text: str) -> JSONObject:
    """Rebuild a document from a script's reply: fields and values joined by newlines.

    Meta fields (``#v``, ``#s``) are skipped.

    Raises:
        ValueError: the reply does not hold a document.
    """
    if not text:
        return {}
    parts = text.split("\n")
    if len(parts) % 2:
        raise ValueError("a field without a value (a value holds a raw newline?)")
    fields = dict(zip(parts[::2], parts[1::2], strict=True))
    for meta in _META_FIELDS:
        fields.pop(meta, None)
    return unflatten(fields)


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
    root: JSONObject = {}
    # A parent's path is a prefix of its children's, so sorting visits it first.
    objects: dict[str, JSONObject] = {"": root}
    for text in sorted(fields):
        parent_text, key = _split_path(text)
        parent = objects.get(parent_text)
        if parent is None:
            raise ValueError(f"entry {text!r} has no parent object")
        raw = fields[text]
        if raw == OBJECT_MARKER:
            child: JSONObject = {}
            objects[text] = child
            parent[key] = child
        else:
            parent[key] = decode_stored(raw)
    return root
