"""A WhatsApp Cloud API webhook for the credit bot, with Starlette.

    uvicorn --factory examples.whatsapp_webhook:create_app

GET /webhook answers Meta's verification handshake; POST /webhook turns each
incoming message into a :class:`~chatstate.flow.Message`, lets the router handle
it, and hands every reply, rendered as a Cloud API payload, to ``send`` (a real
app POSTs it to ``https://graph.facebook.com/v21.0/<phone-id>/messages``; here
the default only keeps it in ``app.state.outbox``). A redelivered notification
(same ``wamid``) produces no second reply.
"""

from __future__ import annotations

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
from chatstate.flow import Router, parse_webhook, render_whatsapp

Send = Callable[[dict[str, Any]], None]


def create_app(
    router: Router | None = None, send: Send | None = None, verify_token: str | None = None
) -> Starlette:
    """The webhook app; ``router`` defaults to the credit bot on the memory backend."""
    router = router or build_router(StateService(MemoryBackend(), RULES), seeded_bank())
    outbox: list[dict[str, Any]] = []
    deliver = send or outbox.append
    expected = verify_token or os.environ.get("WHATSAPP_VERIFY_TOKEN", "dev-verify-token")

    async def verify(request: Request) -> Response:
        params = request.query_params
        if params.get("hub.mode") == "subscribe" and params.get("hub.verify_token") == expected:
            return PlainTextResponse(params.get("hub.challenge", ""))
        return PlainTextResponse("forbidden", status_code=403)

    async def receive(request: Request) -> Response:
        try:
            payload = await request.json()
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        handled = 0
        for message in parse_webhook(payload):
            # The sync router does blocking I/O: keep it off the event loop.
            replies = await run_in_threadpool(router.handle, message)
            for screen in replies:
                deliver(render_whatsapp(screen, message.user_id))
            handled += 1
        return JSONResponse({"handled": handled})

    app = Starlette(
        routes=[Route("/webhook", verify), Route("/webhook", receive, methods=["POST"])]
    )
    app.state.outbox = outbox
    app.state.router = router
    return app
