"""Write the sync twins from their asyncio sources (``make unasync``; ``--check`` in ``make lint``).

Each module in a ``_async/`` folder under ``src/chatstate`` is the one body of a
sync/async pair. This script rewrites it token by token (``async def`` to
``def``, ``await x`` to ``x``, ``AsyncStateManager`` to ``StateManager``, ...) into
the module of the same name in the ``_sync/`` folder beside it, then sorts its
imports and formats it with ruff, so the generated file passes ``make lint``.

Where the twins must truly differ, the source calls a helper with an async and
a sync variant (``resolved_async`` and ``resolved_sync`` in ``chatstate/_twins.py``) and the
substitution below picks the sync one: the difference lives beside the helper,
with its reason, and not in this script.

Usage: ``python tools/unasync.py [--check]``. ``--check`` writes nothing and exits
1, listing the generated files that are missing or out of date.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "chatstate"
HEADER = "# Generated from {source} by tools/unasync.py: do not edit.\n"
# The header on two lines when one would pass ruff's line-length (100, pyproject.toml).
LONG_HEADER = "# Generated from {source}\n# by tools/unasync.py: do not edit.\n"
LINE_LENGTH = 100

# (pattern, replacement), applied in order to every line; a pattern matches whole words.
SUBS: list[tuple[str, str]] = [
    # The asyncio twins of the project's classes (and of typing's AsyncIterator) drop
    # their prefix: AsyncStateManager -> StateManager, AsyncBackend -> Backend.
    (r"Async([A-Z][A-Za-z0-9_]*)", r"\1"),
    # The same for a private class: _AsyncDataBlock -> _DataBlock (the telebot storages').
    (r"_Async([A-Z][A-Za-z0-9_]*)", r"_\1"),
    (r"async def", "def"),
    (r"async with", "with"),
    (r"async for", "for"),
    (r"await ", ""),
    (r"__aenter__", "__enter__"),
    (r"__aexit__", "__exit__"),
    # The public functions and methods whose asyncio twin is named with an "a" prefix.
    (r"a(close|set_jwt_token|clear_jwt_token|get_valid_token)", r"\1"),
    (r"asynccontextmanager", "contextmanager"),
    (r"AbstractAsyncContextManager", "AbstractContextManager"),
    (r"import asyncio", "import time"),
    (r"asyncio\.sleep", "time.sleep"),
    # RetryPolicy's Retrying sleeps with asyncio.sleep in aretry(), time.sleep in retry().
    (r"aretry", "retry"),
    # The helpers where the twins differ, each explained where it is defined:
    # resolved_async -> resolved_sync, check_backend_async -> check_backend_sync, ...
    (r"(\w+)_async", r"\1_sync"),
    # redis-py's asyncio modules mirror its sync ones: redis.asyncio.retry -> redis.retry.
    (r"redis\.asyncio\.(\w+)", r"redis.\1"),
    # pyTelegramBotAPI's asyncio modules mirror its sync ones, named with an "asyncio_"
    # prefix: telebot.asyncio_storage -> telebot.storage, telebot.asyncio_handler_backends
    # -> telebot.handler_backends (AsyncTeleBot -> TeleBot is the first rule's).
    (r"telebot\.asyncio_(\w+)", r"telebot.\1"),
    # The generated module imports the generated twins of its neighbours.
    (r"chatstate\.([\w.]+?)\._async\.", r"chatstate.\1._sync."),
]
COMPILED = [(re.compile(rf"\b{pattern}\b"), repl) for pattern, repl in SUBS]


def _ruff() -> str:
    """The ruff of the environment this script runs in, else the one on PATH."""
    local = Path(sys.executable).parent / "ruff"
    found = str(local) if local.exists() else shutil.which("ruff")
    if found is None:
        sys.exit("tools/unasync.py needs ruff (pip install -e '.[test]')")
    return found


def _ruff_pipe(args: list[str], text: str, target: Path) -> str:
    done = subprocess.run(  # noqa: S603 - our own ruff, fixed arguments
        [_ruff(), *args, "--stdin-filename", str(target), "-"],
        input=text,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode not in (0, 1) or not done.stdout:
        sys.exit(f"ruff {args[0]} failed on the twin of {target}:\n{done.stderr}")
    return done.stdout


def generate(source: Path, target: Path, used: set[int]) -> str:
    """The text of ``target``: ``source`` rewritten, its imports sorted, formatted."""
    lines = []
    for original in source.read_text(encoding="utf-8").splitlines(keepends=True):
        line = original
        for index, (pattern, repl) in enumerate(COMPILED):
            new = pattern.sub(repl, line)
            if new != line:
                used.add(index)
                line = new
        lines.append(line)
    header = HEADER.format(source=source.relative_to(ROOT).as_posix())
    if len(header) - 1 > LINE_LENGTH:
        header = LONG_HEADER.format(source=source.relative_to(ROOT).as_posix())
    text = header + "".join(lines)
    text = _ruff_pipe(["check", "--select", "I", "--fix", "--quiet"], text, target)
    return _ruff_pipe(["format", "--quiet"], text, target)


def pairs() -> list[tuple[Path, Path]]:
    """(asyncio source, generated sync module) for every module in an ``_async`` folder."""
    return [
        (source, source.parent.parent / "_sync" / source.name)
        for source in sorted(PACKAGE.rglob("_async/*.py"))
        if source.name != "__init__.py"  # each folder's docstring is written by hand
    ]


def main(argv: list[str]) -> int:
    """Generate the sync twins, or with ``--check`` list those out of date."""
    check = "--check" in argv
    used: set[int] = set()
    stale = []
    for source, target in pairs():
        text = generate(source, target, used)
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        if check:
            stale.append(target)
        else:
            target.parent.mkdir(exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"{source.relative_to(ROOT)} -> {target.relative_to(ROOT)}")
    unused = [SUBS[i] for i in range(len(SUBS)) if i not in used]
    if unused:
        print(f"tools/unasync.py: substitutions no source uses (remove them): {unused}")
        return 1
    if stale:
        print("generated twins out of date (edit the _async source, then run `make unasync`):")
        for target in stale:
            print(f"  {target.relative_to(ROOT)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
