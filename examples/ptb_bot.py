"""A python-telegram-bot 22 form bot whose data and conversations live in chatstate.

    BOT_TOKEN=123:abc REDIS_URL=redis://localhost:6379/0 python examples/ptb_bot.py

Run it in several processes: ``ChatstateApplication`` reloads the conversation
before each update and writes what changed after it. The handlers are plain
python-telegram-bot; only the persistence and application class are chatstate's.
"""

from __future__ import annotations

import os

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

NAME, AGE = range(2)


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data.pop("name", None)
    await update.effective_message.reply_text("What is your name?")
    return NAME


async def got_name(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    context.user_data["name"] = update.effective_message.text
    await update.effective_message.reply_text("How old are you?")
    return AGE


async def got_age(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    name = context.user_data["name"]
    await update.effective_message.reply_text(f"Nice to meet you, {name}.")
    return ConversationHandler.END


def add_handlers(app: Application) -> None:
    """The form conversation, persistent under the name "form"."""
    text = filters.TEXT & ~filters.COMMAND
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={NAME: [MessageHandler(text, got_name)], AGE: [MessageHandler(text, got_age)]},
            fallbacks=[],
            name="form",
            persistent=True,
        )
    )


def main() -> None:
    url = os.environ.get("REDIS_URL", "redis://localhost:6379/0")
    app = (
        ApplicationBuilder()
        .token(os.environ["BOT_TOKEN"])
        .persistence(ChatstatePersistence.from_url(url, namespace="form-bot"))
        .application_class(ChatstateApplication)
        .build()
    )
    add_handlers(app)
    app.run_polling()


if __name__ == "__main__":
    main()
