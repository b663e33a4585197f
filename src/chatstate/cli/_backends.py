"""The backend a command works on: ``--redis URL``, ``--sqlite PATH`` or ``--postgres DSN``.

Exactly one backend: an option on the command line wins over the environment
(``CHATSTATE_REDIS_URL``, ``CHATSTATE_SQLITE_PATH``, ``CHATSTATE_POSTGRES_DSN``);
with no option, exactly one of the variables must be set. Choosing connects to nothing: a store
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
    "POSTGRES_DSN_ENV",
    "POSTGRES_PREFIX_ENV",
    "POSTGRES_SCHEMA_ENV",
    "REDIS_ONLY",
    "REDIS_URL_ENV",
    "SCAN_COUNT",
    "SQLITE_PATH_ENV",
    "BackendKind",
    "Listed",
    "PostgresStore",
    "RedisStore",
    "SqliteStore",
    "Store",
    "choose_store",
    "redis_store",
    "store",
]

REDIS_URL_ENV: Final = "CHATSTATE_REDIS_URL"
SQLITE_PATH_ENV: Final = "CHATSTATE_SQLITE_PATH"
POSTGRES_DSN_ENV: Final = "CHATSTATE_POSTGRES_DSN"
POSTGRES_SCHEMA_ENV: Final = "CHATSTATE_POSTGRES_SCHEMA"
POSTGRES_PREFIX_ENV: Final = "CHATSTATE_POSTGRES_TABLE_PREFIX"
NAMESPACE_ENV: Final = "CHATSTATE_NAMESPACE"
KEY_SECRET_ENV: Final = "CHATSTATE_KEY_SECRET"  # noqa: S105 - a variable's name
SCAN_COUNT: Final = 1000
"""Keys asked of each ``SCAN`` call."""

BackendKind = Literal["redis", "sqlite", "postgres"]
ANY_BACKEND: Final[tuple[BackendKind, ...]] = ("redis", "sqlite", "postgres")
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


_CHOICES: Final = "--redis URL, --sqlite PATH or --postgres DSN"
_OPTION: Final = {"redis": "--redis URL", "sqlite": "--sqlite PATH", "postgres": "--postgres DSN"}
_HOW_MANY: Final = {2: "both", 3: "all three"}


@attrs.define
class PostgresStore(Store):
    """A PostgreSQL database, as a bot's ``PostgresBackend`` opens it (tables never made here)."""

    kind: ClassVar[BackendKind] = "postgres"

    dsn: str = attrs.field(repr=False)
    schema: str = "public"
    table_prefix: str = "chatstate"

    @property
    def where(self) -> str:
        """See :attr:`Store.where`."""
        return f"PostgreSQL tables {self.schema}.{self.table_prefix}_*"

    @property
    def name(self) -> str:
        """See :attr:`Store.name`."""
        return repr(f"{self.schema}.{self.table_prefix}")

    def service(
        self,
        rules: StateData | None = None,
        *,
        create: bool = False,
    ) -> StateService:
        """See :meth:`Store.service`: ``import`` may make the tables, nothing else does."""
        return StateService(self._backend(create=create), rules)

    def listing_service(
        self,
        rules: StateData,
        *,
        by_tag: bool,  # noqa: ARG002 - the tables keep the ids themselves
    ) -> StateService:
        """See :meth:`Store.listing_service` (the tables keep the ids themselves)."""
        return self.service(rules)

    def listed(
        self,
        console: Console,
        *,
        batch: int = SCAN_COUNT,
    ) -> Iterator[Listed]:
        """See :meth:`Store.listed`: ``users()``, in byte order of the ids."""
        count = 0
        backend = self._backend(create=False)
        try:
            for user_id in backend.users(batch=batch):
                count += 1
                console.progress(f"listed {count} users")
                yield Listed(user_id, user_id, user_id)
        finally:
            backend.close()
            console.progress(f"listed {count} users from {self.where}", final=True)

    def _backend(self, *, create: bool) -> Any:
        try:
            from chatstate.state.postgres import PostgresBackend  # noqa: PLC0415 - psycopg on demand
        except ImportError as exc:
            raise CommandLineError(str(exc)) from exc
        try:
            return PostgresBackend(
                self.dsn, schema=self.schema, table_prefix=self.table_prefix, create=create
            )
        except ConfigurationError as exc:
            raise CommandLineError(str(exc)) from exc


def _named(args: argparse.Namespace, env: Any) -> tuple[BackendKind, str] | None:
    """The backend the options name, else the one the environment names; None: neither."""
    options: tuple[tuple[BackendKind, Any], ...] = (
        ("redis", args.redis),
        ("sqlite", args.sqlite),
        ("postgres", getattr(args, "postgres", None)),
    )
    given = [(kind, str(value)) for kind, value in options if value]
    if len(given) > 1:
        which = " or ".join(_OPTION[kind] for kind, _ in given)
        raise CommandLineError(f"give one backend: {which}, not {_HOW_MANY[len(given)]}")
    if given:
        return given[0]
    names: tuple[tuple[BackendKind, str], ...] = (
        ("redis", REDIS_URL_ENV),
        ("sqlite", SQLITE_PATH_ENV),
        ("postgres", POSTGRES_DSN_ENV),
    )
    variables = [(kind, name, str(env.get(name))) for kind, name in names if env.get(name)]
    if len(variables) > 1:
        both = " and ".join(name for _, name, _ in variables)
        how = "both" if len(variables) == 2 else "all"
        raise CommandLineError(f"{both} are {how} set: choose one with {_CHOICES}")
    if variables:
        kind, _, value = variables[0]
        return kind, value
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
            f"{command} needs a backend: {_CHOICES} "
            f"(or {REDIS_URL_ENV}, {SQLITE_PATH_ENV} or {POSTGRES_DSN_ENV})"
        )
    kind, target = named
    if kind not in backends:
        other = "a SQLite file" if kind == "sqlite" else "a PostgreSQL database"
        raise CommandLineError(
            f"{command} works on Redis only: give --redis URL (or {REDIS_URL_ENV}), not {other}"
        )
    if kind == "postgres":
        if args.namespace is not None or args.cluster:
            raise CommandLineError(
                "--namespace and --cluster are Redis options: use --schema and --table-prefix"
            )
        return PostgresStore(
            target,
            getattr(args, "schema", None) or env.get(POSTGRES_SCHEMA_ENV) or "public",
            getattr(args, "table_prefix", None) or env.get(POSTGRES_PREFIX_ENV) or "chatstate",
        )
    if getattr(args, "schema", None) or getattr(args, "table_prefix", None):
        raise CommandLineError("--schema and --table-prefix are PostgreSQL options")
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
