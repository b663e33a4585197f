"""telebot's own state examples, unchanged but for the storage, hold their talks on chatstate.

pyTelegramBotAPI has no tests of its state storages; what it documents of
them is ``examples/custom_states.py`` and its asyncio twin (see README.md).
Each example's bot is fed the Bot API's updates for a whole conversation and
must send what it sends on telebot's own ``StateMemoryStorage``, reply for
reply, on chatstate's memory, SQLite and Redis backends.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from telebot import types
from telebot.asyncio_storage import StateMemoryStorage as AsyncStateMemoryStorage
from telebot.storage import StateMemoryStorage

from chatstate import (
    AsyncRedisBackend,
    AsyncSqliteBackend,
    AsyncStateService,
    RedisBackend,
    SqliteBackend,
    StateService,
)
from chatstate.integrations.telebot import AsyncChatstateStateStorage, ChatstateStateStorage

from . import async_custom_states, custom_states

FORM = ["/start", "Ana", "old", "30", "Blue", "Reading", "still there?"]
CANCEL = ["/start", "Bo", "/cancel", "after the cancel"]


def _update(update_id: int, text: str, chat_id: int) -> types.Update:
    message: dict[str, Any] = {
        "message_id": update_id,
        "date": 1_700_000_000,
        "chat": {"id": chat_id, "type": "private"},
        "from": {"id": chat_id, "is_bot": False, "first_name": "Ana"},
        "text": text,
    }
    if text.startswith("/"):
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    return types.Update.de_json({"update_id": update_id, "message": message})


def _recorder(sent: list[tuple[int, str]]) -> Callable[..., types.Message]:
    ids = itertools.count(10_000)

    def send_message(chat_id: int, text: str, **options: Any) -> types.Message:
        del options  # reply markup, reply parameters, parse mode: not what is compared
        sent.append((chat_id, text))
        body = {"message_id": next(ids), "date": 0, "chat": {"id": chat_id, "type": "private"}}
        return types.Message.de_json(body)

    return send_message


@pytest.fixture(scope="module", autouse=True)
def _sync_bot_runs_inline() -> None:
    """The sync example's bot is threaded (a worker pool): handle updates inline instead."""
    bot = custom_states.bot
    if bot.threaded:
        bot.worker_pool.close()
        bot.threaded = False


def _sync_storage(kind: str, where: Path | str) -> Any:
    """A sync storage over a new store: memory, SQLite (``where`` a directory), Redis (a URL)."""
    if kind == "memory":
        return ChatstateStateStorage(StateService(), close_service=True)
    if kind == "sqlite":
        service = StateService(SqliteBackend(Path(where) / "sync.db"))
        return ChatstateStateStorage(service, close_service=True)
    backend = RedisBackend.from_url(str(where), namespace=f"t{uuid.uuid4().hex[:12]}")
    return ChatstateStateStorage(StateService(backend), close_service=True)


def _async_storage(kind: str, where: Path | str) -> Any:
    """The asyncio twin of :func:`_sync_storage`."""
    if kind == "memory":
        return AsyncChatstateStateStorage(AsyncStateService(), close_service=True)
    if kind == "sqlite":
        service = AsyncStateService(AsyncSqliteBackend(Path(where) / "async.db"))
        return AsyncChatstateStateStorage(service, close_service=True)
    backend = AsyncRedisBackend.from_url(str(where), namespace=f"t{uuid.uuid4().hex[:12]}")
    return AsyncChatstateStateStorage(AsyncStateService(backend), close_service=True)


def _talk(storage: Any, script: list[str]) -> list[tuple[int, str]]:
    """Two users talk to the sync example at once, message by message; what did it send?"""
    bot, sent = custom_states.bot, []
    bot.current_states = storage
    bot.send_message = _recorder(sent)
    update_ids = itertools.count(1)
    for text in script:
        for chat_id in (7, 8):
            bot.process_new_updates([_update(next(update_ids), text, chat_id)])
    return sent


async def _atalk(storage: Any, script: list[str]) -> list[tuple[int, str]]:
    """The same with the asyncio example (each step's two updates handled concurrently)."""
    bot, sent = async_custom_states.bot, []
    bot.current_states = storage
    record = _recorder(sent)

    async def send_message(chat_id: int, text: str, **options: Any) -> types.Message:
        return record(chat_id, text, **options)

    bot.send_message = send_message
    update_ids = itertools.count(1)
    for text in script:
        await bot.process_new_updates([_update(next(update_ids), text, c) for c in (7, 8)])
    return sent


def _check_sync(storage: Any, script: list[str]) -> None:
    ours = _talk(storage, script)
    assert ours == _talk(StateMemoryStorage(), script)
    if script is FORM:
        summary = ours[-1][1]
        for line in ("First Name: Ana", "Age: 30", "Favorite Color: Blue", "Hobby: Reading"):
            assert line in summary
    assert storage.get_state(7, 7) is None  # the conversation ended: its key is deleted
    assert storage.get_data(8, 8) == {}
    storage.close()


def _check_async(storage: Any, script: list[str]) -> None:
    async def main() -> tuple[list[tuple[int, str]], Any, Any]:
        ours = await _atalk(storage, script)
        state, data = await storage.get_state(7, 7), await storage.get_data(8, 8)
        await storage.close()
        return ours, state, data

    ours, state, data = asyncio.run(main())
    theirs = asyncio.run(_atalk(AsyncStateMemoryStorage(), script))
    assert sorted(ours) == sorted(theirs)  # each step's two users are handled concurrently
    if script is FORM:
        assert any("First Name: Ana" in text and "Age: 30" in text for _, text in ours)
    assert (state, data) == (None, {})  # the conversations ended: their keys are deleted


SCRIPTS = pytest.mark.parametrize("script", [FORM, CANCEL], ids=["form", "cancel"])


@SCRIPTS
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_sync_example_talks_as_on_telebots_memory_storage(
    kind: str, script: list[str], tmp_path: Path
) -> None:
    """examples/custom_states.py on chatstate sends what it sends on StateMemoryStorage."""
    _check_sync(_sync_storage(kind, tmp_path), script)


@SCRIPTS
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_the_async_example_talks_as_on_telebots_memory_storage(
    kind: str, script: list[str], tmp_path: Path
) -> None:
    """examples/asynchronous_telebot/custom_states.py on chatstate, the same."""
    _check_async(_async_storage(kind, tmp_path), script)


@SCRIPTS
@pytest.mark.redis
def test_both_examples_on_redis(redis_url: str, script: list[str]) -> None:
    """Both examples on Redis send what they send on StateMemoryStorage."""
    _check_sync(_sync_storage("redis", redis_url), script)
    _check_async(_async_storage("redis", redis_url), script)
