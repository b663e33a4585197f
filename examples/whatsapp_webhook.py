"""A WhatsApp Cloud API webhook for the credit bot, with Starlette.

    uvicorn --factory examples.whatsapp_webhook:create_app

GET /webhook answers Meta's verification handshake; POST /webhook checks the
``X-Hub-Signature-256`` header (Meta signs every notification with the app
secret: HMAC-SHA256 of the raw body), turns each incoming message into a
:class:`~chatstate.flow.Message`, lets the router handle it, and hands every
reply, rendered as a Cloud API payload, to ``send`` (a real app POSTs it to
``https://graph.facebook.com/v21.0/<phone-id>/messages``; here the default only
keeps it in ``app.state.outbox``). An unsigned or wrongly signed request gets
401 and changes nothing. A redelivered notification (same ``wamid``) produces
no second reply. The state service is opened and closed with the app by
:func:`~chatstate.integrations.starlette.chatstate_lifespan`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))

from credit_bot import RULES, build_router, seeded_bank

from chatstate import MemoryBackend, StateService
from chatstate.flow import Message, Router, parse_webhook, render_whatsapp
from chatstate.integrations.starlette import chatstate_lifespan

Send = Callable[[dict[str, Any]], None]


def _deliver(bot: Router, message: Message, send: Send) -> None:
    """Handle one message and send its replies; leaving the block acknowledges them."""
    with bot.deliver(message) as delivery:
        for screen in delivery.replies:
            send(render_whatsapp(screen, message.user_id))


def signature_ok(body: bytes, header: str | None, app_secret: str) -> bool:
    """True when ``header`` is ``sha256=`` and the HMAC-SHA256 of ``body`` under the secret."""
    if not header or not header.startswith("sha256="):
        return False
    expected = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(header.removeprefix("sha256="), expected)


def create_app(
    router: Router | None = None,
    send: Send | None = None,
    verify_token: str | None = None,
    app_secret: str | None = None,
) -> Starlette:
    """The webhook app; ``router`` defaults to the credit bot over the lifespan's service."""
    outbox: list[dict[str, Any]] = []
    deliver = send or outbox.append
    expected = verify_token or os.environ.get("WHATSAPP_VERIFY_TOKEN", "dev-verify-token")
    secret = app_secret or os.environ.get("WHATSAPP_APP_SECRET", "dev-app-secret")

    def setup(service: StateService) -> dict[str, Any]:
        return {"router": router or build_router(service, seeded_bank())}

    async def verify(request: Request) -> Response:
        params = request.query_params
        if params.get("hub.mode") == "subscribe" and params.get("hub.verify_token") == expected:
            return PlainTextResponse(params.get("hub.challenge", ""))
        return PlainTextResponse("forbidden", status_code=403)

    async def receive(request: Request) -> Response:
        body = await request.body()
        if not signature_ok(body, request.headers.get("X-Hub-Signature-256"), secret):
            return JSONResponse({"error": "bad signature"}, status_code=401)
        try:
            payload = json.loads(body)
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        bot: Router = request.state.router
        handled = 0
        for message in parse_webhook(payload):
            # The sync router does blocking I/O: keep it off the event loop. The step
            # and its replies are committed together; the replies are acknowledged only
            # once sent, so a crash before that resends them on Meta's redelivery.
            await run_in_threadpool(_deliver, bot, message, deliver)
            handled += 1
        return JSONResponse({"handled": handled})

    app = Starlette(
        routes=[Route("/webhook", verify), Route("/webhook", receive, methods=["POST"])],
        lifespan=chatstate_lifespan(lambda: StateService(MemoryBackend(), RULES), setup=setup),
    )
    app.state.outbox = outbox
    return app
