"""The command line as a whole: --version, choosing the backend, exit statuses, no secret shown.

The commands themselves: test_cli_documents.py (state, export, import, delete,
erase, users on Redis), test_cli_sqlite.py (the same on a SQLite file),
test_cli_server.py (stats, doctor, bench), test_cli_migrate.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatstate import RedisBackend, SqliteBackend, StateData, StateService, __version__
from chatstate.cli import main
from chatstate.cli._commands import COMMANDS
from chatstate.cli._parser import build_parser
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


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATSTATE_")}


# -- --version and the shim -------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`chatstate --version` prints `chatstate <version>` and exits 0, in process and as one."""
    assert cli(capsys, "--version") == (0, f"chatstate {__version__}\n", "")
    out = subprocess.run(
        [sys.executable, "-m", "chatstate", "--version"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    )  # fmt: skip
    assert out.stdout == f"chatstate {__version__}\n"


def test_python_m_chatstate_is_a_shim_of_the_cli_package() -> None:
    """`chatstate.__main__` only runs chatstate.cli.main (the module other code imports too)."""
    import chatstate.__main__ as shim

    assert shim.main is main


# -- choosing the backend -----------------------------------------------------------------


def test_exactly_one_backend_is_chosen(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """None or both: status 2 and one line; an option wins over the other's variable."""
    path = tmp_path / "bot.db"
    with StateService(SqliteBackend(path)) as svc:
        svc.update("ana", {"a": 1})
    code, _, err = cli(capsys, "users")
    assert code == 2
    assert err == (
        "chatstate users: error: users needs a backend: --redis URL, --sqlite PATH or "
        "--postgres DSN (or CHATSTATE_REDIS_URL, CHATSTATE_SQLITE_PATH or "
        "CHATSTATE_POSTGRES_DSN)\n"
    )
    code, _, err = cli(capsys, "users", "--sqlite", str(path), "--redis", "redis://127.0.0.1:1")
    assert code == 2
    assert "--redis URL or --sqlite PATH, not both" in err
    assert err.count("\n") == 1
    password = register_secret("env-Pa55word-x")
    monkeypatch.setenv("CHATSTATE_REDIS_URL", f"redis://:{password}@127.0.0.1:1/0")
    assert cli(capsys, "users", "--sqlite", str(path)) == (0, "ana\n", "")
    monkeypatch.setenv("CHATSTATE_SQLITE_PATH", str(path))
    code, out, err = cli(capsys, "users")
    assert code == 2
    assert "CHATSTATE_REDIS_URL and CHATSTATE_SQLITE_PATH are both set" in err
    assert password not in out + err
    monkeypatch.delenv("CHATSTATE_REDIS_URL")
    assert cli(capsys, "users") == (0, "ana\n", "")
    for redis_option in (["--namespace", "bot"], ["--cluster"]):
        code, _, err = cli(capsys, "users", "--sqlite", str(path), *redis_option)
        assert code == 2
        assert "--namespace and --cluster are Redis options" in err


@pytest.mark.parametrize(
    "command", [["stats"], ["doctor"], ["bench", "--count", "5"]], ids=" ".join
)
def test_redis_only_commands_say_so_on_sqlite(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str]
) -> None:
    """stats, doctor and bench on a SQLite file: status 2, one line saying they need Redis."""
    path = tmp_path / "bot.db"
    code, out, err = cli(capsys, *command, "--sqlite", str(path))
    assert (code, out) == (2, "")
    assert err == (
        f"chatstate {command[0]}: error: {command[0]} works on Redis only: give --redis URL "
        "(or CHATSTATE_REDIS_URL), not a SQLite file\n"
    )
    assert not path.exists()
    code, _, err = cli(capsys, *command)
    assert code == 2
    assert f"{command[0]} needs --redis URL (or CHATSTATE_REDIS_URL)" in err


def test_every_command_and_option_is_documented() -> None:
    """docs/operations.md names every command of the table, with every one of its options."""
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    section = text.split("## The command line", 1)[1].split("\n## ", 1)[0]
    headings = [
        name
        for line in section.splitlines()
        if line.startswith("### ")
        for name in re.findall(r"`([a-z]+)\b", line)
    ]
    assert sorted(headings) == sorted(c.name for c in COMMANDS)
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    options = {"--version"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            options.update(o for o in action.option_strings if o.startswith("--"))
        assert name in headings
    options -= {"--help"}
    missing = sorted(o for o in options if not re.search(f"`[^`]*{o}\\b", section))
    assert not missing, missing
    for env in ("CHATSTATE_REDIS_URL", "CHATSTATE_SQLITE_PATH", "CHATSTATE_NAMESPACE",
                "CHATSTATE_KEY_SECRET"):  # fmt: skip
        assert env in section


# -- failures and usage errors ------------------------------------------------------------


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
