"""The README's example runs as printed (against the suite's own server)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


@pytest.mark.redis
def test_the_readme_example_handles_a_redelivery_once(redis_url: str, namespace: str) -> None:
    code = _python_blocks()[0]
    assert '"redis://localhost:6379/0"' in code
    code = code.replace('"redis://localhost:6379/0"', repr(redis_url)).replace(
        "RedisBackend.from_url(", f"RedisBackend.from_url(namespace={namespace!r}, url="
    )
    scope: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    on_message, state = scope["on_message"], scope["state"]
    try:
        assert on_message("ana", "m1", "login") == "Logged in."
        assert on_message("ana", "m1", "login") == ""  # the redelivery
        assert on_message("ana", "m2", "hi") == "Menu: transfer, balance"
        state.update("ana", {"step": "amount"})
        assert on_message("ana", "m3", "25") == "Who should receive the credits?"
        doc = state.get("ana")
        assert doc["draft"] == {"amount": 25}
        assert doc["jwt_token"] == "eyJ..."
    finally:
        state.close()


def test_the_readme_delivery_answers_once_and_resends_after_a_failed_send() -> None:
    """The README's webhook handler: one answer per message, resent when the first send failed."""
    import asyncio

    code = _python_blocks()[1]
    scope: dict[str, Any] = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    on_webhook = scope["on_webhook"]
    sent: list[tuple[str, str]] = []
    down = [True]

    async def send(user_id: str, text: str) -> None:
        if down[0]:
            down[0] = False
            raise ConnectionError("the platform is down")
        sent.append((user_id, text))

    async def main() -> None:
        with pytest.raises(ConnectionError):
            await on_webhook("ana", "w1", "balance", send)
        await on_webhook("ana", "w1", "balance", send)  # the redelivery: the stored reply
        await on_webhook("ana", "w1", "balance", send)  # acknowledged: nothing
        await on_webhook("ana", "w2", "balance", send)

    asyncio.run(main())
    assert sent == [("ana", "You have 40 credits."), ("ana", "You have 40 credits.")]
