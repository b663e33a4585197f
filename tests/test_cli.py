"""The command line, against real servers: state, export and import, users, stats, doctor, bench."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import redis
import redis.cluster

import servers
from chatstate import RedisBackend, StateData, StateService
from chatstate.cli import main
from chatstate.cli._commands.doctor import acl_rule
from chatstate.auth import fingerprint
from conftest import register_secret

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(autouse=True)
def _no_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATSTATE_REDIS_URL", raising=False)
    monkeypatch.delenv("CHATSTATE_NAMESPACE", raising=False)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process: its exit status, standard output and error."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def service(url: str, namespace: str, rules: StateData | None = None) -> StateService:
    return StateService(RedisBackend.from_url(url, namespace=namespace), rules)


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


def test_state_command_reports_errors_without_secrets() -> None:
    """An unreachable server is a one-line error with exit status 1, password not shown."""
    secret = register_secret("PASSW0RD-sentinel-77")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatstate",
            "state",
            "u",
            "--redis",
            f"redis://:{secret}@127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1
    assert "Failed to read state" in out.stderr
    assert secret not in out.stderr + out.stdout


# -- export, import, delete ----------------------------------------------------------


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
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO(json.dumps(export)))
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


# -- users and stats -----------------------------------------------------------------


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


@pytest.mark.redis
@pytest.mark.cluster
def test_users_on_a_cluster_scans_every_primary(
    capsys: pytest.CaptureFixture[str], cluster_url: str, namespace: str
) -> None:
    """On a 3-primary Cluster every user is found, whichever node holds its slot."""
    ids = {f"user{i}" for i in range(40)}
    with StateService(RedisBackend.from_url(cluster_url, namespace=namespace, cluster=True)) as svc:
        for user_id in ids:
            svc.update(user_id, {"a": 1})
    code, out, _ = cli(
        capsys, "users", "--cluster", "--redis", cluster_url, "--namespace", namespace
    )
    assert code == 0
    assert set(out.splitlines()) == ids
    with redis.cluster.RedisCluster.from_url(cluster_url) as raw:
        holders = {raw.get_node_from_key(f"{namespace}:{{{u}}}").port for u in ids}
    assert len(holders) == 3
    code, out, _ = cli(
        capsys, "stats", "--json", "--cluster", "--redis", cluster_url, "--namespace", namespace
    )
    assert json.loads(out)["users"] == 40


@pytest.mark.redis
def test_stats_counts_users_op_ids_claims_and_memory(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """Stats --json: users, op logs, op ids remembered, claims held, bytes per user."""
    with service(redis_url, namespace) as svc:
        for user_id in ("a", "b", "c"):
            svc.update(user_id, {"n": 1}, op_id="m1")
            svc.update(user_id, {"n": 2}, op_id="m2")
        svc.claim("a", "m3")
        code, out, _ = cli(
            capsys, "stats", "--json", "--redis", redis_url, "--namespace", namespace
        )
    assert code == 0
    stats = json.loads(out)
    assert {k: stats[k] for k in ("users", "op_logs", "op_ids_remembered", "claims_held")} == {
        "users": 3,
        "op_logs": 3,
        "op_ids_remembered": 6,
        "claims_held": 1,
    }
    assert stats["sampled_users"] == 3
    assert stats["bytes_per_user"] > 0
    assert stats["op_log_bytes_per_user"] > 0
    code, out, _ = cli(capsys, "stats", "--redis", redis_url, "--namespace", namespace)
    assert "users              3" in out
    assert "memory per user" in out


# -- doctor --------------------------------------------------------------------------


def lines(out: str) -> dict[str, str]:
    """The doctor's findings: check name to its status."""
    found = {}
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) >= 2 and parts[0] in {"ok", "warn", "fail", "skip"}:
            found[parts[1]] = parts[0]
    return found


@pytest.mark.redis
def test_doctor_checks_a_healthy_server(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """Server kind, eviction, ACL, scripts and latency pass; no persistence is a warning."""
    code, out, _ = cli(capsys, "doctor", "--redis", redis_url, "--namespace", namespace)
    assert code == 0
    assert lines(out) == {
        "server": "ok",
        "persistence": "warn",  # the suite's servers run without appendonly
        "memory": "ok",
        "acl": "ok",
        "scripts": "ok",
        "latency": "ok",
        "cluster": "skip",
    }
    with redis.Redis.from_url(redis_url) as raw:
        info = raw.info("server")
    kind = "Valkey" if "valkey_version" in info else "Redis"
    assert f"server       {kind} " in out
    assert acl_rule(namespace) in out
    assert cli(capsys, "doctor", "--strict", "--redis", redis_url, "--namespace", namespace)[0] == 1


def test_the_doctors_acl_is_the_documented_one() -> None:
    """The ACL the doctor prints is the one docs/backends.md and docs/operations.md give."""
    for page in ("backends.md", "operations.md"):
        documented = re.findall(r"^ACL SETUSER mybot .*$", (DOCS / page).read_text(), re.MULTILINE)
        assert documented
        same_password = {re.sub(r" >\S+ ", " >PASSWORD ", line.strip()) for line in documented}
        assert same_password == {acl_rule("mybot")}


@pytest.mark.redis
def test_the_documented_operator_acl_runs_every_command(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """As the operator user docs/operations.md gives, users, stats and doctor all pass."""
    line = next(
        line
        for line in (DOCS / "operations.md").read_text().splitlines()
        if line.startswith("ACL SETUSER ops ")
    )
    name, password = f"ops{namespace}", register_secret(f"ops-Pw-{namespace}")
    rule = line.replace("ops", name, 1).replace("PASSWORD", password).replace("mybot", namespace)
    with redis.Redis.from_url(redis_url) as raw, service(redis_url, namespace) as svc:
        svc.update("ana", {"a": 1})
        raw.execute_command(*rule.split())
        port = raw.connection_pool.connection_kwargs["port"]
        url = f"redis://{name}:{password}@127.0.0.1:{port}/0"
        try:
            base = ["--redis", url, "--namespace", namespace]
            assert cli(capsys, "users", *base)[:2] == (0, "ana\n")
            assert cli(capsys, "stats", "--json", *base)[0] == 0
            code, out, _ = cli(capsys, "doctor", *base)
            assert code == 0
            assert lines(out) | {"persistence": "ok"} == {
                "server": "ok", "persistence": "ok", "memory": "ok", "acl": "ok",
                "scripts": "ok", "latency": "ok", "cluster": "skip",
            }  # fmt: skip
        finally:
            raw.execute_command("ACL", "DELUSER", name)


@pytest.fixture
def acl_user(redis_url: str, namespace: str) -> Iterator[tuple[str, str]]:
    """An ACL user with the documented rights minus +hincrby: (its name, a URL of it)."""
    name = f"bot{namespace}"
    password = register_secret(f"acl-Pw-{namespace}")
    commands = acl_rule(namespace).split("-@all ")[1].replace(" +hincrby", "").split()
    with redis.Redis.from_url(redis_url) as raw:
        raw.execute_command(
            "ACL", "SETUSER", name, "reset", "on", f">{password}", f"~{namespace}:*", "-@all",
            *commands,
        )  # fmt: skip
        port = raw.connection_pool.connection_kwargs["port"]
        try:
            yield name, f"redis://{name}:{password}@127.0.0.1:{port}/0"
        finally:
            raw.execute_command("ACL", "DELUSER", name)


@pytest.mark.redis
def test_doctor_names_the_command_an_acl_user_lacks(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, acl_user: tuple[str, str]
) -> None:
    """Run by an admin with --acl-user, the doctor fails and names the missing hincrby."""
    name, _ = acl_user
    code, out, _ = cli(
        capsys, "doctor", "--acl-user", name, "--redis", redis_url, "--namespace", namespace
    )
    assert code == 1
    acl = next(line for line in out.splitlines() if line.startswith("fail  acl"))
    assert f"user {name!r} may not run: hincrby" in acl
    assert "hmget" not in acl
    assert f"ACL SETUSER {name} on >PASSWORD" in out


@pytest.mark.redis
def test_doctor_as_a_restricted_user_says_what_it_cannot_check(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, acl_user: tuple[str, str]
) -> None:
    """As the bot's own user: refused checks are warnings, never a crash or the password."""
    _, url = acl_user
    code, out, err = cli(capsys, "doctor", "--redis", url, "--namespace", namespace)
    assert code == 0, err
    found = lines(out)
    assert found["acl"] == "warn"
    assert found["server"] == "warn"
    assert (found["scripts"], found["latency"]) == ("ok", "ok")
    assert "--acl-user" in out


@pytest.mark.redis
def test_doctor_warns_about_eviction_and_accepts_appendonly(
    capsys: pytest.CaptureFixture[str], server_kind: str, namespace: str
) -> None:
    """allkeys-lru is a warning naming noeviction; appendonly yes with everysec passes."""
    server = servers.start_server(
        server_kind, "--appendonly", "yes", "--appendfsync", "everysec",
        "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru",
    )  # fmt: skip
    try:
        code, out, _ = cli(capsys, "doctor", "--redis", server.url, "--namespace", namespace)
    finally:
        server.cleanup()
    assert code == 0
    assert lines(out)["persistence"] == "ok"
    assert lines(out)["memory"] == "warn"
    assert "maxmemory-policy allkeys-lru" in out
    assert "set noeviction" in out


@pytest.mark.redis
@pytest.mark.cluster
def test_doctor_checks_cluster_slot_coverage(
    capsys: pytest.CaptureFixture[str], cluster_url: str, namespace: str
) -> None:
    """With --cluster every primary is checked and the slots are covered; without it, a failure."""
    code, out, _ = cli(
        capsys, "doctor", "--cluster", "--redis", cluster_url, "--namespace", namespace
    )
    assert code == 0
    assert "16384/16384 slots covered by 3 primaries, cluster_state ok" in out
    assert sum(1 for line in out.splitlines() if line.startswith("ok    scripts")) == 3
    code, out, _ = cli(capsys, "doctor", "--redis", cluster_url, "--namespace", namespace)
    assert code == 1
    assert "pass --cluster" in out


# -- bench, errors, usage ------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.parametrize("concurrency", ["1", "8"])
def test_bench_reports_rates_and_leaves_nothing_behind(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, concurrency: str
) -> None:
    """Bench prints updates/s and gets/s and deletes every key it wrote."""
    code, out, _ = cli(
        capsys, "bench", "--count", "60", "--users", "7", "--concurrency", concurrency,
        "--redis", redis_url, "--namespace", namespace,
    )  # fmt: skip
    assert code == 0
    assert re.search(r"^updates +\d+/s +\(60 in ", out, re.MULTILINE)
    assert re.search(r"^gets +\d+/s +\(60 in ", out, re.MULTILINE)
    with redis.Redis.from_url(redis_url) as raw:
        assert list(raw.scan_iter(match=f"{namespace}:*")) == []


@pytest.mark.parametrize(
    "command",
    [
        ["state", "u"],
        ["export", "u"],
        ["delete", "u", "--yes"],
        ["users"],
        ["stats"],
        ["doctor"],
        ["bench", "--count", "5"],
        ["users", "--cluster"],
    ],
    ids=" ".join,
)
def test_failures_are_one_line_with_status_1_and_no_password(
    capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """An unreachable server: exit status 1, one line on stderr, the password nowhere."""
    password = register_secret("Sup3r-s3cret-pw")
    code, out, err = cli(capsys, *command, "--redis", f"redis://:{password}@127.0.0.1:1/0")
    assert code == 1
    assert err.startswith("chatstate: ")
    assert err.count("\n") == 1
    assert password not in out + err


def test_usage_errors_exit_2_without_the_password(capsys: pytest.CaptureFixture[str]) -> None:
    """No URL, an unknown command, a bad option or a stray URL argument: status 2, no password."""
    password = register_secret("An0ther-s3cret-pw")
    url = f"redis://:{password}@127.0.0.1:1/0"
    for argv in (
        ["users"],
        ["frobnicate"],
        ["stats", "--sample", "-1", "--redis", url],
        ["users", url],
        ["state", "--redis", url],
        ["export", "u", "--redis", "http://example.com"],
        ["users", "--namespace", "a{b}", "--redis", url],
    ):
        code, out, err = cli(capsys, *argv)
        assert code == 2, argv
        assert password not in out + err
        assert err.strip()


@pytest.mark.redis
def test_the_url_and_namespace_come_from_the_environment(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CHATSTATE_REDIS_URL and CHATSTATE_NAMESPACE stand in for the options, as a real process."""
    with service(redis_url, namespace) as svc:
        svc.update("env-user", {"a": 1})
    env = {**os.environ, "CHATSTATE_REDIS_URL": redis_url, "CHATSTATE_NAMESPACE": namespace}
    out = subprocess.run(
        [sys.executable, "-m", "chatstate", "users"],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    assert out.stdout == "env-user\n"
