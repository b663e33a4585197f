"""The argument parser, declared from the table of commands."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from chatstate import __version__
from chatstate.cli._backends import (
    NAMESPACE_ENV,
    POSTGRES_DSN_ENV,
    POSTGRES_PREFIX_ENV,
    POSTGRES_SCHEMA_ENV,
    REDIS_URL_ENV,
    SQLITE_PATH_ENV,
)
from chatstate.cli._commands import COMMANDS, Command
from chatstate.cli._console import scrub_url_passwords

__all__ = ["build_parser"]

_BACKEND_NAMES = {"redis": "Redis", "sqlite": "SQLite", "postgres": "PostgreSQL"}


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error never shows a password typed in a URL."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {scrub_url_passwords(message)}\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        super()._print_message(scrub_url_passwords(message), file)


def _backend_options() -> _Parser:
    """The options of every command that works on a backend."""
    options = _Parser(add_help=False)
    group = options.add_argument_group("backend (exactly one)")
    group.add_argument(
        "--redis",
        metavar="URL",
        help=f"redis://, rediss:// or unix:// URL (default: ${REDIS_URL_ENV})",
    )
    group.add_argument(
        "--sqlite",
        metavar="PATH",
        help=f"the bot's SQLite file (default: ${SQLITE_PATH_ENV})",
    )
    group.add_argument(
        "--postgres",
        metavar="DSN",
        help=f"postgresql:// URL or key=value DSN (default: ${POSTGRES_DSN_ENV})",
    )
    group = options.add_argument_group("Redis")
    group.add_argument(
        "--namespace",
        metavar="NS",
        help=f"the bot's key namespace (default: ${NAMESPACE_ENV} or 'chatstate')",
    )
    group.add_argument("--cluster", action="store_true", help="the URL is a Redis Cluster node")
    group = options.add_argument_group("PostgreSQL")
    group.add_argument(
        "--schema",
        metavar="NAME",
        help=f"the schema of the bot's tables (default: ${POSTGRES_SCHEMA_ENV} or 'public')",
    )
    group.add_argument(
        "--table-prefix",
        metavar="PREFIX",
        help=f"the start of the tables' names (default: ${POSTGRES_PREFIX_ENV} or 'chatstate')",
    )
    group = options.add_argument_group("output")
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on standard error (default: when it is a terminal)",
    )
    return options


def _describe(command: Command) -> str:
    if not command.backends:
        return command.help
    on = " and ".join(_BACKEND_NAMES[kind] for kind in command.backends)
    return f"{command.help}. Works on {on}."


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command in the table."""
    parser = _Parser(
        prog="chatstate",
        description="Find, export, fix and check the state chatstate keeps for a bot's users.",
        epilog="Exit status: 0 ok, 1 an operation failed, 2 a usage error.",
    )
    parser.add_argument("--version", action="version", version=f"chatstate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    backend = _backend_options()
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=_describe(command),
            parents=[backend] if command.backends else [],
        )
        command.add_arguments(sub)
        sub.set_defaults(command_entry=command)
    return parser
