"""The Starlette webhook example, served by uvicorn and driven over real HTTP."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

import servers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from whatsapp_webhook import create_app


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    app = create_app(verify_token="let-me-in")
    port = servers.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{port}/webhook", app.state.outbox
    server.should_exit = True
    thread.join(10)


def _notification(wamid: str, text: str | None = None, reply: str | None = None) -> bytes:
    message: dict[str, Any] = {
        "from": "34600000000",
        "id": wamid,
        "timestamp": str(int(time.time())),
    }
    if reply:
        message |= {
            "type": "interactive",
            "interactive": {"type": "button_reply", "button_reply": {"id": reply, "title": reply}},
        }
    else:
        message |= {"type": "text", "text": {"body": text}}
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"changes": [{"field": "messages", "value": {"messages": [message]}}]}],
    }
    return json.dumps(body).encode()


def _post(url: str, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_verification_handshake(webhook) -> None:
    """GET answers Meta's challenge only with the right verify token."""
    url, _ = webhook
    ok = f"{url}?hub.mode=subscribe&hub.verify_token=let-me-in&hub.challenge=42"
    with urllib.request.urlopen(ok, timeout=10) as response:
        assert response.read() == b"42"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{url}?hub.mode=subscribe&hub.verify_token=no", timeout=10)
    assert info.value.code == 403
    info.value.close()


def test_conversation_over_http_with_a_redelivery(webhook) -> None:
    """Messages in, Cloud API payloads out; a redelivered wamid gets no second reply."""
    url, outbox = webhook
    assert _post(url, _notification("wamid.1", "hi")) == {"handled": 1}
    menu = outbox[-1]
    assert menu["to"] == "34600000000"
    assert menu["interactive"]["type"] == "button"
    ids = [b["reply"]["id"] for b in menu["interactive"]["action"]["buttons"]]
    assert ids == ["register", "login"]
    _post(url, _notification("wamid.2", reply="register"))
    assert outbox[-1]["text"]["body"] == "What is your name?"
    _post(url, _notification("wamid.3", "Ana"))
    count = len(outbox)
    assert _post(url, _notification("wamid.3", "Ana")) == {"handled": 1}
    assert len(outbox) == count
    assert outbox[-1]["text"]["body"] == "Choose a 4-digit PIN."
    request = urllib.request.Request(url, b"not json", {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    info.value.close()
