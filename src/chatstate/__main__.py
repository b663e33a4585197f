"""The chatstate command line: ``chatstate mermaid package.module:FlowClass``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from chatstate.flow import Flow


def _load_flow(spec: str) -> type[Flow]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SystemExit(f"expected module:FlowClass, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from None
    flow = getattr(module, attr, None)
    if not (isinstance(flow, type) and issubclass(flow, Flow)):
        raise SystemExit(f"{spec!r} is not a Flow subclass")
    return flow


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="chatstate", description="chatstate tools")
    commands = parser.add_subparsers(dest="command", required=True)
    mermaid = commands.add_parser("mermaid", help="print a flow's graph as a Mermaid diagram")
    mermaid.add_argument("flow", help="the flow class, as package.module:ClassName")
    args = parser.parse_args(argv)
    if args.command == "mermaid":
        sys.path.insert(0, "")
        sys.stdout.write(_load_flow(args.flow).mermaid() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
