"""The command line on PostgreSQL: users, state, export and import, delete, erase, migrate.

Against a throwaway server the module starts itself (servers.start_postgres).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import servers
from chatstate import StateService
from chatstate.cli import main
from chatstate.state.postgres import PostgresBackend

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


@pytest.fixture(autouse=True)
def _no_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CHATSTATE_REDIS_URL", "CHATSTATE_SQLITE_PATH", "CHATSTATE_NAMESPACE",
        "CHATSTATE_KEY_SECRET", "CHATSTATE_POSTGRES_DSN", "CHATSTATE_POSTGRES_SCHEMA",
        "CHATSTATE_POSTGRES_TABLE_PREFIX",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process: its exit status, standard output and error."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bot(postgres: servers.Postgres) -> list[str]:
    """A bot's tables (a fresh prefix) holding three users; the options that reach them."""
    prefix = f"cli{next(_prefixes)}"
    with StateService(PostgresBackend(postgres.dsn, table_prefix=prefix)) as svc:
        for user_id in ("bob", "ana", "line\nbreak"):
            svc.update(user_id, {"step": "menu"})
        svc.update("ana", {"cart": {"apples": 2, "big": 2**63}})
    return ["--postgres", postgres.dsn, "--table-prefix", prefix]


def test_users_lists_every_user_in_id_order(
    capsys: pytest.CaptureFixture[str], bot: list[str]
) -> None:
    """`users` on PostgreSQL: every id once, in byte order, unprintable ones as JSON."""
    code, out, _ = cli(capsys, "users", *bot)
    assert code == 0
    assert out.splitlines() == ["ana", "bob", '"line\\nbreak"']


def test_state_export_import_delete_erase_round_trip(
    capsys: pytest.CaptureFixture[str], bot: list[str], postgres: servers.Postgres, tmp_path: Path
) -> None:
    """An export imports into other tables (another schema) as it was; delete and erase remove."""
    code, out, _ = cli(capsys, "state", "ana", *bot)
    assert code == 0
    assert "apples" in out
    code, out, _ = cli(capsys, "export", "ana", *bot)
    assert code == 0
    (tmp_path / "ana.json").write_text(out, encoding="utf-8")
    other = ["--postgres", postgres.dsn, "--schema", "copies", "--table-prefix", "imported"]
    code, _, err = cli(capsys, "import", str(tmp_path / "ana.json"), *other)
    assert code == 0, err
    with StateService(
        PostgresBackend(postgres.dsn, schema="copies", table_prefix="imported")
    ) as svc:
        assert svc.get("ana") == {"step": "menu", "cart": {"apples": 2, "big": 2**63}}
    assert json.loads(out)["document"]["cart"]["big"] == 2**63
    assert cli(capsys, "delete", "bob", "--yes", *bot)[0] == 0
    code, out, _ = cli(capsys, "erase", "ana", "--yes", *bot)
    assert code == 0
    code, out, _ = cli(capsys, "users", *bot)
    assert out.splitlines() == ['"line\\nbreak"']


def test_the_environment_names_the_database_and_no_password_is_shown(
    capsys: pytest.CaptureFixture[str],
    bot: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CHATSTATE_POSTGRES_DSN and _TABLE_PREFIX stand for the options; a password never shows."""
    monkeypatch.setenv("CHATSTATE_POSTGRES_DSN", bot[1])
    monkeypatch.setenv("CHATSTATE_POSTGRES_TABLE_PREFIX", bot[3])
    assert cli(capsys, "users")[1].splitlines()[0] == "ana"
    secret = "Pg-Pa55word-x"
    dsn = f"postgresql://bot:{secret}@127.0.0.1:1/db?connect_timeout=1"
    code, out, err = cli(capsys, "users", "--postgres", dsn)
    assert code == 1
    assert secret not in out + err
    code, out, err = cli(capsys, "users", "--postgres", f"host=127.0.0.1 port=1 password={secret}")
    assert code == 1
    assert secret not in out + err


def test_backend_choice_is_checked(capsys: pytest.CaptureFixture[str], bot: list[str]) -> None:
    """Two backends, Redis options on PostgreSQL, a Redis-only command: usage errors."""
    code, _, err = cli(capsys, "users", *bot, "--sqlite", "x.db")
    assert code == 2
    assert "not both" in err
    code, _, err = cli(capsys, "users", *bot, "--namespace", "x")
    assert code == 2
    assert "Redis options" in err
    code, _, err = cli(capsys, "stats", *bot)
    assert code == 2
    assert "Redis only" in err
    code, _, err = cli(capsys, "users", "--sqlite", "x.db", "--table-prefix", "x")
    assert code == 2
    assert "PostgreSQL options" in err
