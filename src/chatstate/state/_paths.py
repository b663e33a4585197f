"""Field paths: parsing, rendering and looking them up in a document.

The lowest layer of the state room, below the merge rules (``_rules``) and
field encryption (``_crypto``), which both use it, so that neither imports the
other back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from chatstate.exceptions import ConfigurationError
from chatstate.typing import JSONObject, Path

__all__ = ["MISSING", "drop_nones", "format_path", "lookup", "parse_path", "secret_paths"]

MISSING: Final = object()
"""What :func:`lookup` returns for a path the document does not have."""


def format_path(path: Path | tuple[str | int, ...]) -> str:
    """Render a path for messages: ``$.cart[2].name``, keys quoted when needed."""
    out = ["$"]
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif part.isidentifier():
            out.append(f".{part}")
        else:
            out.append(f"[{part!r}]")
    return "".join(out)


def parse_path(spec: object) -> Path:
    """A field path from a dotted str (``"auth.jwt"``) or a sequence of keys.

    Raises:
        ConfigurationError: the path is empty or holds an empty or non-str key.
    """
    parts: list[object] = []
    if isinstance(spec, str):
        parts.extend(spec.split("."))
    elif isinstance(spec, Iterable):
        parts.extend(spec)
    if not parts or not all(isinstance(k, str) and k for k in parts):
        raise ConfigurationError(f"a field path must be non-empty keys, got {spec!r}")
    return tuple(str(k) for k in parts)


def secret_paths(specs: Iterable[str | Iterable[str]] | str) -> frozenset[Path]:
    """Parse secret field paths (``"jwt_token"``, ``"profile.pin"``, tuples) and check them.

    Raises:
        ConfigurationError: a path is empty, or one path lies inside another (a
            secret field is encrypted whole, so a secret inside it is meaningless).
    """
    if isinstance(specs, str):
        specs = [specs]
    paths = frozenset(parse_path(s) for s in specs)
    for outer in paths:
        for inner in paths:
            if outer != inner and inner[: len(outer)] == outer:
                raise ConfigurationError(
                    f"secret field {format_path(inner)} lies inside secret field "
                    f"{format_path(outer)}, which is already encrypted as a whole"
                )
    return paths


def lookup(doc: JSONObject, path: Path) -> Any:
    """The value at ``path`` in ``doc``, or :data:`MISSING`."""
    node: Any = doc
    for key in path:
        if type(node) is not dict or key not in node:
            return MISSING
        node = node[key]
    return node


def drop_nones(obj: JSONObject) -> JSONObject:
    """``obj`` without its ``None`` values, at every depth (RFC 7396's deletions)."""
    return {k: (drop_nones(v) if type(v) is dict else v) for k, v in obj.items() if v is not None}
