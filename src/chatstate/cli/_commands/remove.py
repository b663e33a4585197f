"""``chatstate delete USER`` and ``chatstate erase USER``: a user's document, or all of it."""

from __future__ import annotations

import argparse
import sys

from chatstate.cli._backends import store
from chatstate.cli._console import Console
from chatstate.cli._errors import CommandError, CommandLineError

__all__ = ["add_delete_arguments", "add_erase_arguments", "confirm", "run_delete", "run_erase"]


def confirm(args: argparse.Namespace, console: Console, question: str) -> bool:
    """True with ``--yes`` or a yes on the terminal; off a terminal, ``--yes`` is needed."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        raise CommandLineError(
            f"{args.command} asks for confirmation: pass --yes when not on a terminal"
        )
    return console.ask(question)


def add_delete_arguments(parser: argparse.ArgumentParser) -> None:
    """USER, --yes and --force."""
    parser.add_argument("user_id", metavar="USER")
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument(
        "--force",
        action="store_true",
        help="remove the document even when it is no chatstate document (corrupt data)",
    )


def run_delete(args: argparse.Namespace, console: Console) -> int:
    """Remove a user's document (after a confirmation on a terminal)."""
    where = store(args)
    if not confirm(args, console, f"delete the state of {args.user_id!r} in {where.name}?"):
        console.error("nothing deleted")
        return 1
    with where.service() as svc:
        if args.force:
            svc.delete(args.user_id, force=True)
            console.out(f"deleted {args.user_id!r} (forced)")
            return 0
        version = svc.snapshot(args.user_id).version
        if version == 0:
            console.out(f"no state is stored for {args.user_id!r}")
            return 0
        svc.delete(args.user_id)
    console.out(f"deleted {args.user_id!r} (it was at version {version})")
    return 0


def add_erase_arguments(parser: argparse.ArgumentParser) -> None:
    """USER and --yes."""
    parser.add_argument("user_id", metavar="USER")
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")


def run_erase(args: argparse.Namespace, console: Console) -> int:
    """Remove everything kept for a user, op ids included (after a confirmation)."""
    where = store(args)
    if not confirm(args, console, f"erase everything kept for {args.user_id!r} in {where.name}?"):
        raise CommandError("nothing was changed")
    with where.service() as svc:
        removed = svc.erase(args.user_id)
    if not removed:
        console.out(f"nothing is stored for {args.user_id!r}")
    else:
        console.out(f"erased {args.user_id!r}: {', '.join(removed)}")
    return 0
