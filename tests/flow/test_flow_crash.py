"""A process that dies between a hook's effect and the write: the redelivery runs it once more.

The child process below is a whole bot on a real Redis server. Its payment hook
calls a fake payments API (a file that dedupes by idempotency key) and, in
"crash" mode, dies with ``os._exit`` right after the call, before the router's
commit. The message's claim then lapses after its lease; the platform's
redelivery, in a new process, waits for it, runs the hook again with the same
idempotency key, and commits. The API saw the key twice and charged once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from chatstate import RedisBackend, StateService

BOT = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from chatstate import RedisBackend, StateService
    from chatstate.flow import DONE, Flow, Menu, MenuItem, Message, Router, Step, render_text

    url, namespace, ledger, mode, text, message_id = sys.argv[1:7]


    class Payments:
        def pay(self, amount, key):
            calls = json.loads(Path(ledger).read_text()) if Path(ledger).exists() else []
            calls.append(key)
            Path(ledger).write_text(json.dumps(calls))
            return len(set(calls))


    class Pay(Flow):
        amount = Step("Amount?", clean=int, next="confirm")
        confirm = Step("Sure?", next={"yes": DONE, "no": "amount"})

        def on_complete(self, data, ctx):
            ctx.deps.pay(data["amount"], ctx.idempotency_key)
            if mode == "crash":
                os._exit(3)  # dies after the effect, before the write
            ctx.update({"paid": data["amount"]})
            return f"Paid {data['amount']}."


    service = StateService(RedisBackend.from_url(url, namespace=namespace))
    router = Router(
        service,
        main_menu=Menu("Shop", [MenuItem("pay", "Pay", flow=Pay)]),
        deps=Payments(),
        lease=1.0,
        wait=30.0,
    )
    replies = router.handle(Message("ana", text, message_id=message_id))
    print(json.dumps([render_text(s) for s in replies]))
    service.close()
    """
)


def _run(bot: Path, url: str, namespace: str, ledger: Path, *args: str) -> Any:
    """Run the bot once: ``args`` are the mode, the text and the message id."""
    return subprocess.run(
        [sys.executable, str(bot), url, namespace, str(ledger), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.redis
def test_a_crash_between_the_hook_and_the_write_is_redelivered_once(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    """The crashed handling wrote nothing; its redelivery pays with the same key, then silence."""
    bot = tmp_path / "bot.py"
    bot.write_text(BOT)
    ledger = tmp_path / "ledger.json"
    for text, mid in (("pay", "m1"), ("7", "m2")):
        done = _run(bot, redis_url, namespace, ledger, "ok", text, mid)
        assert done.returncode == 0, done.stderr
    crashed = _run(bot, redis_url, namespace, ledger, "crash", "yes", "wamid.final")
    assert crashed.returncode == 3, crashed.stderr
    assert json.loads(ledger.read_text()) == ["wamid.final"]  # the effect happened
    check = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    try:
        assert check.get("ana")["flow"]["step"] == "confirm"  # but nothing was written
        again = _run(bot, redis_url, namespace, ledger, "ok", "yes", "wamid.final")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout) == ["Paid 7."]
        assert json.loads(ledger.read_text()) == ["wamid.final", "wamid.final"]  # one key
        state = check.get("ana")
        assert state["paid"] == 7
        assert "flow" not in state
        late = _run(bot, redis_url, namespace, ledger, "ok", "yes", "wamid.final")
        assert json.loads(late.stdout) == []
        assert len(json.loads(ledger.read_text())) == 2  # the late copy ran nothing
    finally:
        check.close()
