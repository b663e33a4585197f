"""What the pywa tests play: Meta's signed notifications and a Graph API that records sends.

:class:`FakeGraphApi` is a real HTTP server on a random loopback port that
answers ``POST /v<version>/<phone-id>/messages`` as the Cloud API does and
keeps every request (path, ``Authorization`` header, JSON body); it can hold
a request unanswered and never accept it (the sender is killed while it
waits), or answer some with a 500.
The ``*_message`` builders make the message objects of Cloud API
notifications; :func:`notification` wraps one, :func:`sign` signs a body as
Meta does (HMAC-SHA256 with the app secret, ``X-Hub-Signature-256``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

PHONE_ID = "1055501234"
WABA_ID = "2055509876"
SECRET = "test-app-secret"
TOKEN = "EAAtest-token-never-logged"
VERIFY = "let-me-in"


class FakeGraphApi:
    """A Graph API on loopback that records what pywa sends (see the module)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.changed = threading.Condition()
        self.hold = False  # the next send waits until released (or its sender dies)
        self.held = threading.Event()
        self.release = threading.Event()
        self.fail = 0  # this many sends answer 500
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with api.changed:
                    hold, api.hold = api.hold, False
                    failing = api.fail > 0
                    api.fail -= failing
                if hold:  # never accepted: the sender is killed while it waits
                    api.held.set()
                    api.release.wait(60)
                    self.close_connection = True
                    return
                if failing:
                    self._answer(500, {"error": {"code": 1, "message": "try later"}})
                    return
                with api.changed:
                    api.requests.append(
                        {
                            "path": self.path,
                            "auth": self.headers.get("Authorization"),
                            "body": body,
                        }
                    )
                    n = len(api.requests)
                    api.changed.notify_all()
                to = body.get("to", "")
                self._answer(
                    200,
                    {
                        "messaging_product": "whatsapp",
                        "contacts": [{"input": to, "wa_id": to}],
                        "messages": [{"id": f"wamid.sent.{n}"}],
                    },
                )

            def _answer(self, status: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def sent(self, to: str | None = None) -> list[dict[str, Any]]:
        """The message bodies sent (to ``to`` only, when given), in order."""
        with self.changed:
            return [r["body"] for r in self.requests if to is None or r["body"]["to"] == to]

    def wait_for(
        self, count: int, to: str | None = None, timeout: float = 30
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` messages were sent (to ``to``); return them."""
        with self.changed:
            ok = self.changed.wait_for(lambda: len(self.sent(to)) >= count, timeout)
        got = self.sent(to)
        assert ok, f"waited for {count} sends, got {got}"
        return got


def readable(body: dict[str, Any]) -> str:
    """A sent message as a line of text: the body, then its buttons or rows in brackets."""
    if body["type"] == "text":
        return str(body["text"]["body"])
    interactive = body["interactive"]
    action = interactive["action"]
    if interactive["type"] == "button":
        choices = [b["reply"]["title"] for b in action["buttons"]]
    else:
        choices = [r["title"] for s in action["sections"] for r in s["rows"]]
    return f"{interactive['body']['text']} [{', '.join(choices)}]"


def text_message(text: str) -> dict[str, Any]:
    return {"type": "text", "text": {"body": text}}


# A tap answers a message the business sent: Meta names it in "context".
_CONTEXT = {"from": "15550001234", "id": "wamid.sent.menu"}


def button_message(reply_id: str, title: str) -> dict[str, Any]:
    reply = {"type": "button_reply", "button_reply": {"id": reply_id, "title": title}}
    return {"type": "interactive", "interactive": reply, "context": _CONTEXT}


def list_message(row_id: str, title: str) -> dict[str, Any]:
    reply = {"type": "list_reply", "list_reply": {"id": row_id, "title": title}}
    return {"type": "interactive", "interactive": reply, "context": _CONTEXT}


def image_message(media_id: str, caption: str | None = None) -> dict[str, Any]:
    image = {"id": media_id, "mime_type": "image/jpeg", "sha256": "abc="}
    if caption is not None:
        image["caption"] = caption
    return {"type": "image", "image": image}


def location_message(latitude: float, longitude: float, name: str) -> dict[str, Any]:
    place = {"latitude": latitude, "longitude": longitude, "name": name}
    return {"type": "location", "location": place}


def contacts_message(name: str, phone: str) -> dict[str, Any]:
    card = {"name": {"formatted_name": name}, "phones": [{"phone": f"+{phone}", "wa_id": phone}]}
    return {"type": "contacts", "contacts": [card]}


def notification(
    wamid: str, sender: str, message: dict[str, Any], *, name: str = "Ana", at: int | None = None
) -> bytes:
    """A Cloud API webhook notification of one message from ``sender``, as Meta posts it."""
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550001234", "phone_number_id": PHONE_ID},
        # Since 2026 a contact carries its business-scoped user id too (pywa 4.5 reads it).
        "contacts": [{"profile": {"name": name}, "wa_id": sender, "user_id": f"US.{sender}"}],
        "messages": [
            {
                "from": sender,
                "id": wamid,
                "timestamp": str(int(time.time()) if at is None else at),
                **message,
            }
        ],
    }
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": WABA_ID, "changes": [{"value": value, "field": "messages"}]}],
    }
    return json.dumps(body).encode()


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(url: str, body: bytes, signature: str | None = None) -> int:
    """POST a notification signed with the app secret (or ``signature``; "" for none)."""
    headers = {"Content-Type": "application/json"}
    if signature != "":
        headers["X-Hub-Signature-256"] = sign(body) if signature is None else signature
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


class Handled:
    """Counts the notifications pywa finished handling (its raw-update handler runs last)."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

    def __call__(self, *_args: Any) -> None:
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.count >= count, timeout), (
                f"pywa handled {self.count} of {count} notifications"
            )
