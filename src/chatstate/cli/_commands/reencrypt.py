"""``chatstate reencrypt --rules M:A``: every secret field under the newest key."""

from __future__ import annotations

import argparse

import attrs

from chatstate.cli._backends import store
from chatstate.cli._console import Console
from chatstate.cli._errors import CommandLineError
from chatstate.cli._loading import load_rules
from chatstate.exceptions import ChatstateError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--rules and --dry-run."""
    parser.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        required=True,
        help="your StateData as package.module:RULES, with its encryption and secret fields",
    )
    parser.add_argument("--dry-run", action="store_true", help="count, change nothing")


def run(args: argparse.Namespace, console: Console) -> int:
    """Encrypt every secret field with the newest key (plaintext and older keys)."""
    rules = load_rules(args.rules)
    cipher = rules.encryption
    if cipher is None or not rules.secret:
        raise CommandLineError(
            f"{args.rules!r} has no encryption: give the StateData your bot uses, with "
            "encryption=FieldEncryption(...) and its secret fields"
        )
    # The bot's ring may refuse plaintext (accept_plaintext=False): this command is
    # what brings plaintext left in the store under encryption, so it reads it.
    rules = attrs.evolve(rules, encryption=cipher.accepting_plaintext())
    where = store(args)
    counts = {"re-encrypted": 0, "current": 0, "failed": 0}
    done = "would re-encrypt" if args.dry_run else "re-encrypted"
    with where.listing_service(rules, by_tag=False) as svc:
        backend = svc.manager.backend
        for listed in where.listed(console):
            user_id = listed.user_id
            if user_id is None:
                counts["failed"] += 1
                console.error(
                    f"{listed.name}: a pseudonymous key (key_secret); its user id, which the "
                    "ciphertext is bound to, cannot be read back: re-encrypt it from the bot"
                )
                continue
            try:
                stored = backend.load(user_id)
                if stored is None or not cipher.needs_reencryption(stored.data, rules.secret):
                    counts["current"] += 1
                    continue
                if not args.dry_run:
                    # Read, decrypt and write back whole under a version check: the
                    # write seals every secret value with the current key.
                    svc.transaction(user_id, lambda _doc: None)
            except ChatstateError as exc:
                counts["failed"] += 1
                console.error(f"{user_id!r}: {exc}")
                continue
            counts["re-encrypted"] += 1
            console.progress(f"{done} {counts['re-encrypted']} documents")
    console.out(
        f"{done}: {counts['re-encrypted']}, already current: {counts['current']}, "
        f"failed: {counts['failed']}"
    )
    return 1 if counts["failed"] else 0
