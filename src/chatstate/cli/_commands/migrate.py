"""``chatstate migrate --rules M:A``: every document to the rules' schema version."""

from __future__ import annotations

import argparse

import attrs

from chatstate.cli._backends import SCAN_COUNT, store
from chatstate.cli._console import Console
from chatstate.cli._errors import CommandError, CommandLineError
from chatstate.cli._loading import load_schema_rules
from chatstate.exceptions import ChatstateError
from chatstate.state import StateManager

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--rules, --dry-run and --batch."""
    parser.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        required=True,
        help="your StateData (or a function returning it) with schema_version and migrations",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run the migrations and count, but write nothing",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=SCAN_COUNT,
        metavar="N",
        help=f"keys asked of each Redis SCAN call (default {SCAN_COUNT})",
    )


def _migrate_one(
    manager: StateManager, address: str | None, name: str, *, dry_run: bool
) -> str | None:
    """Migrate one stored document: ``"migrated"``, ``"current"`` or ``None`` (gone)."""
    if address is None:
        raise CommandError(
            "a pseudonymous key (key_secret) with encryption: its user id, which "
            "the ciphertexts are bound to, cannot be read back; migrate from the bot"
        )
    stored = manager.backend.load(address)
    if stored is None:
        return None  # deleted or expired since the listing found it
    snapshot = manager.reveal(address, stored)  # secret fields decrypted, if any
    if not manager.needs_migration(name, snapshot):
        return "current"
    if dry_run:
        manager.migrated(name, snapshot)
    else:
        manager.migrate_stored(address, snapshot)
    return "migrated"


def run(args: argparse.Namespace, console: Console) -> int:
    """Bring every document to the rules' schema version.

    Idempotent, hence resumable: a document already at the schema version is
    counted as current and left alone, so running it again after an interruption
    picks up where it stopped. A document whose migration fails is reported and
    left exactly as it was.
    """
    if args.batch < 1:
        raise CommandLineError("--batch must be at least 1")
    rules = load_schema_rules(args.rules)
    where = store(args)
    # On Redis, users are addressed by the hash tag of their keys (an encoded id is
    # at most three characters for each of the id's), so pseudonymous keys migrate
    # too; except with encryption, whose ciphertexts are bound to the real user id.
    by_tag = where.addresses_by_tag and rules.encryption is None
    limit = max(rules.max_user_id_length * 3, 64)
    svc = where.listing_service(attrs.evolve(rules, max_user_id_length=limit), by_tag=by_tag)
    counts = {"migrated": 0, "current": 0, "failed": 0}
    done = "would migrate" if args.dry_run else "migrated"
    with svc:
        for listed in where.listed(console, batch=args.batch):
            address = listed.tag if by_tag else listed.user_id
            try:
                result = _migrate_one(svc.manager, address, listed.name, dry_run=args.dry_run)
                if result is not None:
                    counts[result] += 1
            except (ChatstateError, CommandError) as exc:
                counts["failed"] += 1
                console.error(f"user {listed.name!r}: {exc}", prefix="chatstate migrate: failed: ")
            console.progress(
                f"{done} {counts['migrated']}, current {counts['current']}, "
                f"failed {counts['failed']}"
            )
    console.out(
        f"{done}: {counts['migrated']}, already current: {counts['current']}, "
        f"failed: {counts['failed']} (schema version {rules.schema_version})"
    )
    return 1 if counts["failed"] else 0
