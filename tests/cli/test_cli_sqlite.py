"""The command line on a SQLite file: users, state, export and import, delete, erase, migrate."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from chatstate import FieldEncryption, SqliteBackend, StateData, StateService
from chatstate.auth import fingerprint
from chatstate.cli import main
from conftest import register_secret

_modules = itertools.count()


@pytest.fixture(autouse=True)
def _no_backend_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CHATSTATE_REDIS_URL", "CHATSTATE_SQLITE_PATH", "CHATSTATE_NAMESPACE",
        "CHATSTATE_KEY_SECRET",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process: its exit status, standard output and error."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def service(path: Path, rules: StateData | None = None) -> StateService:
    return StateService(SqliteBackend(path), rules)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A bot's SQLite file holding three users."""
    path = tmp_path / "bot.db"
    with service(path) as svc:
        for user_id in ("bob", "ana", "line\nbreak"):
            svc.update(user_id, {"step": "menu"})
    return path


def test_users_lists_every_user_in_id_order(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    """`users` reads StateService.users(): every id once, unprintable ones as JSON."""
    code, out, err = cli(capsys, "users", "--sqlite", str(db), "--progress")
    assert code == 0
    assert out.splitlines() == ["ana", "bob", '"line\\nbreak"']
    assert "listed 3 users" in err
    assert err.rstrip().endswith("3 users")
    code, out, _ = cli(capsys, "users", "--json", "--sqlite", str(db))
    assert [json.loads(line) for line in out.splitlines()] == ["ana", "bob", "line\nbreak"]


def test_state_and_export_redact_secrets_unless_asked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`state` and `export` show a token only as its fingerprint; --include-secrets keeps it."""
    token = register_secret(jwt.encode({"exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256"))
    path = tmp_path / "bot.db"
    with service(path, StateData(preserved=["jwt_token"])) as svc:
        svc.update("ana", {"step": "menu"})
        svc.set_preserved("ana", "jwt_token", token)
    code, out, _ = cli(capsys, "state", "ana", "--sqlite", str(path))
    assert code == 0
    assert json.loads(out) == {
        "user_id": "ana",
        "version": 2,
        "state": {"step": "menu", "jwt_token": f"<secret {fingerprint(token)}>"},
    }
    code, out, _ = cli(capsys, "export", "ana", "--sqlite", str(path))
    assert code == 0
    assert token not in out
    assert json.loads(out) == {
        "chatstate_export": 1,
        "user_id": "ana",
        "version": 2,
        "secrets": "redacted",
        "document": {"step": "menu", "jwt_token": f"<secret {fingerprint(token)}>"},
    }
    code, out, _ = cli(capsys, "export", "ana", "--include-secrets", "--sqlite", str(path))
    assert json.loads(out)["document"]["jwt_token"] == token
    code, _, err = cli(capsys, "export", "nobody", "--sqlite", str(path))
    assert code == 1
    assert f"no state is stored for user 'nobody' in SQLite file {str(path)!r}" in err


def test_an_export_imports_into_another_file_and_never_over_a_newer_one(
    capsys: pytest.CaptureFixture[str], db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Export, then import into a new file (created); a newer document needs --overwrite."""
    document = {"step": "pay", "cart": {"apples": 2}, "big": 123456789012345}
    with service(db) as svc:
        svc.update("ana", document)
    code, out, _ = cli(capsys, "export", "ana", "--include-secrets", "--sqlite", str(db))
    export = tmp_path / "ana.json"
    export.write_text(out)
    other = tmp_path / "other.db"
    code, out, _ = cli(capsys, "import", str(export), "--sqlite", str(other))
    assert (code, out) == (0, "imported 'ana': now version 1\n")
    with service(other) as svc:
        assert svc.get("ana") == {"step": "menu", **document}
        code, out, _ = cli(capsys, "import", str(export), "--sqlite", str(other))
        assert (code, out) == (0, "'ana' already holds this document (version 1)\n")
        svc.update("ana", {"step": "later"})
        svc.update("ana", {"step": "later still"})
    code, _, err = cli(capsys, "import", str(export), "--sqlite", str(other))
    assert code == 1
    assert "refused: 'ana' is stored at version 3, not older than the export's 2" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(export.read_text()))
    code, out, _ = cli(capsys, "import", "-", "--overwrite", "--sqlite", str(other))
    assert (code, out) == (0, "imported 'ana': now version 4\n")
    with service(other) as svc:
        assert svc.get("ana") == {"step": "menu", **document}


def test_import_keeps_the_schema_version(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An export names its schema; import stores the document at that schema in the file."""
    rules = StateData(schema_version=3, migrations={1: dict, 2: dict})
    with service(tmp_path / "a.db", rules) as svc:
        svc.update("ana", {"a": 1})
    code, out, _ = cli(capsys, "export", "ana", "--sqlite", str(tmp_path / "a.db"))
    assert json.loads(out)["schema"] == 3
    (tmp_path / "ana.json").write_text(out)
    code, out, _ = cli(
        capsys, "import", str(tmp_path / "ana.json"), "--sqlite", str(tmp_path / "b.db")
    )
    assert code == 0, out
    backend = SqliteBackend(tmp_path / "b.db")
    stored = backend.load("ana")
    assert stored is not None
    assert (stored.schema, stored.data) == (3, {"a": 1})
    backend.close()


def test_delete_and_erase(capsys: pytest.CaptureFixture[str], db: Path) -> None:
    """`delete` removes the document (op ids stay); erase removes the op ids too; both want --yes."""
    base = ["--sqlite", str(db)]
    with service(db) as svc:
        svc.update_once("ana", {"a": 1}, op_id="m1")
        code, _, err = cli(capsys, "delete", "ana", *base)
        assert code == 2
        assert "--yes" in err
        assert cli(capsys, "delete", "ana", "--yes", *base)[:2] == (
            0,
            "deleted 'ana' (it was at version 2)\n",
        )
        assert cli(capsys, "delete", "ana", "--yes", *base)[:2] == (
            0,
            "no state is stored for 'ana'\n",
        )
        assert svc.update_once("ana", {"a": 1}, op_id="m1").status == "duplicate"
        assert cli(capsys, "delete", "bob", "--yes", "--force", *base)[:2] == (
            0,
            "deleted 'bob' (forced)\n",
        )
        assert svc.snapshot("bob").version == 0
        svc.update_once("eve", {"a": 1}, op_id="m1")
        assert cli(capsys, "erase", "eve", *base)[0] == 2
        assert cli(capsys, "erase", "eve", "--yes", *base)[:2] == (
            0,
            "erased 'eve': document, operations\n",
        )
        assert svc.update_once("eve", {"a": 1}, op_id="m1").status == "applied"
        svc.erase("eve")
        assert cli(capsys, "erase", "eve", "--yes", *base)[:2] == (
            0,
            "nothing is stored for 'eve'\n",
        )


def test_a_missing_file_is_a_usage_error_and_is_not_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every command but import refuses a path that holds no file (a typo), creating nothing."""
    missing = tmp_path / "typo.db"
    for argv in (["users"], ["state", "u"], ["export", "u"], ["erase", "u", "--yes"]):
        code, _, err = cli(capsys, *argv, "--sqlite", str(missing))
        assert code == 2, argv
        assert f"no SQLite file at {str(missing)!r}" in err
        assert err.count("\n") == 1
    assert not missing.exists()
    code, _, err = cli(capsys, "users", "--sqlite", str(tmp_path))
    assert code == 2
    assert "is a directory" in err


def test_a_file_that_is_no_database_is_a_one_line_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A file that is not a chatstate database: exit status 1, one line."""
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, not even close" * 100)
    code, _, err = cli(capsys, "users", "--sqlite", str(junk))
    assert code == 1
    assert err.startswith("chatstate: ")
    assert err.count("\n") == 1


RULES_SOURCE = """
from chatstate import StateData

def to_2(doc):
    if doc.get("bad"):
        raise ValueError("cannot migrate")
    return {**doc, "v": 2}

RULES = StateData(schema_version=2, migrations={1: to_2})
"""


@pytest.fixture
def rules_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh module holding the rules above."""
    name = f"sqlite_rules{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(RULES_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_migrate_every_document_of_a_file(
    capsys: pytest.CaptureFixture[str], db: Path, rules_module: str
) -> None:
    """A dry run writes nothing, a run migrates each document once, a failure is named."""
    with service(db) as svc:
        svc.update("broken", {"bad": True})
    base = ["migrate", "--sqlite", str(db), "--rules", f"{rules_module}:RULES"]
    code, out, _ = cli(capsys, *base, "--dry-run")
    assert (code, out) == (
        1,
        "would migrate: 3, already current: 0, failed: 1 (schema version 2)\n",
    )
    code, out, err = cli(capsys, *base)
    assert code == 1
    assert "migrated: 3, already current: 0, failed: 1" in out
    assert "user 'broken'" in err
    code, out, _ = cli(capsys, *base)
    assert "migrated: 0, already current: 3, failed: 1" in out
    backend = SqliteBackend(db)
    stored = backend.load("ana")
    assert stored is not None
    assert (stored.schema, stored.data) == (2, {"step": "menu", "v": 2})
    backend.close()


def test_reencrypt_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reencrypt` brings plaintext secret fields of a SQLite file under the key."""
    key = FieldEncryption.generate_key()
    path = tmp_path / "bot.db"
    with service(path) as svc:
        for i in range(3):
            svc.update(f"u{i}", {"card": f"4111-{i}"})
    (tmp_path / "enc_sqlite_mod.py").write_text(
        "from chatstate import FieldEncryption, StateData\n"
        f"RULES = StateData(encryption=FieldEncryption({{'a': {key!r}}}), secret=['card'])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["reencrypt", "--sqlite", str(path), "--rules", "enc_sqlite_mod:RULES"]
    assert cli(capsys, *args, "--dry-run")[:2] == (
        0,
        "would re-encrypt: 3, already current: 0, failed: 0\n",
    )
    assert cli(capsys, *args)[:2] == (0, "re-encrypted: 3, already current: 0, failed: 0\n")
    assert cli(capsys, *args)[:2] == (0, "re-encrypted: 0, already current: 3, failed: 0\n")
    backend = SqliteBackend(path)
    stored = backend.load("u1")
    assert stored is not None
    assert str(stored.data["card"]).startswith("csenc:1:a:")
    backend.close()


def test_the_command_line_runs_on_sqlite_as_a_process(db: Path) -> None:
    """`python -m chatstate` with --sqlite, and with CHATSTATE_SQLITE_PATH instead."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("CHATSTATE_") and k != "REDIS_URL"
    }
    out = subprocess.run(
        [sys.executable, "-m", "chatstate", "users", "--sqlite", str(db)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    assert out.stdout.splitlines() == ["ana", "bob", '"line\\nbreak"']
    out = subprocess.run(
        [sys.executable, "-m", "chatstate", "state", "bob"],
        capture_output=True, text=True, check=True, env={**env, "CHATSTATE_SQLITE_PATH": str(db)},
    )  # fmt: skip
    assert json.loads(out.stdout) == {"user_id": "bob", "version": 1, "state": {"step": "menu"}}
