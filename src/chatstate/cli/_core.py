"""``main()``: parse the command line, choose the backend, run the command, exit with a status."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

import redis.exceptions as rex

from chatstate.cli._backends import KEY_SECRET_ENV, POSTGRES_DSN_ENV, REDIS_URL_ENV, choose_store
from chatstate.cli._commands import Command
from chatstate.cli._console import Console, url_secrets
from chatstate.cli._errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CommandError,
    CommandLineError,
    operational_message,
)
from chatstate.cli._parser import build_parser
from chatstate.exceptions import ChatstateError

__all__ = ["main"]

_DSN_PASSWORD = re.compile(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def dsn_secrets(dsn: str | None) -> list[str]:
    """The password in a PostgreSQL URL or key=value DSN (what output must never show)."""
    if not dsn:
        return []
    found = url_secrets(dsn) if "://" in dsn else []
    for match in _DSN_PASSWORD.finditer(dsn):
        found += [match.group(1), match.group(1).strip("'")]
    return [s for s in found if s]


def _hidden(redis_url: str | None, postgres_dsn: str | None = None) -> list[str]:
    """What no output may show: the URLs' and DSNs' passwords and the key secret."""
    hidden = url_secrets(redis_url) + url_secrets(os.environ.get(REDIS_URL_ENV))
    for dsn in (postgres_dsn, os.environ.get(POSTGRES_DSN_ENV)):
        hidden += dsn_secrets(dsn)
    key_secret = os.environ.get(KEY_SECRET_ENV)
    return [*hidden, key_secret] if key_secret else hidden


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one per exit path
    """Run the command line; returns the exit status.

    Args:
        argv: The arguments (``sys.argv[1:]`` when omitted).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    command: Command = args.command_entry
    console = Console(
        _hidden(getattr(args, "redis", None), getattr(args, "postgres", None)),
        progress=getattr(args, "progress", None),
    )
    try:
        args.store = choose_store(args, command.backends) if command.backends else None
        return command.run(args, console)
    except CommandLineError as exc:
        console.error(f"error: {exc}", prefix=f"{parser.prog} {args.command}: ")
        return EXIT_USAGE
    except (CommandError, ChatstateError) as exc:
        console.error(str(exc))
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (``chatstate users | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED
    except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
        # RedisClusterException (no reachable node) is no RedisError, and the
        # backends' from_url(cluster=True) lets it through untranslated.
        console.error(operational_message(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.error("interrupted")
        return EXIT_INTERRUPTED
