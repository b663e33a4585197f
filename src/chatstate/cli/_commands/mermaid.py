"""``chatstate mermaid package.module:FlowClass``: a flow's graph (no backend)."""

from __future__ import annotations

import argparse

from chatstate.cli._console import Console
from chatstate.cli._errors import CommandLineError
from chatstate.cli._loading import load_object
from chatstate.flow import Flow

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flow class."""
    parser.add_argument("flow", help="the flow class, as package.module:ClassName")


def run(args: argparse.Namespace, console: Console) -> int:
    """Print a flow's graph as a Mermaid diagram."""
    if ":" not in args.flow:
        raise CommandLineError(f"expected module:FlowClass, got {args.flow!r}")
    flow = load_object(args.flow, "Flow")
    if not (isinstance(flow, type) and issubclass(flow, Flow)):
        raise CommandLineError(f"{args.flow!r} is not a Flow subclass")
    console.out(flow.mermaid())
    return 0
