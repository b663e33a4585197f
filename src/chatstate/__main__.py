"""The chatstate command line.

- ``chatstate mermaid package.module:FlowClass``: print a flow's graph.
- ``chatstate state USER_ID --redis URL [--namespace NS] [--rules module:RULES]``:
  print a user's stored state as JSON, every secret shown as a fingerprint (the
  preserved fields of the rules, keys named like secrets, values shaped like JWTs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from chatstate._redact import redact
from chatstate.exceptions import ChatstateError
from chatstate.flow import Flow
from chatstate.state import RedisBackend, StateData, StateService


def _load_rules(spec: str) -> StateData:
    sys.path.insert(0, "")
    module_name, _, attr = spec.partition(":")
    try:
        rules = getattr(importlib.import_module(module_name), attr or "RULES", None)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from None
    if not isinstance(rules, StateData):
        raise SystemExit(f"{spec!r} is not a StateData")
    return rules


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
    state = commands.add_parser("state", help="print a user's stored state (tokens redacted)")
    state.add_argument("user_id")
    state.add_argument(
        "--redis", default=os.environ.get("CHATSTATE_REDIS_URL"), help="redis:// URL"
    )
    state.add_argument("--namespace", default="chatstate")
    state.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        help="your StateData (package.module:RULES): its preserved fields are redacted too",
    )
    args = parser.parse_args(argv)
    if args.command == "mermaid":
        sys.path.insert(0, "")
        sys.stdout.write(_load_flow(args.flow).mermaid() + "\n")
        return 0
    if not args.redis:
        parser.error("state needs --redis URL (or CHATSTATE_REDIS_URL)")
    rules = _load_rules(args.rules) if args.rules else StateData()
    try:
        with StateService(RedisBackend.from_url(args.redis, namespace=args.namespace)) as svc:
            snapshot = svc.snapshot(args.user_id)
            data: dict[str, Any] = redact(snapshot.data, rules.preserved)
    except ChatstateError as exc:
        sys.stderr.write(f"chatstate: {exc}\n")
        return 1
    out = {"user_id": args.user_id, "version": snapshot.version, "state": data}
    sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
