"""A PIN typed into a flow leaves no plaintext and no brute-forceable trace in the store.

A bot from the docs asks for a new PIN and its confirmation over two steps
(``Step(secret=True)``), across a key rotation, on a real Redis and Valkey with
an AOF, an RDB, MONITOR and SLOWLOG at threshold 0 running throughout. Then the
bytes are searched: for the PIN itself, and for any digest that an unkeyed hash
of one of the 10^6 six-digit candidates would give.
"""

from __future__ import annotations

import hashlib
import json
import time
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any

import pytest
import redis

import servers
from chatstate import FieldEncryption, RedisBackend, StateData, StateService
from chatstate.exceptions import ConfigurationError
from chatstate.flow import DONE, Flow, Invalid, Menu, MenuItem, Message, Router, Step
from conftest import register_secret

PIN = register_secret("483917")
KEY_A, KEY_B = FieldEncryption.generate_key(), FieldEncryption.generate_key()
SECRET = ["flow.data.new_pin", "pin"]


def _six_digits(answer: str) -> str:
    if not (answer.isdigit() and len(answer) == 6):
        raise Invalid("Six digits, please.")
    return answer


def _confirm(answer: str, ctx: Any) -> str:
    if answer != ctx.data["new_pin"]:  # the callables see the PIN in plaintext
        raise Invalid("That is not the same PIN.")
    return answer


class SetPin(Flow):
    """A new PIN, then the same again; the PIN is kept in a secret field."""

    new_pin = Step("Choose a 6-digit PIN.", clean=_six_digits, next="again", secret=True)
    again = Step("Type it again.", clean=_confirm, next=DONE, secret=True)

    def on_complete(self, data: dict[str, Any], ctx: Any) -> str:
        ctx.update({"pin": data["new_pin"]})
        return "Your PIN is set."


MENU = Menu("Menu", [MenuItem("pin", "Set PIN", flow=SetPin)])


def _rules(ring: FieldEncryption) -> StateData:
    return StateData(encryption=ring, secret=[*SECRET, "flow.data.again"], digest_key=b"d" * 32)


def test_a_secret_step_needs_an_encrypted_field() -> None:
    """Router refuses Step(secret=True) unless the rules encrypt its answer's path."""
    with pytest.raises(ConfigurationError, match=r"flow\.data\.new_pin"):
        Router(StateService(), main_menu=MENU)
    ring = FieldEncryption({"a": KEY_A})
    with pytest.raises(ConfigurationError, match=r"flow\.data\.again"):
        Router(StateService(rules=StateData(encryption=ring, secret=SECRET)), main_menu=MENU)
    Router(StateService(rules=_rules(ring)), main_menu=MENU)  # every path declared: fine


def _candidates_digests(user_id: str) -> set[str]:
    """Every unkeyed digest a six-digit PIN message could have had (the old scheme)."""
    found: set[str] = set()
    for n in range(1_000_000):
        text = f"{n:06d}"
        raw = f"{user_id}\x1ftext\x1f{text}\x1f".encode()
        found.add(urlsafe_b64encode(hashlib.blake2b(raw, digest_size=6).digest()).decode())
    return found


def _what_the_server_holds(server: Any, admin: redis.Redis, seen: list[str]) -> str:
    """MONITOR's lines, every hash, SLOWLOG, a fresh RDB and the rewritten AOF, as text."""
    admin.save()  # an RDB, as a backup would take
    admin.execute_command("BGREWRITEAOF")
    time.sleep(0.5)
    files = b"".join(
        p.read_bytes()
        for p in Path(server.directory).rglob("*")
        if p.is_file() and (p.suffix in {".rdb", ".aof"} or ".aof" in p.name)
    )
    assert files, "the server wrote no AOF or RDB file"
    stored = json.dumps(
        {
            key.decode(): {f.decode(): v.decode() for f, v in admin.hgetall(key).items()}
            for key in admin.keys("pin:*")
            if admin.type(key) == b"hash"
        }
    )
    slowlog = json.dumps([str(entry) for entry in admin.slowlog_get(10_000)])
    return "\n".join([*seen, stored, slowlog]) + files.decode("latin-1")


@pytest.mark.redis
@pytest.mark.slow
def test_a_pin_over_two_steps_leaves_no_trace(tmp_path: Path, server_kind: str) -> None:
    """MONITOR, SLOWLOG, the AOF, an RDB and the op log hold neither the PIN nor its digest."""
    server = servers.start_server(server_kind, "--appendonly", "yes", "--appendfsync", "always")
    try:
        admin = server.client()
        admin.config_set("slowlog-log-slower-than", 0)
        admin.config_set("slowlog-max-len", 10_000)
        with servers.monitored(server) as seen:
            user = "34600111222"
            first = StateService(
                RedisBackend.from_url(server.url, namespace="pin"),
                _rules(FieldEncryption({"a": KEY_A})),
            )
            bot = Router(first, main_menu=MENU)
            assert bot.handle(Message(user, text="pin", message_id="w1"))
            with bot.deliver(Message(user, text=PIN, message_id="w2")) as delivery:
                assert [getattr(s, "body", "") for s in delivery.replies] == ["Type it again."]
            # A rotation between the two steps: another process with the newer key.
            rotated = FieldEncryption({"a": KEY_A, "b": KEY_B}, current="b")
            second = StateService(
                RedisBackend.from_url(server.url, namespace="pin"), _rules(rotated)
            )
            bot2 = Router(second, main_menu=MENU)
            with bot2.deliver(Message(user, text=PIN, message_id="w3")) as delivery:
                assert [getattr(s, "body", "") for s in delivery.replies] == ["Your PIN is set."]
            assert second.get(user)["pin"] == PIN  # read back in plaintext
        assert any("EVALSHA" in line for line in seen)
        everything = _what_the_server_holds(server, admin, seen)
        assert PIN not in everything
        digests = _candidates_digests(user)
        words = set(everything.replace('"', " ").replace("\\", " ").split())
        assert not (digests & words), "a digest of a PIN candidate reached the store"
        ops = admin.hgetall(f"pin:{{{user}}}:ops")
        records = [v.decode().split(" ") for k, v in ops.items() if not k.startswith(b"#")]
        assert records
        assert all(r[3] not in digests for r in records)
        first.close()
        second.close()
        admin.close()
    finally:
        server.cleanup()


@pytest.mark.redis
def test_the_cli_and_exports_show_no_pin_of_a_running_flow(
    redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mid-flow (the PIN stored in flow.data), `chatstate state`, `export` and export() hide it."""
    from chatstate.__main__ import main

    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace),
        _rules(FieldEncryption({"a": KEY_A})),
    )
    bot = Router(svc, main_menu=MENU)
    bot.handle(Message("u", text="pin", message_id="w1"))
    bot.handle(Message("u", text=PIN, message_id="w2"))  # stored, the confirmation pending
    assert svc.manager.load("u").data["flow"]["data"]["new_pin"] == PIN  # there, decrypted
    assert PIN not in json.dumps(svc.export("u"))
    assert main(["state", "u", "--redis", redis_url, "--namespace", namespace]) == 0
    assert main(["export", "u", "--redis", redis_url, "--namespace", namespace]) == 0
    out = capsys.readouterr().out
    assert "new_pin" in out
    assert PIN not in out
    svc.close()
