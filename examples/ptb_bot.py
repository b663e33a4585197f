"""A python-telegram-bot 22 form bot whose data and conversations live in chatstate.

    TELEGRAM_TOKEN=123:abc REDIS_URL=redis://localhost:6379/0 python examples/ptb_bot.py

Configured by the environment:

- ``TELEGRAM_TOKEN``: the bot's token (``BOT_TOKEN`` is read too).
- ``TELEGRAM_API_URL``: the Bot API server, without the ``/bot<token>`` part
  (``https://api.telegram.org`` when unset; a local ``telegram-bot-api`` server,
  say ``http://localhost:8081``).
- ``REDIS_URL``: where data and conversations live (``redis://localhost:6379/0``).
- ``CHATSTATE_NAMESPACE``: the prefix of the bot's Redis keys (``form-bot``).

Run it in several processes: ``ChatstateApplication`` handles an update that
reaches two of them once, runs one user's updates one at a time, reloads the
conversation before each update and writes what changed after it. A process
killed mid-update holds its update and its user for at most 5 s. The handlers
are plain python-telegram-bot (the states an ``IntEnum``); only the persistence
and the application class are chatstate's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import IntEnum

from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)

from chatstate.integrations.telegram import ChatstateApplication, ChatstatePersistence


class Form(IntEnum):
    NAME = 0
    AGE = 1


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Form:
    context.user_data.pop("name", None)
    await update.effective_message.reply_text("What is your name?")
    return Form.NAME


async def got_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Form:
    context.user_data["name"] = update.effective_message.text
    await update.effective_message.reply_text("How old are you?")
    return Form.AGE


async def got_age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["age"] = age = update.effective_message.text
    name = context.user_data["name"]
    await update.effective_message.reply_text(f"Nice to meet you, {name} ({age}).")
    return ConversationHandler.END


def add_handlers(app: Application) -> None:
    """The form conversation, persistent under the name "form"."""
    text = filters.TEXT & ~filters.COMMAND
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={
                Form.NAME: [MessageHandler(text, got_name)],
                Form.AGE: [MessageHandler(text, got_age)],
            },
            fallbacks=[],
            name="form",
            persistent=True,
        )
    )


def build_application(environ: Mapping[str, str] = os.environ) -> Application:
    """The application the environment configures (token, Bot API server, Redis)."""
    builder = (
        ApplicationBuilder()
        .token(environ.get("TELEGRAM_TOKEN") or environ["BOT_TOKEN"])
        .persistence(
            ChatstatePersistence.from_url(
                environ.get("REDIS_URL", "redis://localhost:6379/0"),
                namespace=environ.get("CHATSTATE_NAMESPACE", "form-bot"),
            )
        )
        .application_class(ChatstateApplication)
        # Other users' updates go on while one waits: each user's still run one at a time.
        .concurrent_updates(True)  # noqa: FBT003 - python-telegram-bot's signature
    )
    api_url = environ.get("TELEGRAM_API_URL", "").rstrip("/")
    if api_url:
        builder = builder.base_url(f"{api_url}/bot").base_file_url(f"{api_url}/file/bot")
    app = builder.build()
    add_handlers(app)
    return app


def main() -> None:
    build_application().run_polling()


if __name__ == "__main__":
    main()
