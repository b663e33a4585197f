"""An aiogram 3 form bot whose FSM lives in chatstate (Redis or Valkey).

    BOT_TOKEN=123:abc REDIS_URL=redis://localhost:6379/0 python examples/aiogram_bot.py

Run it in as many processes as you like: state and data are shared, each chat's
updates run one at a time, and an update Telegram delivers twice is handled once.
The handlers are plain aiogram; only the storage line is chatstate's.
"""

from __future__ import annotations

import asyncio
import os

from aiogram import Bot, Dispatcher, Router
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
    await state.update_data(name=message.text)  # one atomic write
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
    dp.update.outer_middleware(ChatstateDedupeMiddleware(storage.service))
    dp.include_router(router)
    return dp


async def main() -> None:
    storage = ChatstateStorage.from_url(
        os.environ.get("REDIS_URL", "redis://localhost:6379/0"), namespace="form-bot"
    )
    dp = build_dispatcher(storage)
    await dp.start_polling(Bot(os.environ["BOT_TOKEN"]))


if __name__ == "__main__":
    asyncio.run(main())
