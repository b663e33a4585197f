"""Print ``name==floor`` for each runtime dependency of chatstate, for ``make mindeps``.

Reads ``[project] dependencies`` from pyproject.toml and pins each requirement to
its lower bound (the ``>=`` version), so the oldest versions the project claims
to support can be installed and tested. A dependency without a ``>=`` floor is
an error: every runtime dependency must say the oldest version it works with.

Usage: ``python tools/floors.py [pyproject.toml]``
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)$")
_FLOOR = re.compile(r">=\s*([^\s,;]+)")


def floors(pyproject: Path) -> list[str]:
    """Return ``name==floor`` for each entry of ``[project] dependencies``."""
    with pyproject.open("rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        spec = requirement.split(";", 1)[0]
        match = _REQUIREMENT.match(spec)
        floor = _FLOOR.search(match.group(2)) if match else None
        if match is None or floor is None:
            raise SystemExit(f"no >= floor in the dependency {requirement!r}")
        pins.append(f"{match.group(1)}=={floor.group(1)}")
    return pins


def main() -> None:
    """Print the pins, one a line."""
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml")
    print("\n".join(floors(path)))


if __name__ == "__main__":
    main()
