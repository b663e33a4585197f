"""The chatstate command line: find, export, fix and check the state of a bot's users.

Every command but ``mermaid`` takes ``--redis URL`` (or ``CHATSTATE_REDIS_URL``),
``--namespace NS`` (or ``CHATSTATE_NAMESPACE``; default ``chatstate``) and
``--cluster`` (the URL is a node of a Redis Cluster); a bot whose backend has a
``key_secret`` passes it in ``CHATSTATE_KEY_SECRET``:

- ``state USER [--rules M:A]``: a user's state as JSON, secrets as fingerprints.
- ``export USER [--include-secrets] [--rules M:A]``: the user id, version and
  document as JSON, secrets redacted unless asked for.
- ``import FILE [--overwrite]``: write an export back, unless the stored
  document is as new or newer; ``-`` reads standard input.
- ``delete USER [--yes] [--force]``: remove a user's document.
- ``erase USER [--yes]``: remove everything kept for a user, op ids included.
- ``users [--json]``: every user id of the namespace, one a line (SCAN, never KEYS).
- ``migrate --rules M:A [--dry-run] [--batch N]``: bring every document to the
  rules' ``schema_version`` (see docs/migrations.md); exit status 1 if any failed.
- ``stats [--sample N] [--json]``: users, memory per user, operation ids remembered.
- ``doctor [--acl-user NAME] [--strict]``: what the server is, persistence,
  eviction, the ACL chatstate needs and whether the user has it, scripts,
  Cluster slots, latency.
- ``bench [--count N] [--users N] [--concurrency N]``: updates/s and gets/s.
- ``mermaid package.module:FlowClass``: a flow's graph as a Mermaid diagram.

Exit status: 0 when all went well, 1 when an operation failed (one line on
standard error), 2 for a usage error. No password ever appears in any output;
progress goes to standard error on a terminal (``--progress`` forces it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import json
import os
import re
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import redis
import redis.exceptions as rex

from chatstate._redact import redact
from chatstate.exceptions import ChatstateError, ConfigurationError, SchemaVersionError
from chatstate.flow import Flow
from chatstate.state import (
    MAX_SCHEMA,
    AsyncStateService,
    Snapshot,
    StateData,
    StateManager,
    StateService,
    Write,
)
from chatstate.state.redis import (
    APPLY_SCRIPT,
    LOAD_SCRIPT,
    AsyncRedisBackend,
    KeyScheme,
    RedisBackend,
    default_client_options,
    map_redis_errors,
)

__all__ = ["main"]

EXPORT_FORMAT: Final = 1
"""The ``chatstate_export`` version an export carries."""

ACL_COMMANDS: Final = (
    "evalsha", "eval", "script|load", "hgetall", "ping", "hmget", "hget", "hset", "hdel",
    "hincrby", "exists", "type", "del", "pexpire", "pttl", "get", "set",
    "zadd", "zrem", "zrangebyscore", "scan",
)  # fmt: skip
"""The commands the library runs (docs/backends.md, "The ACL chatstate needs")."""

_REDACTED: Final = re.compile(r"^<secret( sha256:[0-9a-f]{12})?>$")
_URL_PASSWORD: Final = re.compile(r"((?:rediss?|unix|valkeys?)://[^:@/\s]*:)([^@\s]+)@")
_SLOTS: Final = 16384
_SCAN_COUNT: Final = 1000


class CommandError(Exception):
    """An operation failed: one line on standard error, exit status 1."""


class CommandLineError(Exception):
    """The command line asks for something impossible: exit status 2."""


# -- output --------------------------------------------------------------------------


def url_secrets(url: str | None) -> list[str]:
    """The password in a Redis URL, as written and decoded (what output must never show)."""
    if not url:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(url)
        if parts.password:
            found += [parts.password, unquote(parts.password)]
        for name, values in parse_qs(parts.query).items():
            if "pass" in name.lower():
                found += values
    except ValueError:
        pass
    return [s for s in found if s]


class Console:
    """Standard output and error, with the password scrubbed and progress throttled."""

    def __init__(self, hidden: Sequence[str] = (), *, progress: bool | None = None) -> None:
        self.hidden = sorted(set(hidden), key=len, reverse=True)
        self.tty = sys.stderr.isatty()
        self.show_progress = self.tty if progress is None else progress
        self._last = 0.0
        self._open_line = False

    def scrub(self, text: str) -> str:
        """``text`` without any password."""
        for secret in self.hidden:
            text = text.replace(secret, "***")
        return _URL_PASSWORD.sub(r"\1***@", text)

    def out(self, text: str = "") -> None:
        """A line on standard output."""
        self._end_progress()
        sys.stdout.write(self.scrub(text) + "\n")

    def error(self, text: str, *, prefix: str = "chatstate: ") -> None:
        """One line on standard error."""
        self._end_progress()
        sys.stdout.flush()
        sys.stderr.write(prefix + self.scrub(" ".join(text.split())) + "\n")
        sys.stderr.flush()

    def progress(self, text: str, *, final: bool = False) -> None:
        """Show how far a long operation got (at most twice a second; always when ``final``)."""
        if not self.show_progress:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.5:
            return
        self._last = now
        text = self.scrub(text)
        if self.tty and not final:
            sys.stderr.write("\r" + text + "\x1b[K")
            self._open_line = True
        else:
            if self._open_line:
                sys.stderr.write("\r\x1b[K")
                self._open_line = False
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _end_progress(self) -> None:
        if self._open_line:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._open_line = False


# -- connections ---------------------------------------------------------------------


def _check_url(args: argparse.Namespace) -> str:
    if not args.redis:
        raise CommandLineError(f"{args.command} needs --redis URL (or CHATSTATE_REDIS_URL)")
    try:
        KeyScheme(args.namespace)
    except ConfigurationError as exc:
        raise CommandLineError(str(exc)) from None
    return str(args.redis)


def _service(args: argparse.Namespace, rules: StateData | None = None) -> StateService:
    url = _check_url(args)
    try:
        backend = RedisBackend.from_url(
            url,
            namespace=args.namespace,
            cluster=args.cluster,
            key_secret=os.environ.get("CHATSTATE_KEY_SECRET") or None,
        )
    except ConfigurationError as exc:
        raise CommandLineError(str(exc)) from exc
    except (ValueError, TypeError) as exc:
        raise CommandLineError(f"not a usable Redis URL: {exc}") from exc
    return StateService(backend, rules)


@contextlib.contextmanager
def _client(args: argparse.Namespace) -> Iterator[Any]:
    """A plain redis-py client for the commands the library never runs (SCAN, INFO, ...)."""
    client = _open_client(args)
    try:
        yield client
    finally:
        client.close()


def _open_client(args: argparse.Namespace) -> Any:
    url = _check_url(args)
    options = default_client_options(asynchronous=False)
    try:
        if args.cluster:
            from redis.cluster import RedisCluster  # noqa: PLC0415

            options.pop("health_check_interval", None)
            return RedisCluster.from_url(url, **options)
        return redis.Redis.from_url(url, **options)
    except (ValueError, TypeError) as exc:
        raise CommandLineError(f"not a usable Redis URL: {exc}") from exc


def _nodes(client: Any) -> list[tuple[str, Any]]:
    """Each primary as (host:port, a client of that node alone): one for a standalone server."""
    if hasattr(client, "get_primaries"):
        return [
            (f"{n.host}:{n.port}", client.get_redis_connection(n)) for n in client.get_primaries()
        ]
    kwargs = client.connection_pool.connection_kwargs
    where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
    return [(str(where), client)]


def _text(raw: Any) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


# -- keys ----------------------------------------------------------------------------


def parse_key(key: str, namespace: str) -> tuple[str, str] | None:
    """What a key of ``namespace`` holds and whose it is: ``("doc", user_id)``, ...

    The kinds are ``doc``, ``ops``, ``claim`` and ``lock``; in place of the user
    id, the hash tag of a key built with a key secret; ``None`` for a key
    chatstate did not build (see :class:`~chatstate.state.KeyScheme`).
    """
    parsed = KeyScheme(namespace).parse(key)
    if parsed is None:
        return None
    return parsed.kind, parsed.user_id if parsed.user_id is not None else parsed.tag


def _scan(
    client: Any,
    args: argparse.Namespace,
    console: Console,
    pattern_tail: str,
    count: int = _SCAN_COUNT,
) -> Iterator[tuple[Any, str, tuple[str, str]]]:
    """Every chatstate key of the namespace, on every primary: (node client, key, parsed)."""
    pattern = _glob_escape(args.namespace) + pattern_tail
    scanned = 0
    nodes = _nodes(client)
    try:
        for where, node in nodes:
            with map_redis_errors("SCAN"):
                for raw in node.scan_iter(match=pattern, count=count):
                    scanned += 1
                    console.progress(f"scanned {scanned} keys ({where})")
                    try:
                        key = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                    except UnicodeDecodeError:
                        continue
                    parsed = parse_key(key, args.namespace)
                    if parsed is not None:
                        yield node, key, parsed
    finally:
        console.progress(f"scanned {scanned} keys on {len(nodes)} node(s)", final=True)


# -- commands: one user --------------------------------------------------------------


def _load_object(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name:
        raise CommandLineError(f"expected module:{what}, got {spec!r}")
    sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CommandLineError(f"cannot import {module_name!r}: {exc}") from exc
    return getattr(module, attr or what, None)


def _load_rules(spec: str | None) -> StateData:
    if not spec:
        return StateData()
    rules = _load_object(spec, "RULES")
    if not isinstance(rules, StateData):
        raise CommandLineError(f"{spec!r} is not a StateData")
    return rules


def _decrypted(rules: StateData, user_id: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the secret fields decrypted when the rules carry a key ring.

    So that fingerprints match the ones the bot logs (of the token, not of its
    ciphertext), and ``export --include-secrets`` gives plaintext to import.
    """
    if rules.encryption is None:
        return data
    return rules.encryption.accepting_plaintext().decrypt_document(data, user_id, rules.secret)


def cmd_mermaid(args: argparse.Namespace, console: Console) -> int:
    """Print a flow's graph."""
    if ":" not in args.flow:
        raise CommandLineError(f"expected module:FlowClass, got {args.flow!r}")
    flow = _load_object(args.flow, "Flow")
    if not (isinstance(flow, type) and issubclass(flow, Flow)):
        raise CommandLineError(f"{args.flow!r} is not a Flow subclass")
    console.out(flow.mermaid())
    return 0


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def cmd_state(args: argparse.Namespace, console: Console) -> int:
    """Print a user's state with its secrets as fingerprints."""
    rules = _load_rules(args.rules)
    with _service(args) as svc:
        snapshot = svc.snapshot(args.user_id)
        data = redact(_decrypted(rules, args.user_id, snapshot.data), rules.redacted_fields)
    console.out(_dump({"user_id": args.user_id, "version": snapshot.version, "state": data}))
    return 0


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    """Print a user's document as an export (secrets redacted unless asked for)."""
    rules = _load_rules(args.rules)
    with _service(args) as svc:
        snapshot = svc.snapshot(args.user_id)
        if snapshot.version == 0:
            raise CommandError(
                f"no state is stored for user {args.user_id!r} in namespace {args.namespace!r}"
            )
        data = _decrypted(rules, args.user_id, snapshot.data)
        data = data if args.include_secrets else redact(data, rules.redacted_fields)
    export = {
        "chatstate_export": EXPORT_FORMAT,
        "user_id": args.user_id,
        "version": snapshot.version,
        "secrets": "included" if args.include_secrets else "redacted",
        "document": data,
    }
    if snapshot.schema != 1:
        export["schema"] = snapshot.schema  # the document's shape (docs/migrations.md)
    console.out(_dump(export))
    return 0


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


def _read_export(source: str) -> tuple[str, int, dict[str, Any], int]:
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


def cmd_import(args: argparse.Namespace, console: Console) -> int:
    """Write an export back, unless the stored document is as new or newer."""
    user_id, version, document, schema = _read_export(args.file)
    rules = _load_rules(args.rules) if args.rules else None
    if rules is not None:
        # Only the rules' encryption and limits: the document keeps the schema it
        # was exported at (the bot migrates it from there).
        rules = attrs.evolve(rules, schema_version=None, migrations={})
        if rules.encryption is not None:
            # Plaintext (a service's export) or ciphertext (this CLI's): decrypted
            # here, then the service encrypts every secret value with the current key.
            rules = attrs.evolve(rules, encryption=rules.encryption.accepting_plaintext())
            document = _decrypted(rules, user_id, document)

    def write(current: Snapshot) -> Write:
        # The document keeps the schema it was exported at: the bot migrates it from
        # there, and a document stored at a newer schema is never replaced by it.
        made = manager.replace_write(current, document, None)
        made.schema = schema
        return made

    with _service(args, rules) as svc:
        manager = svc.manager
        for _attempt in range(5):
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
                    user_id, "Failed to import state", functools.partial(write, current)
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


def cmd_delete(args: argparse.Namespace, console: Console) -> int:
    """Remove a user's document (after a confirmation on a terminal)."""
    if not args.yes:
        if not sys.stdin.isatty():
            raise CommandLineError(
                "delete asks for confirmation: pass --yes when not on a terminal"
            )
        sys.stderr.write(
            console.scrub(f"delete the state of {args.user_id!r} in {args.namespace!r}? [y/N] ")
        )
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
            console.error("nothing deleted")
            return 1
    with _service(args) as svc:
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


def cmd_erase(args: argparse.Namespace, console: Console) -> int:
    """Remove everything kept for a user, op ids included (after a confirmation)."""
    _confirm(args, console, f"erase everything kept for {args.user_id!r} in {args.namespace!r}?")
    with _service(args) as svc:
        removed = svc.erase(args.user_id)
    if not removed:
        console.out(f"nothing is stored for {args.user_id!r}")
    else:
        console.out(f"erased {args.user_id!r}: {', '.join(removed)}")
    return 0


def _confirm(args: argparse.Namespace, console: Console, question: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise CommandLineError(
            f"{args.command} asks for confirmation: pass --yes when not on a terminal"
        )
    sys.stderr.write(console.scrub(f"{question} [y/N] "))
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
        raise CommandError("nothing was changed")


# -- commands: the namespace ---------------------------------------------------------


def cmd_users(args: argparse.Namespace, console: Console) -> int:
    """Stream every user id of the namespace, one a line."""
    count = 0
    odd = 0
    with _client(args) as client:
        for _node, _key, (kind, user_id) in _scan(client, args, console, ":{*}"):
            if kind != "doc":
                continue
            count += 1
            if args.json:
                line = json.dumps(user_id, ensure_ascii=False)
            elif user_id.isprintable():
                line = user_id
            else:
                odd += 1
                line = json.dumps(user_id, ensure_ascii=False)
            sys.stdout.write(line + "\n")
            if count % 1000 == 0:
                sys.stdout.flush()
    sys.stdout.flush()
    if odd:
        console.error(f"{odd} user id(s) hold unprintable characters: shown as JSON; see --json")
    console.progress(f"{count} users", final=True)
    return 0


def _load_schema_rules(spec: str) -> StateData:
    """The StateData named by ``spec``: the object itself, or what a factory of it returns."""
    found = _load_object(spec, "RULES")
    if callable(found) and not isinstance(found, StateData):
        try:
            found = found()
        except TypeError as exc:  # a function that is not a factory of rules
            raise CommandLineError(f"{spec!r} is not a StateData: {exc}") from exc
    if not isinstance(found, StateData):
        raise CommandLineError(f"{spec!r} is not a StateData (nor a function returning one)")
    if found.schema_version is None:
        raise CommandLineError(f"{spec!r} has no schema_version: there is nothing to migrate to")
    return found


def _migrate_one(
    manager: StateManager, tag: str, user_id: str, *, by_tag: bool, dry_run: bool
) -> str | None:
    """Migrate one stored document: ``"migrated"``, ``"current"`` or ``None`` (gone)."""
    if not by_tag and user_id.startswith("#"):
        raise CommandError(
            "a pseudonymous key (key_secret) with encryption: its user id, which the "
            "ciphertexts are bound to, cannot be read back; migrate from the bot"
        )
    stored = manager.backend.load(tag)
    if stored is None:
        return None  # deleted or expired since the scan found it
    snapshot = manager.reveal(tag, stored)  # secret fields decrypted, if any
    if not manager.needs_migration(user_id, snapshot):
        return "current"
    if dry_run:
        manager.migrated(user_id, snapshot)
    else:
        manager.migrate_stored(tag, snapshot)
    return "migrated"


def cmd_migrate(args: argparse.Namespace, console: Console) -> int:
    """Bring every document of the namespace to the rules' schema version.

    Idempotent, hence resumable: a document already at the schema version is
    counted as current and left alone, so running it again after an interruption
    picks up where it stopped. A document whose migration fails is reported and
    left exactly as it was.
    """
    if args.batch < 1:
        raise CommandLineError("--batch must be at least 1")
    rules = _load_schema_rules(args.rules)
    url = _check_url(args)
    # Users are addressed by the hash tag of their keys (an encoded id is at most
    # three characters for each of the id's), so pseudonymous keys migrate too;
    # except with encryption, whose ciphertexts are bound to the real user id.
    by_tag = rules.encryption is None
    keys = KeyScheme(args.namespace, by_tag=by_tag)
    try:
        backend = RedisBackend.from_url(url, keys=keys, cluster=args.cluster)
    except (ValueError, TypeError) as exc:
        raise CommandLineError(f"not a usable Redis URL: {exc}") from exc
    limit = max(rules.max_user_id_length * 3, 64)
    svc = StateService(backend, attrs.evolve(rules, max_user_id_length=limit))
    manager = svc.manager
    prefix = args.namespace + ":{"
    counts = {"migrated": 0, "current": 0, "failed": 0}
    done = "would migrate" if args.dry_run else "migrated"
    with svc, _client(args) as client:
        for _node, key, (kind, user_id) in _scan(client, args, console, ":{*}", args.batch):
            if kind != "doc":
                continue
            tag = key[len(prefix) : -1] if by_tag else user_id
            try:
                result = _migrate_one(manager, tag, user_id, by_tag=by_tag, dry_run=args.dry_run)
                if result is not None:
                    counts[result] += 1
            except (ChatstateError, CommandError) as exc:
                counts["failed"] += 1
                console.error(f"user {user_id!r}: {exc}", prefix="chatstate migrate: failed: ")
            console.progress(
                f"{done} {counts['migrated']}, current {counts['current']}, "
                f"failed {counts['failed']}"
            )
    console.out(
        f"{done}: {counts['migrated']}, already current: {counts['current']}, "
        f"failed: {counts['failed']} (schema version {rules.schema_version})"
    )
    return 1 if counts["failed"] else 0


def cmd_reencrypt(args: argparse.Namespace, console: Console) -> int:
    """Encrypt every secret field with the newest key (plaintext and older keys)."""
    rules = _load_rules(args.rules)
    cipher = rules.encryption
    if cipher is None or not rules.secret:
        raise CommandLineError(
            f"{args.rules!r} has no encryption: give the StateData your bot uses, with "
            "encryption=FieldEncryption(...) and its secret fields"
        )
    # The bot's ring may refuse plaintext (accept_plaintext=False): this command is
    # what brings plaintext left in the store under encryption, so it reads it.
    rules = attrs.evolve(rules, encryption=cipher.accepting_plaintext())
    counts = {"re-encrypted": 0, "current": 0, "failed": 0}
    done = "would re-encrypt" if args.dry_run else "re-encrypted"
    with _client(args) as client, _service(args, rules) as svc:
        backend = svc.manager.backend
        for _node, _key, (kind, user_id) in _scan(client, args, console, ":{*}"):
            if kind != "doc":
                continue
            if user_id.startswith("#"):
                counts["failed"] += 1
                console.error(
                    f"{user_id}: a pseudonymous key (key_secret); its user id, which the "
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


def _batches(items: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def cmd_stats(args: argparse.Namespace, console: Console) -> int:
    """Count users, op logs, claims and locks; sample memory per user."""
    if args.sample < 0:
        raise CommandLineError("--sample must not be negative")
    counts = {"doc": 0, "ops": 0, "claim": 0, "lock": 0}
    with _client(args) as client:
        ops_keys: dict[int, tuple[Any, list[str]]] = {}
        sample: dict[int, tuple[Any, list[str]]] = {}
        sampled = 0
        for node, key, (kind, _user) in _scan(client, args, console, ":{*"):
            counts[kind] += 1
            if kind == "ops":
                ops_keys.setdefault(id(node), (node, []))[1].append(key)
            elif kind == "doc" and sampled < args.sample:
                sampled += 1
                sample.setdefault(id(node), (node, []))[1].extend([key, key + ":ops"])
        remembered, recorded = _read_op_logs(ops_keys, counts["ops"], console)
        sizes = _memory_usage(sample)
    doc_bytes, ops_bytes = sizes[0::2], sizes[1::2]
    result = {
        "namespace": args.namespace,
        "users": counts["doc"],
        "op_logs": counts["ops"],
        "op_ids_remembered": remembered,
        "writes_recorded": recorded,
        "claims_held": counts["claim"],
        "locks_held": counts["lock"],
        "sampled_users": len(doc_bytes),
        "bytes_per_user": round(statistics.fmean(doc_bytes)) if doc_bytes else None,
        "op_log_bytes_per_user": round(statistics.fmean(ops_bytes)) if ops_bytes else None,
    }
    if args.json:
        console.out(json.dumps(result))
        return 0
    console.out(f"namespace          {args.namespace}")
    console.out(f"users              {counts['doc']}")
    console.out(f"op logs            {counts['ops']}  (users written within the dedupe window)")
    console.out(f"op ids remembered  {remembered}  ({recorded} writes recorded in those logs)")
    console.out(f"claims held        {counts['claim']}")
    console.out(f"locks held         {counts['lock']}")
    if doc_bytes:
        console.out(
            f"memory per user    {_size(result['bytes_per_user'])} document + "
            f"{_size(result['op_log_bytes_per_user'])} op log  "
            f"(MEMORY USAGE, mean of {len(doc_bytes)} users)"
        )
    return 0


def _read_op_logs(
    ops_keys: dict[int, tuple[Any, list[str]]], total: int, console: Console
) -> tuple[int, int]:
    """The op ids the logs remember, and the writes they have recorded (``#n``)."""
    remembered = recorded = done = 0
    with map_redis_errors("HLEN"):
        for node, keys in ops_keys.values():
            for batch in _batches(keys):
                pipe = node.pipeline(transaction=False)
                for key in batch:
                    pipe.hlen(key)
                    pipe.hget(key, "#n")
                replies = pipe.execute()
                for length, n in zip(replies[0::2], replies[1::2], strict=True):
                    remembered += max(0, int(length) - 1)
                    recorded += int(n or 0)
                done += len(batch)
                console.progress(f"read {done} of {total} operation logs")
    return remembered, recorded


def _memory_usage(sample: dict[int, tuple[Any, list[str]]]) -> list[int]:
    """MEMORY USAGE of each key (a missing key counts 0), node by node."""
    sizes: list[int] = []
    with map_redis_errors("MEMORY USAGE"):
        for node, keys in sample.values():
            for batch in _batches(keys):
                pipe = node.pipeline(transaction=False)
                for key in batch:
                    pipe.memory_usage(key, samples=0)
                sizes += [int(r or 0) for r in pipe.execute()]
    return sizes


def _size(count: Any) -> str:
    value = float(count or 0)
    for unit in ("B", "KB", "MB"):
        if value < 1024 or unit == "MB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} MB"  # pragma: no cover - the loop returns


# -- doctor --------------------------------------------------------------------------


class Report:
    """The doctor's findings, printed as they come."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.worst = "ok"

    def add(self, status: str, name: str, detail: str) -> None:
        """One finding: ``ok``, ``warn``, ``fail`` or ``skip``."""
        order = ["ok", "skip", "warn", "fail"]
        if order.index(status) > order.index(self.worst):
            self.worst = status
        self.console.out(f"{status:<5} {name:<12} {detail}")


def acl_rule(namespace: str, user: str = "mybot") -> str:
    """The ``ACL SETUSER`` line that gives ``user`` exactly what chatstate needs."""
    commands = " ".join("+" + c for c in ACL_COMMANDS)
    return f"ACL SETUSER {user} on >PASSWORD ~{_glob_escape(namespace)}:* -@all {commands}"


def _dry_runs(namespace: str) -> list[tuple[str, tuple[str, ...]]]:
    key = f"{namespace}:{{chatstate-doctor}}"
    index = f"{namespace}:deadlines:{{0}}"
    sha = "0" * 40
    arguments: dict[str, tuple[str, ...]] = {
        "evalsha": ("EVALSHA", sha, "1", key),
        "eval": ("EVAL", "return 1", "1", key),
        "script|load": ("SCRIPT", "LOAD", "return 1"),
        "hgetall": ("HGETALL", key),
        "ping": ("PING",),
        "hmget": ("HMGET", key, "#v"),
        "hget": ("HGET", key, "#v"),
        "hset": ("HSET", key, "#v", "1"),
        "hdel": ("HDEL", key, "#v"),
        "hincrby": ("HINCRBY", key, "#n", "1"),
        "exists": ("EXISTS", key),
        "type": ("TYPE", key),
        "del": ("DEL", key),
        "pexpire": ("PEXPIRE", key, "1000"),
        "pttl": ("PTTL", key),
        "get": ("GET", key),
        "set": ("SET", key, "1", "NX", "PX", "1000"),
        "zadd": ("ZADD", index, "LT", "1", "u"),
        "zrem": ("ZREM", index, "u"),
        "zrangebyscore": ("ZRANGEBYSCORE", index, "-inf", "1", "WITHSCORES", "LIMIT", "0", "1"),
        "scan": ("SCAN", "0", "MATCH", key, "COUNT", "1"),
    }
    return [(name, arguments[name]) for name in ACL_COMMANDS]


def _refused(exc: rex.RedisError) -> bool:
    return isinstance(exc, rex.NoPermissionError) or "NOPERM" in str(exc)[:80]


def _check_acl(node: Any, namespace: str, user: str | None) -> tuple[str, str]:
    try:
        name = user or _text(node.execute_command("ACL", "WHOAMI"))
        missing = []
        for command, arguments in _dry_runs(namespace):
            answer = _text(node.execute_command("ACL", "DRYRUN", name, *arguments))
            if answer != "OK":
                missing.append(f"{command} ({answer})")
    except rex.ResponseError as exc:
        text = str(exc)
        if _refused(exc):
            return "warn", (
                "cannot check: this user may not run ACL WHOAMI / ACL DRYRUN; run doctor as an "
                "admin with --acl-user NAME"
            )
        if "unknown subcommand" in text.lower() or "unknown command" in text.lower():
            return "warn", "cannot check: the server has no ACL DRYRUN (Redis 7 or later has)"
        return "fail", f"cannot check user {user or '(current)'}: {text}"
    if missing:
        return "fail", f"user {name!r} may not run: " + "; ".join(missing)
    return "ok", (
        f"user {name!r} may run all {len(ACL_COMMANDS)} commands chatstate needs "
        f"on {namespace}:* keys"
    )


def _config(node: Any, name: str) -> str | None:
    try:
        values = node.config_get(name)
    except rex.ResponseError:
        return None
    value = values.get(name, values.get(name.encode())) if values else None
    return None if value is None else _text(value)


def _check_persistence(node: Any) -> tuple[str, str]:
    appendonly = _config(node, "appendonly")
    if appendonly is None:  # CONFIG refused (a managed service): INFO still tells AOF
        aof = str(node.info("persistence").get("aof_enabled", "?"))
        if aof == "1":
            return "ok", "appendonly yes (CONFIG GET refused: appendfsync and save unknown)"
        return "warn", (
            "appendonly no (CONFIG GET refused): a restart loses the writes since the last "
            "snapshot, and the op ids that make redeliveries duplicates"
        )
    fsync = _config(node, "appendfsync") or "?"
    save = _config(node, "save")
    described = f"appendonly {appendonly}, appendfsync {fsync}, save {save!r}"
    if appendonly == "yes":
        if fsync == "no":
            return "warn", described + ": the OS flushes when it likes; use everysec or always"
        return "ok", described
    if save:
        return "warn", (
            described + ": RDB snapshots only, a crash loses the writes (and op ids) since "
            "the last one; set appendonly yes"
        )
    return "warn", described + ": no persistence, a restart loses every user's state"


def _check_memory(node: Any) -> tuple[str, str]:
    info = node.info("memory")
    policy = str(info.get("maxmemory_policy", "?"))
    limit = int(info.get("maxmemory", 0) or 0)
    used = int(info.get("used_memory", 0) or 0)
    size = f"used {_size(used)} of {_size(limit)}" if limit else f"used {_size(used)}, no limit"
    if policy != "noeviction":
        return "warn", (
            f"maxmemory-policy {policy} ({size}): eviction drops users' states and op logs "
            "silently; set noeviction (writes then fail with StoreFullError)"
        )
    if limit and used > 0.9 * limit:
        return "warn", f"maxmemory-policy noeviction, {size}: over 90% full"
    return "ok", f"maxmemory-policy noeviction ({size})"


def _server_line(node: Any) -> tuple[str, str, dict[str, Any]]:
    info = node.info("server")
    kind = (
        "Valkey"
        if "valkey_version" in info or str(info.get("server_name", "")).lower() == "valkey"
        else "Redis"
    )
    version = str(info.get("valkey_version" if kind == "Valkey" else "redis_version", "?"))
    mode = str(info.get("redis_mode", info.get("server_mode", "standalone")))
    role = str(node.info("replication").get("role", "?"))
    detail = f"{kind} {version}, {mode}, role {role}"
    try:
        major = int(version.split(".", maxsplit=1)[0])
    except ValueError:
        major = 0
    if role not in {"master", "primary", "?"}:
        return "fail", detail + ": a read-only replica; point --redis at the primary", info
    if mode == "sentinel":
        return "fail", detail + ": point --redis at the primary Sentinel names", info
    if major < 7:
        return "warn", detail + ": chatstate supports Redis and Valkey 7 and later", info
    return "ok", detail, info


def _check_slots(node: Any, primaries: int) -> tuple[str, str]:
    state = _text(node.execute_command("CLUSTER", "INFO"))
    ranges = sorted((int(r[0]), int(r[1])) for r in node.execute_command("CLUSTER", "SLOTS"))
    covered = 0
    gaps: list[str] = []
    nxt = 0
    for low, high in ranges:
        if low > nxt:
            gaps.append(f"{nxt}-{low - 1}")
        covered += max(0, high - max(low, nxt) + 1)
        nxt = max(nxt, high + 1)
    if nxt < _SLOTS:
        gaps.append(f"{nxt}-{_SLOTS - 1}")
    ok = "cluster_state:ok" in state
    detail = f"{covered}/{_SLOTS} slots covered by {primaries} primaries"
    if gaps or not ok:
        return "fail", detail + (f"; uncovered {', '.join(gaps[:5])}" if gaps else "") + (
            "" if ok else "; cluster_state is not ok"
        )
    return "ok", detail + ", cluster_state ok"


def _latency(node: Any, count: int = 10) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        node.ping()
        times.append(time.perf_counter() - start)
    return times


def _attempt(report: Report, name: str, check: Callable[[], tuple[str, str]]) -> None:
    try:
        status, detail = check()
    except rex.ResponseError as exc:
        status, detail = "warn", f"cannot tell: {exc}"
    report.add(status, name, detail)


def _check_scripts(node: Any) -> tuple[str, str]:
    try:
        apply, load = (
            _text(node.execute_command("SCRIPT", "LOAD", s)) for s in (APPLY_SCRIPT, LOAD_SCRIPT)
        )
    except rex.ResponseError as exc:
        return "fail", f"SCRIPT LOAD failed: {exc}"
    return "ok", f"both load (apply {apply[:12]}..., load {load[:12]}...)"


def _check_latency(node: Any) -> tuple[str, str]:
    times = _latency(node)
    return "ok", (
        f"{statistics.median(times) * 1000:.2f} ms median of {len(times)} pings "
        f"(max {max(times) * 1000:.2f} ms)"
    )


def _check_node(report: Report, node: Any, label: str, args: argparse.Namespace) -> bool:
    """Run every check of one node; True when it says it is part of a Cluster."""
    cluster_mode = False
    try:
        status, detail, info = _server_line(node)
        cluster_mode = info.get("redis_mode", info.get("server_mode")) == "cluster"
    except rex.ResponseError as exc:
        status, detail = "warn", f"INFO refused: {exc}"
    report.add(status, "server" + label, detail)
    _attempt(report, "persistence" + label, lambda: _check_persistence(node))
    _attempt(report, "memory" + label, lambda: _check_memory(node))
    status, detail = _check_acl(node, args.namespace, args.acl_user)
    report.add(status, "acl" + label, detail)
    return cluster_mode


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    """Check the server against what chatstate needs."""
    report = Report(console)
    with _client(args) as client:
        with map_redis_errors("PING"):
            client.ping()
        nodes = _nodes(client)
        console.out(f"chatstate doctor: namespace {args.namespace!r}, {len(nodes)} primary node(s)")
        cluster_mode = False
        with map_redis_errors("INFO"):
            for where, node in nodes:
                label = "" if len(nodes) == 1 else f" {where}"
                cluster_mode = _check_node(report, node, label, args) or cluster_mode
                _attempt(report, "scripts" + label, functools.partial(_check_scripts, node))
                _attempt(report, "latency" + label, functools.partial(_check_latency, node))
            if args.cluster:
                _attempt(report, "cluster", lambda: _check_slots(nodes[0][1], len(nodes)))
            elif cluster_mode:
                report.add("fail", "cluster", "this node is part of a Cluster: pass --cluster")
            else:
                report.add("skip", "cluster", "not a cluster")
    console.out()
    console.out("The ACL chatstate needs (the CLI's users, stats and doctor need more):")
    console.out("  " + acl_rule(args.namespace, args.acl_user or "mybot"))
    if report.worst == "fail" or (args.strict and report.worst == "warn"):
        return 1
    return 0


# -- bench ---------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Time updates and gets against the server, then remove what the benchmark wrote."""
    if args.count < 1 or args.users < 1 or args.concurrency < 1:
        raise CommandLineError("--count, --users and --concurrency must be at least 1")
    run = secrets.token_hex(4)
    users = [f"chatstate-bench-{run}-{i}" for i in range(args.users)]
    patch = {"step": "menu", "profile": {"name": "Ana", "lang": "es"}, "n": 0}
    try:
        if args.concurrency == 1:
            results = _bench_sync(args, console, users, patch)
        else:
            results = asyncio.run(_bench_async(args, console, users, patch))
    finally:
        _bench_cleanup(args, users)
    for name, seconds in results:
        callers = f"{args.concurrency} caller{'s' if args.concurrency > 1 else ''}"
        console.out(
            f"{name:<8} {args.count / seconds:9.0f}/s  "
            f"({args.count} in {seconds:.2f} s, {callers}, {args.users} users)"
        )
    return 0


def _bench_sync(
    args: argparse.Namespace, console: Console, users: list[str], patch: dict[str, Any]
) -> list[tuple[str, float]]:
    results = []
    with _service(args) as svc:
        for name, call in (
            ("updates", lambda i: svc.update(users[i % len(users)], {**patch, "n": i})),
            ("gets", lambda i: svc.get(users[i % len(users)])),
        ):
            start = time.perf_counter()
            for i in range(args.count):
                call(i)
                console.progress(f"{name} {i + 1}/{args.count}")
            results.append((name, time.perf_counter() - start))
    return results


async def _bench_async(
    args: argparse.Namespace, console: Console, users: list[str], patch: dict[str, Any]
) -> list[tuple[str, float]]:
    url = _check_url(args)
    backend = AsyncRedisBackend.from_url(url, namespace=args.namespace, cluster=args.cluster)
    results = []
    done = 0
    async with AsyncStateService(backend) as svc:
        for name in ("updates", "gets"):
            done = 0

            async def caller(worker: int, name: str = name) -> None:
                nonlocal done
                for i in range(worker, args.count, args.concurrency):
                    user = users[i % len(users)]
                    if name == "updates":
                        await svc.update(user, {**patch, "n": i})
                    else:
                        await svc.get(user)
                    done += 1
                    console.progress(f"{name} {done}/{args.count}")

            start = time.perf_counter()
            await asyncio.gather(*(caller(w) for w in range(args.concurrency)))
            results.append((name, time.perf_counter() - start))
    return results


def _bench_cleanup(args: argparse.Namespace, users: list[str]) -> None:
    with _client(args) as client, map_redis_errors("DEL"):
        for user in users:
            client.delete(*KeyScheme(args.namespace).keys(user))


# -- the parser ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error never shows a password typed in a URL."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        text = _URL_PASSWORD.sub(r"\1***@", message)
        self.exit(2, f"{self.prog}: error: {text}\n")

    def _print_message(self, message: str, file: Any = None) -> None:
        super()._print_message(_URL_PASSWORD.sub(r"\1***@", message), file)


Command = Callable[[argparse.Namespace, Console], int]


def build_parser() -> argparse.ArgumentParser:  # noqa: PLR0915 - one flat declaration
    """The argument parser of every command."""
    parser = _Parser(
        prog="chatstate",
        description="Find, export, fix and check the state chatstate keeps for a bot's users.",
        epilog="Exit status: 0 ok, 1 an operation failed, 2 a usage error.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = _Parser(add_help=False)
    group = server.add_argument_group("server")
    group.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("CHATSTATE_REDIS_URL"),
        help="redis://, rediss:// or unix:// URL (default: $CHATSTATE_REDIS_URL)",
    )
    group.add_argument(
        "--namespace",
        metavar="NS",
        default=os.environ.get("CHATSTATE_NAMESPACE", "chatstate"),
        help="the bot's key namespace (default: $CHATSTATE_NAMESPACE or 'chatstate')",
    )
    group.add_argument("--cluster", action="store_true", help="the URL is a Redis Cluster node")
    group.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on standard error (default: when it is a terminal)",
    )

    def add(name: str, run: Command, help_text: str, *, redis_options: bool = True) -> Any:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, parents=[server] if redis_options else []
        )
        sub.set_defaults(run=run)
        return sub

    rules_help = "your StateData as package.module:RULES: its preserved fields are redacted too"
    sub = add("state", cmd_state, "print a user's state, every secret as a fingerprint")
    sub.add_argument("user_id", metavar="USER")
    sub.add_argument("--rules", metavar="MODULE:ATTR", help=rules_help)

    sub = add("export", cmd_export, "print a user's document as JSON, to import elsewhere")
    sub.add_argument("user_id", metavar="USER")
    sub.add_argument(
        "--include-secrets",
        action="store_true",
        help="keep tokens, passwords and preserved fields (needed to import the export)",
    )
    sub.add_argument("--rules", metavar="MODULE:ATTR", help=rules_help)

    sub = add("import", cmd_import, "write an export back (never over a newer document)")
    sub.add_argument("file", metavar="FILE", help="an export; - reads standard input")
    sub.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        help="your StateData as package.module:RULES: with encryption, secret fields are "
        "stored encrypted whether the export holds plaintext or ciphertext",
    )
    sub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the stored document even when it is as new or newer than the export",
    )

    sub = add("delete", cmd_delete, "delete a user's document")
    sub.add_argument("user_id", metavar="USER")
    sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    sub.add_argument(
        "--force",
        action="store_true",
        help="remove the key even when it holds no chatstate document (corrupt data)",
    )

    sub = add(
        "erase", cmd_erase, "remove everything kept for a user: document, op ids, claim, locks"
    )
    sub.add_argument("user_id", metavar="USER")
    sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    sub = add(
        "reencrypt",
        cmd_reencrypt,
        "encrypt every secret field with the newest key (resumable: current ones are skipped)",
    )
    sub.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        required=True,
        help="your StateData as package.module:RULES, with its encryption and secret fields",
    )
    sub.add_argument("--dry-run", action="store_true", help="count, change nothing")

    sub = add("users", cmd_users, "list the namespace's user ids, one a line (SCAN)")
    sub.add_argument("--json", action="store_true", help="each id as a JSON string")

    sub = add("migrate", cmd_migrate, "bring every document to your rules' schema_version (SCAN)")
    sub.add_argument(
        "--rules",
        metavar="MODULE:ATTR",
        required=True,
        help="your StateData (or a function returning it) with schema_version and migrations",
    )
    sub.add_argument(
        "--dry-run",
        action="store_true",
        help="run the migrations and count, but write nothing",
    )
    sub.add_argument(
        "--batch",
        type=int,
        default=_SCAN_COUNT,
        metavar="N",
        help=f"keys asked of each SCAN call (default {_SCAN_COUNT})",
    )

    sub = add("stats", cmd_stats, "count users, op ids and claims; sample memory per user")
    sub.add_argument(
        "--sample",
        type=int,
        default=200,
        metavar="N",
        help="users whose MEMORY USAGE is read (default 200)",
    )
    sub.add_argument("--json", action="store_true", help="one JSON object")

    sub = add("doctor", cmd_doctor, "check the server against what chatstate needs")
    sub.add_argument(
        "--acl-user",
        metavar="NAME",
        help="check this ACL user's rights (default: the user of the URL)",
    )
    sub.add_argument("--strict", action="store_true", help="exit 1 on warnings too")

    sub = add("bench", cmd_bench, "time updates and gets against the server")
    sub.add_argument("--count", type=int, default=2000, metavar="N", help="calls of each kind")
    sub.add_argument("--users", type=int, default=100, metavar="N", help="distinct users")
    sub.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="asyncio tasks at once (1: the sync service)",
    )

    sub = add(
        "mermaid", cmd_mermaid, "print a flow's graph as a Mermaid diagram", redis_options=False
    )
    sub.add_argument("flow", help="the flow class, as package.module:ClassName")
    return parser


def _operational_message(exc: BaseException) -> str:
    if isinstance(exc, rex.RedisError):
        if _refused(exc):
            return (
                f"the server refused a command to this user ({exc}); users, stats and doctor "
                "need more than the library's ACL"
            )
        try:
            with map_redis_errors("-"):
                raise exc
        except ChatstateError as mapped:
            return str(mapped)
        except rex.RedisError:
            return f"{type(exc).__name__}: {exc}"
    if isinstance(exc, rex.RedisClusterException):
        return f"cannot use the Cluster: {exc}"
    return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0911 - one per exit path
    """Run the command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    console = Console(
        url_secrets(getattr(args, "redis", None)), progress=getattr(args, "progress", None)
    )
    run: Command = args.run
    try:
        return run(args, console)
    except CommandLineError as exc:
        console.error(f"error: {exc}", prefix=f"{parser.prog} {args.command}: ")
        return 2
    except (CommandError, ChatstateError) as exc:
        console.error(str(exc))
        return 1
    except BrokenPipeError:
        # The reader went away (``chatstate users | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (rex.RedisError, rex.RedisClusterException, OSError) as exc:
        # RedisClusterException (no reachable node) is no RedisError, and the
        # backends' from_url(cluster=True) lets it through untranslated.
        console.error(_operational_message(exc))
        return 1
    except KeyboardInterrupt:
        console.error("interrupted")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
