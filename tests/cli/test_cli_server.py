"""The Redis-only commands, against real servers: stats, doctor and bench (and a Cluster's users)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster

import servers
from chatstate import RedisBackend, StateData, StateService
from chatstate.cli import main
from chatstate.cli._commands.doctor import acl_rule
from conftest import register_secret

DOCS = Path(__file__).resolve().parents[2] / "docs"


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


# -- users and stats on a Cluster, stats --------------------------------------------


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


# -- doctor ------------------------------------------------------------------------


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


# -- bench -------------------------------------------------------------------------


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
