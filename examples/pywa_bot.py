"""The credit bot of ``credit_bot.py`` on pywa: pywa's webhook and client, chatstate's flows.

    WHATSAPP_PHONE_ID=123 WHATSAPP_TOKEN=EAAB... WHATSAPP_APP_SECRET=... python examples/pywa_bot.py

Configured by the environment:

- ``WHATSAPP_PHONE_ID``, ``WHATSAPP_TOKEN``: the number replies are sent from, and
  the access token.
- ``WHATSAPP_VERIFY_TOKEN``, ``WHATSAPP_APP_SECRET``: the webhook's verify token and
  the app secret pywa checks every notification's signature with.
- ``GRAPH_API_URL``: the Graph API server (``https://graph.facebook.com`` when unset).
- ``CHATSTATE_SQLITE``: a SQLite file for the users' state (in memory when unset).
- ``CHATSTATE_RESEND_AFTER``: seconds after which replies stored and never sent (a
  crash, the Graph API down) are sent again (30).
- ``HOST``, ``PORT``: where the webhook (``/webhook``) listens (``127.0.0.1:8000``).

pywa serves the webhook, checks signatures and sends; the bot is ``credit_bot``'s
router, run by :class:`~chatstate.integrations.pywa.ChatstateHandlers`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx
import uvicorn
from pywa import WhatsApp
from starlette.applications import Starlette

sys.path.insert(0, str(Path(__file__).resolve().parent))

from credit_bot import RULES, build_router, seeded_bank

from chatstate import MemoryBackend, SqliteBackend, StateService
from chatstate.integrations.pywa import ChatstateHandlers


def build_app(environ: Mapping[str, str] = os.environ) -> tuple[Starlette, ChatstateHandlers]:
    """pywa's webhook app for the credit bot, and the handlers that run it."""
    path = environ.get("CHATSTATE_SQLITE")
    service = StateService(SqliteBackend(path) if path else MemoryBackend(), RULES)
    router = build_router(service, seeded_bank())
    router.resend_after_ms = int(float(environ.get("CHATSTATE_RESEND_AFTER", "30")) * 1000)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        with handlers.resending(every=min(5.0, router.resend_after_ms / 2000)):
            yield
        service.close()

    app = Starlette(lifespan=lifespan)
    session = httpx.Client(timeout=30)
    wa = WhatsApp(
        phone_id=environ.get("WHATSAPP_PHONE_ID", "0"),
        token=environ.get("WHATSAPP_TOKEN", "dev-token"),
        session=session,
        server=app,
        webhook_endpoint="/webhook",
        verify_token=environ.get("WHATSAPP_VERIFY_TOKEN", "dev-verify-token"),
        app_secret=environ.get("WHATSAPP_APP_SECRET", "dev-app-secret"),
    )
    if api_url := environ.get("GRAPH_API_URL"):  # pywa set https://graph.facebook.com/v<version>
        session.base_url = httpx.URL(api_url.rstrip("/") + session.base_url.path)
    handlers = ChatstateHandlers(wa, router)
    return app, handlers


def main() -> None:
    app, _ = build_app()
    uvicorn.run(
        app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000"))
    )


if __name__ == "__main__":
    main()
