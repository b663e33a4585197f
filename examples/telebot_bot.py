"""A pyTelegramBotAPI form bot whose states live in chatstate (Redis or Valkey).

    TELEGRAM_TOKEN=123:abc REDIS_URL=redis://localhost:6379/0 python examples/telebot_bot.py

Configured by the environment:

- ``TELEGRAM_TOKEN``: the bot's token (``BOT_TOKEN`` is read too).
- ``TELEGRAM_API_URL``: the Bot API server, without the ``/bot<token>`` part
  (``https://api.telegram.org`` when unset; a local ``telegram-bot-api`` server,
  say ``http://localhost:8081``).
- ``REDIS_URL``: where states and data live (``redis://localhost:6379/0``).
- ``CHATSTATE_NAMESPACE``: the prefix of the bot's Redis keys (``telebot-form``).

Run it in as many processes as you like: states and data are shared, each
``add_data`` is one write of its own field (two handlers of one user never lose
each other's), and an update Telegram delivers to two processes is handled
once. The handlers are plain telebot; only the storage and middleware lines are
chatstate's.
"""

from __future__ import annotations

import os

from telebot import TeleBot, apihelper, custom_filters
from telebot.states import State, StatesGroup
from telebot.states.sync.context import StateContext
from telebot.states.sync.middleware import StateMiddleware
from telebot.types import Message

from chatstate.integrations.telebot import ChatstateStateStorage, UpdateDedupeMiddleware


class Form(StatesGroup):
    name = State()
    age = State()


def build_bot(token: str, storage: ChatstateStateStorage) -> TeleBot:
    """The form bot: /start asks a name, then an age, then sums up."""
    bot = TeleBot(token, state_storage=storage, use_class_middlewares=True)

    @bot.message_handler(commands=["start"])
    def start(message: Message, state: StateContext) -> None:
        state.set(Form.name)
        bot.send_message(message.chat.id, "What is your name?")

    @bot.message_handler(state=Form.name)
    def got_name(message: Message, state: StateContext) -> None:
        state.add_data(name=message.text)  # one write of this field
        state.set(Form.age)
        bot.send_message(message.chat.id, "How old are you?")

    @bot.message_handler(state=Form.age, is_digit=True)
    def got_age(message: Message, state: StateContext) -> None:
        with state.data() as data:  # writes back only what the block changes
            name = data["name"]
        state.delete()
        bot.send_message(message.chat.id, f"{name} is {message.text}.")

    @bot.message_handler(state=Form.age, is_digit=False)
    def bad_age(message: Message) -> None:
        bot.send_message(message.chat.id, "Please send your age as a number.")

    bot.add_custom_filter(custom_filters.StateFilter(bot))
    bot.add_custom_filter(custom_filters.IsDigitFilter())
    bot.setup_middleware(UpdateDedupeMiddleware(bot, storage.service))  # first: skips copies
    bot.setup_middleware(StateMiddleware(bot))
    return bot


def main() -> None:
    token = os.environ.get("TELEGRAM_TOKEN") or os.environ["BOT_TOKEN"]
    api = os.environ.get("TELEGRAM_API_URL")
    if api:
        apihelper.API_URL = api.rstrip("/") + "/bot{0}/{1}"
    storage = ChatstateStateStorage.from_url(
        os.environ.get("REDIS_URL", "redis://localhost:6379/0"),
        namespace=os.environ.get("CHATSTATE_NAMESPACE", "telebot-form"),
    )
    try:
        build_bot(token, storage).infinity_polling()
    finally:
        storage.close()


if __name__ == "__main__":
    main()
