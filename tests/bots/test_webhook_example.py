"""The Starlette webhook example, served by uvicorn and driven over real HTTP."""

from __future__ import annotations

import hashlib
import hmac
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from credit_bot import RULES, build_router, seeded_bank
from whatsapp_webhook import create_app

from chatstate import MemoryBackend, StateService

SECRET = "test-app-secret"


@pytest.fixture
def service() -> StateService:
    return StateService(MemoryBackend(), RULES)


@pytest.fixture
def webhook(service: StateService) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    router = build_router(service, seeded_bank())
    app = create_app(router, verify_token="let-me-in", app_secret=SECRET)
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


def _sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _post(url: str, body: bytes, signature: str | None = "sign") -> dict[str, Any]:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = _sign(body) if signature == "sign" else signature
    request = urllib.request.Request(url, body, headers)
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
    with pytest.raises(urllib.error.HTTPError) as info:
        _post(url, b"not json")
    assert info.value.code == 400
    info.value.close()


@pytest.mark.parametrize(
    "signature",
    [None, "", "sha256=", "sha1=abc", _sign(b"another body"), _sign(b"x", secret="wrong")],
    ids=["unsigned", "empty", "no-digest", "sha1", "other-body", "wrong-secret"],
)
def test_unsigned_or_wrongly_signed_requests_get_401_and_store_nothing(
    webhook, service: StateService, signature: str | None
) -> None:
    """Without Meta's X-Hub-Signature-256 over this very body, nothing is handled or stored."""
    url, outbox = webhook
    body = _notification("wamid.9", reply="register")
    with pytest.raises(urllib.error.HTTPError) as info:
        _post(url, body, signature=signature)
    assert info.value.code == 401
    info.value.close()
    assert outbox == []
    assert len(service.manager.backend) == 0  # type: ignore[arg-type]
    assert _post(url, body) == {"handled": 1}
    assert len(outbox) == 1
    assert service.get("34600000000") != {}
