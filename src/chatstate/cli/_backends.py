"""The backend a command works on: ``--redis URL`` or ``--sqlite PATH``, chosen and opened.

Exactly one backend: an option on the command line wins over the environment
(``CHATSTATE_REDIS_URL``, ``CHATSTATE_SQLITE_PATH``); with neither option, exactly
one of the two variables must be set. Choosing connects to nothing: a store
opens the backend when a command asks it for a service, a listing or a client.

A :class:`Store` gives the commands that work on any backend what they need
through the public API only (``StateService``, its ``users()``); the Redis
store also gives the Redis-only commands a plain redis-py client and a scan of
the namespace's keys, read with the public :class:`~chatstate.state.redis.KeyScheme`.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import os
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, Literal

import attrs
import redis

from chatstate.cli._console import Console
from chatstate.cli._errors import CommandLineError
from chatstate.exceptions import ConfigurationError
from chatstate.state import SqliteBackend, StateData, StateService
from chatstate.state.redis import (
    DEFAULT_NAMESPACE,
    KeyKind,
    KeyScheme,
    ParsedKey,
    RedisBackend,
    default_client_options,
    map_redis_errors,
)

__all__ = [
    "ANY_BACKEND",
    "KEY_SECRET_ENV",
    "NAMESPACE_ENV",
    "REDIS_ONLY",
    "REDIS_URL_ENV",
    "SCAN_COUNT",
    "SQLITE_PATH_ENV",
    "BackendKind",
    "Listed",
    "RedisStore",
    "SqliteStore",
    "Store",
    "choose_store",
    "redis_store",
    "store",
]

REDIS_URL_ENV: Final = "CHATSTATE_REDIS_URL"
SQLITE_PATH_ENV: Final = "CHATSTATE_SQLITE_PATH"
NAMESPACE_ENV: Final = "CHATSTATE_NAMESPACE"
KEY_SECRET_ENV: Final = "CHATSTATE_KEY_SECRET"  # noqa: S105 - a variable's name
SCAN_COUNT: Final = 1000
"""Keys asked of each ``SCAN`` call."""

BackendKind = Literal["redis", "sqlite"]
ANY_BACKEND: Final[tuple[BackendKind, ...]] = ("redis", "sqlite")
REDIS_ONLY: Final[tuple[BackendKind, ...]] = ("redis",)


@attrs.frozen
class Listed:
    """A user a listing found.

    Attributes:
        name: What to show: the user id, or for a Redis key built with a key
            secret, its hash tag (``#`` and 32 characters).
        tag: How a by-tag service addresses the user (on SQLite, the user id).
        user_id: The user id; ``None`` for a pseudonymous Redis key.
    """

    name: str
    tag: str
    user_id: str | None


class Store(abc.ABC):
    """Where a bot keeps its users' state, as the command line opens it."""

    kind: ClassVar[BackendKind]
    addresses_by_tag: ClassVar[bool] = False
    """Whether :meth:`listing_service` can address users without their ids."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the users are, for messages: ``namespace 'mybot'``, ``SQLite file 'bot.db'``."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The namespace or the file, quoted (for questions)."""

    @abc.abstractmethod
    def service(self, rules: StateData | None = None, *, create: bool = False) -> StateService:
        """A service for users named on the command line.

        Args:
            rules: The rules the service applies.
            create: A SQLite file may be created (``import``); otherwise a
                missing file is a usage error.
        """

    @abc.abstractmethod
    def listing_service(self, rules: StateData, *, by_tag: bool) -> StateService:
        """A service that addresses the users :meth:`listed` yields (by tag if asked)."""

    @abc.abstractmethod
    def listed(self, console: Console, *, batch: int = SCAN_COUNT) -> Iterator[Listed]:
        """Every user with a stored document, lazily, progress on ``console``."""


@attrs.define
class RedisStore(Store):
    """A namespace on a Redis or Valkey server (or Cluster)."""

    kind: ClassVar[BackendKind] = "redis"
    addresses_by_tag: ClassVar[bool] = True

    url: str
    namespace: str
    cluster: bool = False
    key_secret: str | None = attrs.field(default=None, repr=False)
    keys: KeyScheme = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        try:
            self.keys = KeyScheme(self.namespace)
        except ConfigurationError as exc:
            raise CommandLineError(str(exc)) from None

    @property
    def where(self) -> str:
        """See :attr:`Store.where`."""
        return f"namespace {self.namespace!r}"

    @property
    def name(self) -> str:
        """See :attr:`Store.name`."""
        return repr(self.namespace)

    def service(
        self,
        rules: StateData | None = None,
        *,
        create: bool = False,  # noqa: ARG002 - a namespace needs no creating
    ) -> StateService:
        """See :meth:`Store.service`; the key secret of ``CHATSTATE_KEY_SECRET`` applies."""
        backend = self._backend(namespace=self.namespace, key_secret=self.key_secret)
        return StateService(backend, rules)

    def listing_service(self, rules: StateData, *, by_tag: bool) -> StateService:
        """See :meth:`Store.listing_service`: ids read from keys are never hashed again."""
        return StateService(self._backend(keys=KeyScheme(self.namespace, by_tag=by_tag)), rules)

    def _backend(self, **options: Any) -> RedisBackend:
        try:
            return RedisBackend.from_url(self.url, cluster=self.cluster, **options)
        except ConfigurationError as exc:
            raise CommandLineError(str(exc)) from exc
        except (ValueError, TypeError) as exc:
            raise CommandLineError(f"not a usable Redis URL: {exc}") from exc

    def listed(self, console: Console, *, batch: int = SCAN_COUNT) -> Iterator[Listed]:
        """See :meth:`Store.listed`: ``SCAN`` of the document keys on every primary.

        Unlike ``StateService.users()``, keys built with a key secret are listed
        too, by their hash tag.
        """
        with self.client() as client:
            for _node, _key, parsed in self.scan(client, console, kind="doc", count=batch):
                name = parsed.user_id if parsed.user_id is not None else parsed.tag
                yield Listed(name, parsed.tag, parsed.user_id)

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A plain redis-py client for the commands the library never runs (SCAN, INFO, ...)."""
        options = default_client_options(asynchronous=False)
        try:
            if self.cluster:
                from redis.cluster import RedisCluster  # noqa: PLC0415

                options.pop("health_check_interval", None)
                client: Any = RedisCluster.from_url(self.url, **options)
            else:
                client = redis.Redis.from_url(self.url, **options)
        except (ValueError, TypeError) as exc:
            raise CommandLineError(f"not a usable Redis URL: {exc}") from exc
        try:
            yield client
        finally:
            client.close()

    @staticmethod
    def nodes(client: Any) -> list[tuple[str, Any]]:
        """Each primary as (host:port, a client of that node alone): one for a standalone server."""
        if hasattr(client, "get_primaries"):
            return [
                (f"{n.host}:{n.port}", client.get_redis_connection(n))
                for n in client.get_primaries()
            ]
        kwargs = client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        return [(str(where), client)]

    def scan(
        self, client: Any, console: Console, *, kind: KeyKind | None, count: int = SCAN_COUNT
    ) -> Iterator[tuple[Any, str, ParsedKey]]:
        """The namespace's keys of ``kind`` (every kind: ``None``) on every primary.

        Yields (the node's client, the key, what it holds and whose); keys
        chatstate did not build are skipped.
        """
        pattern = self.keys.pattern(kind=kind)
        scanned = 0
        nodes = self.nodes(client)
        try:
            for where, node in nodes:
                with map_redis_errors("SCAN"):
                    for raw in node.scan_iter(match=pattern, count=count):
                        scanned += 1
                        console.progress(f"scanned {scanned} keys ({where})")
                        parsed = self.keys.parse(raw)
                        if parsed is not None and (kind is None or parsed.kind == kind):
                            key = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                            yield node, key, parsed
        finally:
            console.progress(f"scanned {scanned} keys on {len(nodes)} node(s)", final=True)


@attrs.define
class SqliteStore(Store):
    """A SQLite file, as a bot's :class:`~chatstate.state.SqliteBackend` opens it."""

    kind: ClassVar[BackendKind] = "sqlite"

    path: str

    @property
    def where(self) -> str:
        """See :attr:`Store.where`."""
        return f"SQLite file {self.path!r}"

    @property
    def name(self) -> str:
        """See :attr:`Store.name`."""
        return repr(self.path)

    def service(self, rules: StateData | None = None, *, create: bool = False) -> StateService:
        """See :meth:`Store.service`."""
        return StateService(self._backend(create=create), rules)

    def listing_service(
        self,
        rules: StateData,
        *,
        by_tag: bool,  # noqa: ARG002 - a SQLite file keeps the ids themselves
    ) -> StateService:
        """See :meth:`Store.listing_service` (a SQLite file keeps the ids themselves)."""
        return self.service(rules)

    def listed(
        self,
        console: Console,
        *,
        batch: int = SCAN_COUNT,  # noqa: ARG002 - users() reads its own pages
    ) -> Iterator[Listed]:
        """See :meth:`Store.listed`: ``StateService.users()``, in id order."""
        count = 0
        with StateService(self._backend(create=False)) as svc:
            try:
                for user_id in svc.users():
                    count += 1
                    console.progress(f"listed {count} users")
                    yield Listed(user_id, user_id, user_id)
            finally:
                console.progress(f"listed {count} users from {self.where}", final=True)

    def _backend(self, *, create: bool) -> SqliteBackend:
        path = Path(self.path)
        if not create and not path.exists():
            raise CommandLineError(f"no SQLite file at {self.path!r}")
        if path.is_dir():
            raise CommandLineError(f"{self.path!r} is a directory, not a SQLite file")
        try:
            return SqliteBackend(path)
        except ConfigurationError as exc:
            raise CommandLineError(str(exc)) from exc


def _named(args: argparse.Namespace, env: Any) -> tuple[BackendKind, str] | None:
    """The backend the options name, else the one the environment names; None: neither."""
    if args.redis and args.sqlite:
        raise CommandLineError("give one backend: --redis URL or --sqlite PATH, not both")
    if args.redis:
        return "redis", str(args.redis)
    if args.sqlite:
        return "sqlite", str(args.sqlite)
    url, path = env.get(REDIS_URL_ENV), env.get(SQLITE_PATH_ENV)
    if url and path:
        raise CommandLineError(
            f"{REDIS_URL_ENV} and {SQLITE_PATH_ENV} are both set: choose one with "
            "--redis URL or --sqlite PATH"
        )
    if url:
        return "redis", str(url)
    if path:
        return "sqlite", str(path)
    return None


def choose_store(
    args: argparse.Namespace, backends: Collection[BackendKind], environ: Any = None
) -> Store:
    """The one backend the command line (or else the environment) names.

    Args:
        args: The parsed command line (``redis``, ``sqlite``, ``namespace``,
            ``cluster``, ``command``).
        backends: The kinds the command works on.
        environ: The environment (``os.environ`` when omitted).

    Raises:
        CommandLineError: no backend, two, or one the command cannot work on.
    """
    env = os.environ if environ is None else environ
    command = args.command
    named = _named(args, env)
    if named is None:
        if "sqlite" not in backends:
            raise CommandLineError(f"{command} needs --redis URL (or {REDIS_URL_ENV})")
        raise CommandLineError(
            f"{command} needs a backend: --redis URL or --sqlite PATH "
            f"(or {REDIS_URL_ENV} or {SQLITE_PATH_ENV})"
        )
    kind, target = named
    if kind not in backends:
        raise CommandLineError(
            f"{command} works on Redis only: give --redis URL (or {REDIS_URL_ENV}), "
            "not a SQLite file"
        )
    if kind == "sqlite":
        if args.namespace is not None or args.cluster:
            raise CommandLineError(
                "--namespace and --cluster are Redis options: a SQLite file holds one bot's users"
            )
        return SqliteStore(target)
    namespace = args.namespace or env.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE
    return RedisStore(
        target, namespace, cluster=args.cluster, key_secret=env.get(KEY_SECRET_ENV) or None
    )


def store(args: argparse.Namespace) -> Store:
    """The store ``_core.main`` chose for this command."""
    found = args.store
    assert isinstance(found, Store)
    return found


def redis_store(args: argparse.Namespace) -> RedisStore:
    """The Redis store ``_core.main`` chose for a Redis-only command."""
    found = args.store
    assert isinstance(found, RedisStore)
    return found
