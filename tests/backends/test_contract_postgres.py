"""The backend contract suite on both PostgreSQL twins, against a throwaway server.

The suite starts its own PostgreSQL (``servers.start_postgres``: initdb and pg_ctl
from PATH, else the pgserver wheel) and fails, never skips, without one. Each test
works in tables of its own (a fresh table prefix), with a fake clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

import servers
from chatstate.state.postgres import AsyncPostgresBackend, PostgresBackend
from chatstate.testing import BackendContract
from fakes import FakeClock

pytestmark = pytest.mark.postgres

_prefixes = itertools.count()


@pytest.fixture(scope="module")
def postgres() -> Iterator[servers.Postgres]:
    """One throwaway PostgreSQL server for the module."""
    server = servers.start_postgres()
    try:
        yield server
    finally:
        server.cleanup()


class TestPostgresBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self, postgres: servers.Postgres) -> None:
        self.clock = FakeClock(1_700_000_000.0)
        self.dsn = postgres.dsn
        self.prefix = f"t{next(_prefixes)}"

    def make_backend(self) -> PostgresBackend:
        return PostgresBackend(self.dsn, table_prefix=self.prefix, clock=self.clock)

    def make_async_backend(self) -> AsyncPostgresBackend:
        return AsyncPostgresBackend(self.dsn, table_prefix=self.prefix, clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds


class TestPostgresBackendUncached(TestPostgresBackend):
    """The same contract with no row cache: every write takes the locked path."""

    def make_backend(self) -> PostgresBackend:
        return PostgresBackend(self.dsn, table_prefix=self.prefix, clock=self.clock, cache_size=0)

    def make_async_backend(self) -> AsyncPostgresBackend:
        return AsyncPostgresBackend(
            self.dsn, table_prefix=self.prefix, clock=self.clock, cache_size=0,
            prepared_statements=False,
        )  # fmt: skip
