"""The table of commands: each one's name, help, arguments, function and backends.

A command is a module (or a pair in one module, for a small family) with a
function adding its own arguments to its sub-parser and a function running it,
``(args, console) -> exit status``. ``_parser.build_parser`` declares every
command from this table and ``_core.main`` dispatches through it, after
choosing the backend among the ones the command works on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import attrs

from chatstate.cli._backends import ANY_BACKEND, REDIS_ONLY, BackendKind
from chatstate.cli._commands import (
    bench,
    doctor,
    mermaid,
    migrate,
    reencrypt,
    remove,
    state,
    stats,
    transfer,
    users,
)
from chatstate.cli._console import Console

__all__ = ["COMMANDS", "Command", "Run"]

Run = Callable[[argparse.Namespace, Console], int]


@attrs.frozen
class Command:
    """One command of the command line.

    Attributes:
        name: What is typed (``chatstate NAME``).
        run: Runs it: ``(args, console) -> exit status``.
        help: One line for ``chatstate --help`` and the command's own help.
        add_arguments: Adds the command's own arguments to its sub-parser.
        backends: The backends it works on; none: it needs no backend.
    """

    name: str
    run: Run
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    backends: tuple[BackendKind, ...] = ANY_BACKEND


COMMANDS: tuple[Command, ...] = (
    Command(
        "state", state.run, "print a user's state, every secret as a fingerprint",
        state.add_arguments,
    ),
    Command(
        "export", transfer.run_export, "print a user's document as JSON, to import elsewhere",
        transfer.add_export_arguments,
    ),
    Command(
        "import", transfer.run_import, "write an export back (never over a newer document)",
        transfer.add_import_arguments,
    ),
    Command("delete", remove.run_delete, "delete a user's document", remove.add_delete_arguments),
    Command(
        "erase", remove.run_erase,
        "remove everything kept for a user: document, op ids, claim, locks",
        remove.add_erase_arguments,
    ),
    Command(
        "reencrypt", reencrypt.run,
        "encrypt every secret field with the newest key (resumable: current ones are skipped)",
        reencrypt.add_arguments,
    ),
    Command("users", users.run, "list the user ids, one a line", users.add_arguments),
    Command(
        "migrate", migrate.run, "bring every document to your rules' schema_version",
        migrate.add_arguments,
    ),
    Command(
        "stats", stats.run, "count users, op ids and claims; sample memory per user (Redis)",
        stats.add_arguments, REDIS_ONLY,
    ),
    Command(
        "doctor", doctor.run, "check the server against what chatstate needs (Redis)",
        doctor.add_arguments, REDIS_ONLY,
    ),
    Command(
        "bench", bench.run, "time updates and gets against the server (Redis)",
        bench.add_arguments, REDIS_ONLY,
    ),
    Command(
        "mermaid", mermaid.run, "print a flow's graph as a Mermaid diagram",
        mermaid.add_arguments, (),
    ),
)  # fmt: skip
"""Every command, in the order ``chatstate --help`` lists them."""
