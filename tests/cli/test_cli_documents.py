"""The per-user commands and users on Redis: state, export and import, delete, erase, users."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import redis

from chatstate import RedisBackend, StateData, StateService
from chatstate.auth import fingerprint
from chatstate.cli import main
from conftest import register_secret


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


def service(url: str, namespace: str, rules: StateData | None = None) -> StateService:
    return StateService(RedisBackend.from_url(url, namespace=namespace), rules)


# -- state -------------------------------------------------------------------------


@pytest.mark.redis
def test_state_command_redacts_the_token(redis_url: str, namespace: str) -> None:
    """`chatstate state` shows the state; the token appears only as its fingerprint."""
    token = register_secret(jwt.encode({"exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256"))
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace), StateData(preserved=["jwt_token"])
    )
    svc.update("+346", {"step": "menu"})
    svc.set_preserved("+346", "jwt_token", token)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatstate",
            "state",
            "+346",
            "--redis",
            redis_url,
            "--namespace",
            namespace,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert token not in out.stdout
    shown = json.loads(out.stdout)
    assert shown["version"] == 2
    assert shown["state"] == {"step": "menu", "jwt_token": f"<secret {fingerprint(token)}>"}
    svc.close()


@pytest.mark.redis
def test_state_command_redacts_every_secret(redis_url: str, namespace: str, tmp_path) -> None:
    """Nested tokens, refresh tokens, passwords and all preserved fields show as fingerprints."""
    token = register_secret(jwt.encode({"exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256"))
    refresh = register_secret("r3fr3sh-opaque-value-1f0")
    password = register_secret("hunter2-but-longer")
    pin_hash = register_secret("pbkdf2$opaque$hash")
    rules = StateData(preserved=["auth", "vault.pin_hash"])
    (tmp_path / "myrules.py").write_text(
        "from chatstate import StateData\nRULES = StateData(preserved=['auth', 'vault.pin_hash'])\n"
    )
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), rules)
    svc.set_preserved("u", "auth", {"jwt": token, "refresh_token": refresh, "user": "ana"})
    svc.set_preserved("u", "vault.pin_hash", pin_hash)
    svc.update("u", {"signup": {"password": password}, "notes": [token], "step": "menu"})
    out = subprocess.run(
        [sys.executable, "-m", "chatstate", "state", "u", "--redis", redis_url,
         "--namespace", namespace, "--rules", "myrules:RULES"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    for secret in (token, refresh, password, pin_hash):
        assert secret not in out.stdout
    state = json.loads(out.stdout)["state"]
    assert state["auth"]["jwt"] == f"<secret {fingerprint(token)}>"
    assert state["auth"]["user"] == "<secret>"  # the whole preserved field (short: no hash)
    assert state["signup"]["password"] == "<secret>"  # 18 characters: no hash to brute-force
    assert state["notes"] == [f"<secret {fingerprint(token)}>"]
    assert state["step"] == "menu"
    svc.close()


# -- export, import, delete, erase --------------------------------------------------


@pytest.mark.redis
def test_export_redacts_secrets_unless_asked(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """Export shows user id, version and document; tokens only as fingerprints by default."""
    token = register_secret(jwt.encode({"exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256"))
    with service(redis_url, namespace, StateData(preserved=["jwt_token"])) as svc:
        svc.update("ana", {"step": "menu"})
        svc.set_preserved("ana", "jwt_token", token)
    code, out, _ = cli(capsys, "export", "ana", "--redis", redis_url, "--namespace", namespace)
    assert code == 0
    assert token not in out
    assert json.loads(out) == {
        "chatstate_export": 1,
        "user_id": "ana",
        "version": 2,
        "secrets": "redacted",
        "document": {"step": "menu", "jwt_token": f"<secret {fingerprint(token)}>"},
    }
    code, out, _ = cli(
        capsys, "export", "ana", "--include-secrets", "--redis", redis_url, "--namespace", namespace
    )
    assert json.loads(out)["document"]["jwt_token"] == token


@pytest.mark.redis
def test_an_export_with_secrets_imports_into_another_namespace(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """Export --include-secrets, then import: the other namespace holds the same document."""
    document = {"step": "menu", "cart": {"apples": 2}, "tags": [], "big": 123456789012345}
    with service(redis_url, namespace) as svc:
        svc.update("ana", document)
    code, out, _ = cli(
        capsys, "export", "ana", "--include-secrets", "--redis", redis_url, "--namespace", namespace
    )
    (tmp_path / "ana.json").write_text(out)
    target = namespace + "b"
    code, out, _ = cli(
        capsys, "import", str(tmp_path / "ana.json"), "--redis", redis_url, "--namespace", target
    )
    assert (code, out) == (0, "imported 'ana': now version 1\n")
    with service(redis_url, target) as svc:
        assert svc.get("ana") == document
    code, out, _ = cli(
        capsys, "import", str(tmp_path / "ana.json"), "--redis", redis_url, "--namespace", target
    )
    assert (code, out) == (0, "'ana' already holds this document (version 1)\n")


@pytest.mark.redis
def test_import_refuses_redacted_secrets(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """An export made without --include-secrets cannot be imported: placeholders would be stored."""
    with service(redis_url, namespace) as svc:
        svc.update("ana", {"auth": {"password": "pw-pw-pw-pw"}})
    _, out, _ = cli(capsys, "export", "ana", "--redis", redis_url, "--namespace", namespace)
    (tmp_path / "ana.json").write_text(out)
    code, out, err = cli(
        capsys, "import", str(tmp_path / "ana.json"), "--redis", redis_url,
        "--namespace", namespace + "b",
    )  # fmt: skip
    assert code == 1
    assert "redacted secret (at auth.password)" in err
    assert err.count("\n") == 1
    with service(redis_url, namespace + "b") as svc:
        assert svc.snapshot("ana").version == 0


@pytest.mark.redis
def test_import_never_overwrites_a_newer_document_unless_asked(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """A document written after the export is kept; --overwrite restores the export."""
    with service(redis_url, namespace) as svc:
        svc.update("ana", {"step": "good"})
        _, out, _ = cli(
            capsys, "export", "ana", "--include-secrets", "--redis", redis_url,
            "--namespace", namespace,
        )  # fmt: skip
        (tmp_path / "ana.json").write_text(out)
        svc.update("ana", {"step": "broken", "extra": 1})
        code, _, err = cli(
            capsys, "import", str(tmp_path / "ana.json"), "--redis", redis_url,
            "--namespace", namespace,
        )  # fmt: skip
        assert code == 1
        assert "refused: 'ana' is stored at version 2, not older than the export's 1" in err
        assert svc.get("ana") == {"step": "broken", "extra": 1}
        code, out, _ = cli(
            capsys, "import", str(tmp_path / "ana.json"), "--overwrite", "--redis", redis_url,
            "--namespace", namespace,
        )  # fmt: skip
        assert (code, out) == (0, "imported 'ana': now version 3\n")
        assert svc.get("ana") == {"step": "good"}


@pytest.mark.redis
def test_import_reads_standard_input_and_rejects_what_is_no_export(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FILE - reads stdin; files that are not JSON exports fail with status 1 and one line."""
    export = {"chatstate_export": 1, "user_id": "ana", "version": 4, "document": {"a": 1}}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(export)))
    code, _, _ = cli(capsys, "import", "-", "--redis", redis_url, "--namespace", namespace)
    assert code == 0
    cases = {"bad.json": "{not json", "shape.json": json.dumps({"user_id": "x"})}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        code, _, err = cli(
            capsys, "import", str(tmp_path / name), "--redis", redis_url, "--namespace", namespace
        )
        assert code == 1
        assert err.count("\n") == 1
    code, _, err = cli(
        capsys, "import", str(tmp_path / "missing.json"), "--redis", redis_url,
        "--namespace", namespace,
    )  # fmt: skip
    assert code == 1
    assert "cannot read" in err


@pytest.mark.redis
def test_delete_asks_first_and_force_removes_corrupt_data(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """Delete wants --yes off a terminal; --force also removes a key that is no document."""
    with service(redis_url, namespace) as svc:
        svc.update("ana", {"a": 1})
        base = ["--redis", redis_url, "--namespace", namespace]
        code, _, err = cli(capsys, "delete", "ana", *base)
        assert code == 2
        assert "--yes" in err
        assert svc.get("ana") == {"a": 1}
        assert cli(capsys, "delete", "ana", "--yes", *base)[:2] == (
            0,
            "deleted 'ana' (it was at version 1)\n",
        )
        assert svc.snapshot("ana").version == 0
        assert cli(capsys, "delete", "ana", "--yes", *base)[:2] == (
            0,
            "no state is stored for 'ana'\n",
        )
        with redis.Redis.from_url(redis_url) as raw:
            raw.set(svc.manager.backend.keys("bob")[0], "not a hash")
            code, _, err = cli(capsys, "delete", "bob", "--yes", *base)
            assert code == 1
            assert "bob" in err
            assert cli(capsys, "delete", "bob", "--yes", "--force", *base)[0] == 0
            assert not raw.exists(svc.manager.backend.keys("bob")[0])


@pytest.mark.redis
def test_erase_removes_the_op_ids_too(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """The erase command wants --yes off a terminal, then removes the document and op ids."""
    with service(redis_url, namespace) as svc:
        svc.update_once("ana", {"a": 1}, op_id="m1")
        base = ["--redis", redis_url, "--namespace", namespace]
        code, _, err = cli(capsys, "erase", "ana", *base)
        assert code == 2
        assert "--yes" in err
        assert svc.get("ana") == {"a": 1}
        assert cli(capsys, "erase", "ana", "--yes", *base)[:2] == (
            0,
            "erased 'ana': document, operations\n",
        )
        assert svc.update_once("ana", {"a": 1}, op_id="m1").status == "applied"
        svc.erase("ana")
        assert cli(capsys, "erase", "ana", "--yes", *base)[:2] == (
            0,
            "nothing is stored for 'ana'\n",
        )


# -- users -------------------------------------------------------------------------


@pytest.mark.redis
def test_users_streams_every_user_of_the_namespace_only(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """Users lists each document's id once, decoded; other namespaces and side keys are skipped."""
    ids = {f"user{i}" for i in range(30)} | {"ünï {x}", "a:ops", "x}y", "+34 600"}
    glob_namespace = namespace + "*"
    with service(redis_url, glob_namespace) as svc, service(redis_url, namespace + "x") as other:
        for user_id in ids:
            svc.update(user_id, {"a": 1}, op_id="m")
        other.update("intruder", {"a": 1})
        svc.claim("user1", "m2")  # a claim key
        with svc.manager.backend.lock("user2", "jwt", lease=30, wait=1):
            code, out, err = cli(
                capsys, "users", "--redis", redis_url, "--namespace", glob_namespace
            )
        svc.update("gone", {"a": 1})
        svc.delete("gone")  # its op log stays, its document is gone
        assert code == 0
        assert err == ""
        assert sorted(out.splitlines()) == sorted(ids)
        code, out, _ = cli(
            capsys, "users", "--json", "--redis", redis_url, "--namespace", glob_namespace
        )
        assert sorted(json.loads(line) for line in out.splitlines()) == sorted(ids)


@pytest.mark.redis
def test_a_key_secret_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    namespace: str,
) -> None:
    """With CHATSTATE_KEY_SECRET the per-user commands find the user; users lists pseudonyms."""
    secret = register_secret("cli-key-secret-4f1b9c0d")
    backend = RedisBackend.from_url(redis_url, namespace=namespace, key_secret=secret)
    with StateService(backend) as svc:
        svc.update("34600123456", {"a": 1})
    base = ["--redis", redis_url, "--namespace", namespace]
    code, out, _ = cli(capsys, "users", *base)
    assert code == 0
    assert re.fullmatch(r"#[a-z2-7]{32}\n", out), out
    monkeypatch.setenv("CHATSTATE_KEY_SECRET", secret)
    code, out, err = cli(capsys, "state", "34600123456", *base)
    assert code == 0, err
    assert json.loads(out)["state"] == {"a": 1}
    assert secret not in out + err
    assert cli(capsys, "erase", "34600123456", "--yes", *base)[1] == (
        "erased '34600123456': document, operations\n"
    )


@pytest.mark.redis
def test_users_shows_unprintable_ids_as_json_and_progress_on_stderr(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """An id with a line break cannot break the one-id-a-line output; --progress reports counts."""
    with service(redis_url, namespace) as svc:
        svc.update("line\nbreak", {"a": 1})
        svc.update("plain", {"a": 1})
    code, out, err = cli(
        capsys, "users", "--progress", "--redis", redis_url, "--namespace", namespace
    )
    assert code == 0
    assert sorted(out.splitlines()) == ['"line\\nbreak"', "plain"]
    assert "scanned" in err
    assert err.rstrip().endswith("2 users")
