"""The package's rooms: no private name borrowed across them, no import circle between modules."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
ROOMS = ("state", "flow", "auth", "testing", "integrations")
# No exceptions: the command line reads the Redis storage layout (the key scheme,
# the scripts it checks) through chatstate.state.redis's public names.
ALLOWED: set[tuple[str, str]] = set()


@functools.cache
def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted((SRC / "chatstate").rglob("*.py")):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text(encoding="utf-8"))
    return found


def _imports(name: str, tree: ast.Module, *, top_level_only: bool) -> list[tuple[str, str]]:
    """(module imported, name imported) for every ``from chatstate... import`` in ``tree``."""
    is_package = name.count(".") == 0 or name in _PACKAGES
    package = name if is_package else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(_runtime_nodes(tree))
    out = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.startswith("chatstate"):
                out.extend((target, alias.name) for alias in node.names)
    return out


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except what an ``if TYPE_CHECKING:`` block holds."""
    out: list[ast.AST] = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for child in node.orelse:
                out.append(child)
                out.extend(_runtime_nodes(child))
            continue
        out.append(node)
        out.extend(_runtime_nodes(node))
    return out


_PACKAGES = {
    str(p.parent.relative_to(SRC)).replace("/", ".")
    for p in (SRC / "chatstate").rglob("__init__.py")
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else module


def test_no_private_name_is_borrowed_across_rooms() -> None:
    """A room imports another room only through its package's public names."""
    borrowed = []
    for name, tree in _modules().items():
        for target, imported in _imports(name, tree, top_level_only=False):
            if _room(target) == _room(name) or _room(target) not in ROOMS:
                continue  # the same room, or a house module shared by all (chatstate._x)
            private = any(p.startswith("_") for p in target.split(".")[1:]) or imported.startswith(
                "_"
            )
            if private and (name, target) not in ALLOWED:
                borrowed.append(f"{name} <- {target}.{imported}")
    assert not borrowed, borrowed


@pytest.mark.parametrize("start", sorted(_modules()))
@pytest.mark.parametrize("late", [False, True], ids=["loading", "late-imports-too"])
def test_no_import_circle(start: str, late: bool) -> None:
    """No module imports itself back, through the imports run when it is loaded.

    Nor through the late ones inside functions, which only hide a circle.
    """
    trees = _modules()
    edges = {
        name: {
            target
            for target, imported in _imports(name, tree, top_level_only=not late)
            for target in (
                [f"{target}.{imported}"] if f"{target}.{imported}" in trees else [target]
            )
            if target in trees and target != name and not name.startswith(target + ".")
        }
        for name, tree in trees.items()
    }
    path = [start]
    seen: set[str] = set()

    def visit(node: str) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                raise AssertionError(" -> ".join([*path, nxt]))
            if nxt not in seen:
                seen.add(nxt)
                path.append(nxt)
                visit(nxt)
                path.pop()

    visit(start)


CAPABILITIES = frozenset(
    {
        "load", "apply", "close", "aclose", "users", "lock", "erase", "ping", "describe",
        "schedule", "unschedule", "due", "renew_lock", "try_lock", "unlock", "purge",
        "stores_schema", "kind",
    }
)  # fmt: skip


def test_no_capability_is_found_by_name() -> None:
    """A backend's capabilities are protocols checked with isinstance, never getattr/hasattr."""
    found = [
        f"{name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"getattr", "hasattr"}
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and node.args[1].value in CAPABILITIES
    ]
    assert not found, found
