"""The command line: a user's state printed with the token as a fingerprint."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import jwt
import pytest

from chatstate import RedisBackend, StateData, StateService
from chatstate.auth import fingerprint
from conftest import register_secret

pytestmark = pytest.mark.redis


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
    assert state["auth"]["user"].startswith("<secret ")  # the whole preserved field
    assert state["signup"]["password"].startswith("<secret ")
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
