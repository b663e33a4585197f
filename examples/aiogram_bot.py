"""An aiogram 3 form bot whose FSM lives in chatstate (Redis or Valkey).

    TELEGRAM_TOKEN=123:abc REDIS_URL=redis://localhost:6379/0 python examples/aiogram_bot.py

Configured by the environment:

- ``TELEGRAM_TOKEN``: the bot's token (``BOT_TOKEN`` is read too).
- ``TELEGRAM_API_URL``: the Bot API server, without the ``/bot<token>`` part
  (``https://api.telegram.org`` when unset; a local ``telegram-bot-api`` server,
  say ``http://localhost:8081``).
- ``REDIS_URL``: where state and data live (``redis://localhost:6379/0``).
- ``CHATSTATE_NAMESPACE``: the prefix of the bot's Redis keys (``form-bot``).

Run it in as many processes as you like: state and data are shared, each chat's
updates run one at a time, and an update Telegram delivers twice is handled once.
Each update's writes land together when its handler returns, or not at all: a
process killed mid-update leaves its chat as it was and holds it for at most
5 s, then the update's redelivery runs again. The handlers are plain aiogram;
only the storage lines are chatstate's.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping

from aiogram import Bot, Dispatcher, Router
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.types import Message

from chatstate.integrations.aiogram import ChatstateDedupeMiddleware, ChatstateStorage


class Form(StatesGroup):
    name = State()
    age = State()


router = Router()


@router.message(Command("start"))
async def start(message: Message, state: FSMContext) -> None:
    await state.set_state(Form.name)
    await message.answer("What is your name?")


@router.message(Form.name)
async def got_name(message: Message, state: FSMContext) -> None:
    await state.update_data(name=message.text)  # stored with the state when it returns
    await state.set_state(Form.age)
    await message.answer("How old are you?")


@router.message(Form.age)
async def got_age(message: Message, state: FSMContext) -> None:
    data = await state.update_data(age=message.text)
    await state.clear()
    await message.answer(f"Nice to meet you, {data['name']} ({data['age']}).")


def build_dispatcher(storage: ChatstateStorage) -> Dispatcher:
    """The bot's dispatcher over ``storage``, with isolation and dedupe."""
    dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
    ChatstateDedupeMiddleware(storage.service).setup(dp)
    dp.include_router(router)
    return dp


def build_bot(environ: Mapping[str, str] = os.environ) -> Bot:
    """The bot the environment names: its token and, if set, its Bot API server."""
    token = environ.get("TELEGRAM_TOKEN") or environ["BOT_TOKEN"]
    api_url = environ.get("TELEGRAM_API_URL")
    if not api_url:
        return Bot(token)
    return Bot(token, session=AiohttpSession(api=TelegramAPIServer.from_base(api_url)))


def build_storage(environ: Mapping[str, str] = os.environ) -> ChatstateStorage:
    """The storage on the Redis the environment names."""
    return ChatstateStorage.from_url(
        environ.get("REDIS_URL", "redis://localhost:6379/0"),
        namespace=environ.get("CHATSTATE_NAMESPACE", "form-bot"),
    )


async def main() -> None:
    dp = build_dispatcher(build_storage())
    await dp.start_polling(build_bot())


if __name__ == "__main__":
    asyncio.run(main())
