"""The chatstate command line.

- ``chatstate mermaid package.module:FlowClass``: print a flow's graph.
- ``chatstate state USER_ID --redis URL [--namespace NS]``: print a user's stored
  state as JSON, with the token field shown as a fingerprint, never in clear.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from chatstate.auth import fingerprint
from chatstate.exceptions import ChatstateError
from chatstate.flow import Flow
from chatstate.state import RedisBackend, StateService


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
    state.add_argument("--token-field", default="jwt_token")
    args = parser.parse_args(argv)
    if args.command == "mermaid":
        sys.path.insert(0, "")
        sys.stdout.write(_load_flow(args.flow).mermaid() + "\n")
        return 0
    if not args.redis:
        parser.error("state needs --redis URL (or CHATSTATE_REDIS_URL)")
    try:
        with StateService(RedisBackend.from_url(args.redis, namespace=args.namespace)) as svc:
            snapshot = svc.snapshot(args.user_id)
    except ChatstateError as exc:
        sys.stderr.write(f"chatstate: {exc}\n")
        return 1
    data: dict[str, Any] = dict(snapshot.data)
    token = data.get(args.token_field)
    if isinstance(token, str):
        data[args.token_field] = f"<token {fingerprint(token)}>"
    out = {"user_id": args.user_id, "version": snapshot.version, "state": data}
    sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
