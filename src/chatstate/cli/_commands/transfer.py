"""``chatstate export USER`` and ``chatstate import FILE``: a user's document, moved as JSON.

``export`` prints what ``StateService.export`` returns; ``import`` writes such
an export back with a compare-and-set, never over a newer document unless asked.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path
from typing import Any, Final

from chatstate.cli._backends import store
from chatstate.cli._commands.state import RULES_HELP, dump
from chatstate.cli._console import Console
from chatstate.cli._errors import CommandError
from chatstate.cli._loading import load_rules, reading_rules
from chatstate.exceptions import SchemaVersionError
from chatstate.state import MAX_SCHEMA, Snapshot, StateManager, Write

__all__ = [
    "EXPORT_FORMAT",
    "add_export_arguments",
    "add_import_arguments",
    "find_redacted",
    "read_export",
    "run_export",
    "run_import",
]

EXPORT_FORMAT: Final = 1
"""The ``chatstate_export`` version this command line reads."""

_REDACTED: Final = re.compile(r"^<secret( sha256:[0-9a-f]{12})?>$")
_ATTEMPTS: Final = 5


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """USER, --include-secrets and --rules."""
    parser.add_argument("user_id", metavar="USER")
    parser.add_argument(
        "--include-secrets",
        action="store_true",
        help="keep tokens, passwords and preserved fields (needed to import the export)",
    )
    parser.add_argument("--rules", metavar="MODULE:ATTR", help=RULES_HELP)


def run_export(args: argparse.Namespace, console: Console) -> int:
    """Print a user's document as an export (secrets redacted unless asked for)."""
    where = store(args)
    rules = reading_rules(load_rules(args.rules))
    with where.service(rules) as svc:
        export = svc.export(args.user_id, include_secrets=args.include_secrets)
    if export["version"] == 0:
        raise CommandError(f"no state is stored for user {args.user_id!r} in {where.where}")
    console.out(dump(export))
    return 0


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """FILE, --rules and --overwrite."""
    parser.add_argument("file", metavar="FILE", help="an export; - reads standard input")
    parser.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        help="your StateData as package.module:RULES: with encryption, secret fields are "
        "stored encrypted whether the export holds plaintext or ciphertext",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the stored document even when it is as new or newer than the export",
    )


def find_redacted(node: Any, path: str = "") -> str | None:
    """The path of the first redacted secret (``"<secret sha256:...>"``) in ``node``."""
    if isinstance(node, str):
        return path or "." if _REDACTED.match(node) else None
    if isinstance(node, dict):
        for key, value in node.items():
            found = find_redacted(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    if isinstance(node, list):
        for i, value in enumerate(node):
            found = find_redacted(value, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def read_export(source: str) -> tuple[str, int, dict[str, Any], int]:
    """An export's user id, version, document and schema, from a file or ``-`` (stdin)."""
    name = "standard input" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise CommandError(f"cannot read {name}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise CommandError(f"{name} is not UTF-8 text") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise CommandError(f"{name} is not JSON ({exc})") from None
    if not (
        isinstance(data, dict)
        and data.get("chatstate_export") == EXPORT_FORMAT
        and isinstance(data.get("user_id"), str)
        and type(data.get("version")) is int
        and isinstance(data.get("document"), dict)
        and type(data.get("schema", 1)) is int
        and 1 <= data.get("schema", 1) <= MAX_SCHEMA
    ):
        raise CommandError(
            f"{name} is not a chatstate export (chatstate_export, user_id, version, document, "
            f"and an optional schema from 1 to {MAX_SCHEMA})"
        )
    where = find_redacted(data["document"])
    if where is not None:
        raise CommandError(
            f"{name} holds a redacted secret (at {where}); importing it would store the "
            "placeholder: export with --include-secrets"
        )
    return data["user_id"], data["version"], data["document"], data.get("schema", 1)


def _replace(
    manager: StateManager, document: dict[str, Any], schema: int, current: Snapshot
) -> Write:
    # The document keeps the schema it was exported at: the bot migrates it from
    # there, and a document stored at a newer schema is never replaced by it.
    made = manager.replace_write(current, document, None)
    made.schema = schema
    return made


def run_import(args: argparse.Namespace, console: Console) -> int:
    """Write an export back, unless the stored document is as new or newer."""
    user_id, version, document, schema = read_export(args.file)
    rules = reading_rules(load_rules(args.rules)) if args.rules else None
    if rules is not None and rules.encryption is not None:
        # Plaintext (a service's export) or ciphertext (as stored): decrypted here,
        # then the service encrypts every secret value with the current key.
        document = rules.encryption.decrypt_document(document, user_id, rules.secret)
    with store(args).service(rules, create=True) as svc:
        manager = svc.manager
        for _ in range(_ATTEMPTS):
            current = svc.snapshot(user_id)
            if current.version and current.data == document:
                console.out(f"{user_id!r} already holds this document (version {current.version})")
                return 0
            if current.version >= version and current.version and not args.overwrite:
                raise CommandError(
                    f"refused: {user_id!r} is stored at version {current.version}, not older "
                    f"than the export's {version}; pass --overwrite to replace it"
                )
            try:
                outcome = manager.apply(
                    user_id,
                    "Failed to import state",
                    functools.partial(_replace, manager, document, schema, current),
                )
            except SchemaVersionError as exc:
                raise CommandError(
                    f"refused: {user_id!r} is stored at schema version {exc.stored}, newer "
                    f"than the export's {schema}"
                ) from None
            if outcome.status == "applied":
                console.out(f"imported {user_id!r}: now version {outcome.snapshot.version}")
                return 0
        raise CommandError(f"{user_id!r} kept changing during the import; try again")
