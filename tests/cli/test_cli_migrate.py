"""``chatstate migrate``: every document to the rules' schema version, on Redis, Valkey, Cluster."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from chatstate import RedisBackend, StateData, StateService
from chatstate.cli import main

pytestmark = pytest.mark.redis

_modules = itertools.count()

RULES_SOURCE = """
from chatstate import StateData

def to_2(doc):
    if doc.get("bad"):
        raise ValueError("cannot migrate " + repr(doc))
    doc["name"] = {"first": doc.pop("name", "")}
    return doc

def to_3(doc):
    return {**doc, "lang": "en"}

RULES = StateData(preserved=["jwt_token"], schema_version=3, migrations={1: to_2, 2: to_3})

def make_rules():
    return RULES

PLAIN = StateData()
"""


@pytest.fixture
def rules_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of a fresh module holding the rules above."""
    name = f"migrules{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(RULES_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CHATSTATE_REDIS_URL", raising=False)
    monkeypatch.delenv("CHATSTATE_NAMESPACE", raising=False)
    return name


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _fill(url: str, namespace: str, *, cluster: bool = False, **options: object) -> StateService:
    svc = StateService(
        RedisBackend.from_url(url, namespace=namespace, cluster=cluster, **options),  # type: ignore[arg-type]
        StateData(preserved=["jwt_token"]),
    )
    for i in range(12):
        svc.update(f"user {i}", {"name": f"n{i}"})
    svc.set_preserved("user 0", "jwt_token", "tok")
    return svc


def _check_migrate(
    capsys: pytest.CaptureFixture[str], url: str, namespace: str, module: str, *extra: str
) -> None:
    svc = _fill(url, namespace, cluster="--cluster" in extra)
    base = ["migrate", "--redis", url, "--namespace", namespace, "--rules", f"{module}:RULES"]
    base += extra
    try:
        code, out, _ = run(capsys, *base, "--dry-run", "--batch", "5")
        assert code == 0
        assert "would migrate: 12, already current: 0, failed: 0" in out
        assert svc.snapshot("user 3").version == 1  # nothing written

        code, out, _ = run(capsys, *base, "--batch", "5")
        assert code == 0
        assert "migrated: 12, already current: 0, failed: 0 (schema version 3)" in out
        raw = svc.manager.backend
        snap = raw.load("user 3")
        assert (snap.version, snap.schema, snap.data) == (
            2,
            3,
            {"name": {"first": "n3"}, "lang": "en"},
        )
        assert raw.load("user 0").data["jwt_token"] == "tok"

        code, out, _ = run(capsys, *base)
        assert code == 0
        assert "migrated: 0, already current: 12, failed: 0" in out
        assert raw.load("user 3").version == 2  # a rerun writes nothing
    finally:
        svc.close()


def test_migrate_dry_run_then_migrate_then_rerun(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, rules_module: str
) -> None:
    """A dry run writes nothing; a run migrates each document once; a rerun finds them current."""
    _check_migrate(capsys, redis_url, namespace, rules_module)


@pytest.mark.cluster
def test_migrate_on_a_cluster(
    capsys: pytest.CaptureFixture[str], cluster_url: str, namespace: str, rules_module: str
) -> None:
    """The same on every primary of a Cluster."""
    _check_migrate(capsys, cluster_url, namespace, rules_module, "--cluster")


def test_migrate_reports_a_failing_document_and_leaves_it(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, rules_module: str
) -> None:
    """A migration that raises: the user is named, its document untouched, exit status 1."""
    svc = _fill(redis_url, namespace)
    svc.update("broken", {"bad": True, "secret": "s3cr3t-value"})
    base = ["migrate", "--redis", redis_url, "--namespace", namespace]
    try:
        for _ in range(2):  # the rerun resumes: the others are current, the broken one fails again
            code, out, err = run(capsys, *base, "--rules", f"{rules_module}:make_rules")
            assert code == 1
            assert "failed: 1" in out
            assert "'broken'" in err
            assert "migration 1 -> 2 raised ValueError" in err
            assert "s3cr3t-value" not in out + err
        assert "already current: 12" in out
        snap = svc.manager.backend.load("broken")
        assert (snap.version, snap.schema, snap.data) == (
            1,
            1,
            {"bad": True, "secret": "s3cr3t-value"},
        )
    finally:
        svc.close()


def test_migrate_finds_users_behind_pseudonymous_keys(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, rules_module: str
) -> None:
    """With key_secret the keys hold no user id; migrate needs neither the ids nor the secret."""
    secret = "k" * 32
    svc = _fill(redis_url, namespace, key_secret=secret)
    try:
        code, out, _ = run(
            capsys, "migrate", "--redis", redis_url, "--namespace", namespace,
            "--rules", f"{rules_module}:RULES",
        )  # fmt: skip
        assert code == 0
        assert "migrated: 12" in out
        snap = svc.manager.backend.load("user 5")
        assert (snap.schema, snap.data) == (3, {"name": {"first": "n5"}, "lang": "en"})
    finally:
        svc.close()


def test_migrate_shows_progress_on_standard_error(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str, rules_module: str
) -> None:
    """--progress reports the counts as it goes, on standard error only."""
    _fill(redis_url, namespace).close()
    code, out, err = run(
        capsys, "migrate", "--redis", redis_url, "--namespace", namespace,
        "--rules", f"{rules_module}:RULES", "--progress",
    )  # fmt: skip
    assert code == 0
    assert "scanned" in err
    assert "scanned" not in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (":PLAIN", "has no schema_version"),
        (":nothing", "is not a StateData"),
        (":to_2", "is not a StateData"),
    ],
)
def test_migrate_refuses_rules_without_a_schema(
    capsys: pytest.CaptureFixture[str], rules_module: str, spec: str, message: str
) -> None:
    """--rules must name a StateData (or a factory of one) with a schema_version: exit 2."""
    code, _, err = run(
        capsys, "migrate", "--redis", "redis://127.0.0.1:1", "--rules", rules_module + spec
    )
    assert code == 2
    assert message in err


def test_migrate_needs_rules_and_a_positive_batch(
    capsys: pytest.CaptureFixture[str], rules_module: str
) -> None:
    """--rules is required and --batch must be positive."""
    assert run(capsys, "migrate", "--redis", "redis://127.0.0.1:1")[0] == 2
    code, _, err = run(
        capsys, "migrate", "--redis", "redis://127.0.0.1:1", "--rules",
        f"{rules_module}:RULES", "--batch", "0",
    )  # fmt: skip
    assert code == 2
    assert "--batch" in err


def test_export_and_import_keep_the_schema_version(
    capsys: pytest.CaptureFixture[str],
    redis_url: str,
    namespace: str,
    rules_module: str,
    tmp_path: Path,
) -> None:
    """An export names its schema; import stores it there and never over a newer schema."""
    rules = StateData(schema_version=3, migrations={1: dict, 2: dict})
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), rules)
    svc.update("ana", {"a": 1})
    assert svc.export("ana")["schema"] == 3
    base = ["--redis", redis_url, "--namespace", namespace]
    code, out, _ = run(capsys, "export", "ana", "--include-secrets", *base)
    assert code == 0
    assert '"schema": 3' in out
    (tmp_path / "ana.json").write_text(out)
    other = namespace + "x"
    code, out, _ = run(
        capsys, "import", str(tmp_path / "ana.json"), "--redis", redis_url, "--namespace", other
    )
    assert code == 0, out
    target = RedisBackend.from_url(redis_url, namespace=other)
    assert (target.load("ana").schema, target.load("ana").data) == (3, {"a": 1})
    # A document stored at a newer schema is never replaced by an older export.
    newer = StateService(
        target, StateData(schema_version=5, migrations=dict.fromkeys(range(1, 5), dict))
    )
    newer.update("ana", {"b": 2})
    code, _, err = run(
        capsys, "import", str(tmp_path / "ana.json"), "--overwrite", "--redis", redis_url,
        "--namespace", other,
    )  # fmt: skip
    assert code == 1
    assert "schema version 5, newer than the export's 3" in err
    assert target.load("ana").data == {"a": 1, "b": 2}
    target.close()
    svc.close()
    # Without a schema, an export is as before: no "schema" key.
    plain = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    plain.update("bo", {"a": 1})
    assert "schema" not in plain.export("bo")
    plain.close()
