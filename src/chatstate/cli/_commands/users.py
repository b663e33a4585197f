"""``chatstate users``: every user id, one a line."""

from __future__ import annotations

import argparse
import json
import sys

from chatstate.cli._backends import store
from chatstate.cli._console import Console

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--json."""
    parser.add_argument("--json", action="store_true", help="each id as a JSON string")


def run(args: argparse.Namespace, console: Console) -> int:
    """Stream every user id, one a line (an unprintable one as JSON)."""
    count = 0
    odd = 0
    for listed in store(args).listed(console):
        count += 1
        if args.json:
            line = json.dumps(listed.name, ensure_ascii=False)
        elif listed.name.isprintable():
            line = listed.name
        else:
            odd += 1
            line = json.dumps(listed.name, ensure_ascii=False)
        sys.stdout.write(line + "\n")
        if count % 1000 == 0:
            sys.stdout.flush()
    sys.stdout.flush()
    if odd:
        console.error(f"{odd} user id(s) hold unprintable characters: shown as JSON; see --json")
    console.progress(f"{count} users", final=True)
    return 0
