"""``chatstate state USER``: a user's state, every secret as a fingerprint."""

from __future__ import annotations

import argparse
import json
from typing import Any

from chatstate.cli._backends import store
from chatstate.cli._console import Console
from chatstate.cli._loading import load_rules, reading_rules

__all__ = ["RULES_HELP", "add_arguments", "dump", "run"]

RULES_HELP = "your StateData as package.module:RULES: its preserved fields are redacted too"


def dump(value: Any) -> str:
    """``value`` as the indented JSON the commands print."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """USER and --rules."""
    parser.add_argument("user_id", metavar="USER")
    parser.add_argument("--rules", metavar="MODULE:ATTR", help=RULES_HELP)


def run(args: argparse.Namespace, console: Console) -> int:
    """Print a user's state with its secrets as fingerprints.

    The redacted document is the one ``StateService.export`` gives, so both
    commands hide exactly the same values.
    """
    rules = reading_rules(load_rules(args.rules))
    with store(args).service(rules) as svc:
        export = svc.export(args.user_id)
    console.out(
        dump({"user_id": args.user_id, "version": export["version"], "state": export["document"]})
    )
    return 0
