"""The PostgreSQL backends (psycopg 3), and what operators' tools need of them.

Everything chatstate knows of PostgreSQL lives in this package: the backends
(:class:`PostgresBackend`, :class:`AsyncPostgresBackend`, also exported by
:mod:`chatstate.state` on first use), the statements that make the tables
(:func:`install_sql`) and the mapping of psycopg's errors to chatstate's.
Importing it imports psycopg (``pip install 'chatstate[postgres]'``); nothing
else in chatstate does. ``docs/postgres.md`` describes the tables, the
guarantees, PgBouncer and the rights the database user needs.
"""

try:
    import psycopg  # noqa: F401 - fail here, with the hint, rather than deep inside
    import psycopg_pool  # noqa: F401
except ImportError as exc:  # pragma: no cover - the test extra installs both
    raise ImportError(
        "the PostgreSQL backend needs psycopg 3 and psycopg_pool: pip install 'chatstate[postgres]'"
    ) from exc

from chatstate.state.postgres._async.backend import AsyncPostgresBackend
from chatstate.state.postgres._core import (
    DEFAULT_PREFIX,
    DEFAULT_SCHEMA,
    SCHEMA_VERSION,
    install_sql,
    translate,
)
from chatstate.state.postgres._sync.backend import PostgresBackend

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "AsyncPostgresBackend",
    "PostgresBackend",
    "install_sql",
    "translate",
]
