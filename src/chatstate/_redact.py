"""Showing a stored document without its secrets (the CLI, exports, logs).

A value is a secret when it sits in a preserved field the rules declare (a
token, a profile held apart from the conversation), under a key whose name says
so (``token``, ``secret``, ``password``, ``api_key``, ...), or looks like a JWT.
Each secret string of at least 20 characters (a token: too much entropy to guess
from a hash) is replaced by ``"<secret sha256:...>"`` (its fingerprint, so two
documents can still be compared); shorter strings (a PIN, a password: a bare
hash of them could be reversed by trying every value) and other secret values
by ``"<secret>"``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Final

from chatstate.typing import JSONObject, Path

__all__ = ["fingerprint", "looks_secret", "redact"]

_SECRET_KEY: Final = re.compile(
    r"(token|secret|passw(or)?d|passwd|\bpwd\b|jwt|api[_-]?key|credential|auth[_-]?code|"
    r"authorization|bearer|cookie|session[_-]?id|private[_-]?key|\bpin|\botp|cvv|card[_-]?number)",
    re.IGNORECASE,
)
_FINGERPRINTED: Final = 20  # shortest string shown by its fingerprint
_JWT: Final = re.compile(r"^[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*$")


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, safe to log: ``sha256:1a2b3c4d5e6f``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:12]


def looks_secret(key: str, value: Any) -> bool:
    """True when a key's name or a string's shape says it is a secret."""
    if _SECRET_KEY.search(key):
        return True
    return isinstance(value, str) and value.startswith("eyJ") and bool(_JWT.match(value))


def _hide(value: Any) -> Any:
    if isinstance(value, str):
        return f"<secret {fingerprint(value)}>" if len(value) >= _FINGERPRINTED else "<secret>"
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide(v) for v in value]
    return "<secret>" if value is not None else None


def redact(doc: JSONObject, preserved: frozenset[Path] = frozenset()) -> JSONObject:
    """A copy of ``doc`` with every secret replaced by its fingerprint.

    Args:
        doc: The document.
        preserved: The rules' preserved fields: all of them count as secrets.
    """
    out: JSONObject = _walk(doc, (), preserved)
    return out


def _walk(node: Any, path: Path, preserved: frozenset[Path]) -> Any:
    if isinstance(node, dict):
        out: JSONObject = {}
        for key, value in node.items():
            here = (*path, key)
            if here in preserved or looks_secret(key, value):
                out[key] = _hide(value)
            else:
                out[key] = _walk(value, here, preserved)
        return out
    if isinstance(node, list):
        return [
            _hide(v) if isinstance(v, str) and looks_secret("", v) else _walk(v, path, preserved)
            for v in node
        ]
    return node
