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
    assert shown["state"] == {"step": "menu", "jwt_token": f"<token {fingerprint(token)}>"}
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
