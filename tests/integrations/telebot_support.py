"""What the telebot tests play: Telegram updates, a bot that records its sends, services per backend.

Updates are built with telebot's own ``Update.de_json`` from the JSON the Bot
API sends, so a handler sees what it would see in production. A bot's
``send_message`` is replaced on the instance by :func:`record_sends`: nothing
leaves the process.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from telebot import types

from chatstate import (
    AsyncMemoryBackend,
    AsyncRedisBackend,
    AsyncSqliteBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    SqliteBackend,
    StateService,
)

TOKEN = "42:TEST-TOKEN-never-sent"
BOT_ID = 42
USER = {"id": 7, "is_bot": False, "first_name": "Ana"}

SyncFactory = Callable[[], StateService]
AsyncFactory = Callable[[], AsyncStateService]


def message(
    message_id: int, text: str, *, chat_id: int = 7, edit_date: int | None = None
) -> dict[str, Any]:
    """A private-chat text message as the Bot API sends it (a command gets its entity)."""
    body: dict[str, Any] = {
        "message_id": message_id,
        "date": 1_700_000_000,
        "chat": {"id": chat_id, "type": "private"},
        "from": {**USER, "id": chat_id},
        "text": text,
    }
    if text.startswith("/"):
        body["entities"] = [
            {"type": "bot_command", "offset": 0, "length": len(text.split(maxsplit=1)[0])}
        ]
    if edit_date is not None:
        body["edit_date"] = edit_date
    return body


def update(update_id: int, text: str, *, message_id: int | None = None, **kw: Any) -> types.Update:
    """An update carrying a new message (``message_id`` defaults to ``update_id``)."""
    body = message(message_id or update_id, text, **kw)
    return types.Update.de_json({"update_id": update_id, "message": body})


def edited(update_id: int, message_id: int, text: str, edit_date: int) -> types.Update:
    """An update carrying an edit of message ``message_id``."""
    body = message(message_id, text, edit_date=edit_date)
    return types.Update.de_json({"update_id": update_id, "edited_message": body})


def callback(update_id: int, query_id: str, data: str) -> types.Update:
    """An update carrying a button press under a bot message."""
    query = {
        "id": query_id,
        "from": USER,
        "chat_instance": "ci",
        "data": data,
        "message": {**message(900, "menu"), "from": {**USER, "id": BOT_ID, "is_bot": True}},
    }
    return types.Update.de_json({"update_id": update_id, "callback_query": query})


def record_sends(bot: Any) -> list[tuple[int, str]]:
    """Replace ``bot.send_message`` with a recorder; return the list it appends ``(chat, text)`` to."""
    sent: list[tuple[int, str]] = []
    ids = itertools.count(1000)

    def send_message(chat_id: int, text: str, *args: Any, **kwargs: Any) -> types.Message:
        sent.append((chat_id, text))
        return types.Message.de_json(message(next(ids), text, chat_id=chat_id))

    async def async_send_message(chat_id: int, text: str, *args: Any, **kwargs: Any) -> Any:
        return send_message(chat_id, text)

    is_async = type(bot).__name__ == "AsyncTeleBot"
    bot.send_message = async_send_message if is_async else send_message
    return sent


def sync_factory(kind: str, tmp_path: Path, redis_url: str | None) -> SyncFactory:
    """Services of one kind over one shared store (two 'processes' share it)."""
    if kind == "memory":
        store = MemoryBackend()
        return lambda: StateService(store)
    if kind == "sqlite":
        path = tmp_path / f"{uuid.uuid4().hex}.db"
        return lambda: StateService(SqliteBackend(path))
    assert redis_url is not None
    namespace = f"t{uuid.uuid4().hex[:12]}"
    return lambda: StateService(RedisBackend.from_url(redis_url, namespace=namespace))


def async_factory(kind: str, tmp_path: Path, redis_url: str | None) -> AsyncFactory:
    """The asyncio twin of :func:`sync_factory`."""
    if kind == "memory":
        store = AsyncMemoryBackend()
        return lambda: AsyncStateService(store)
    if kind == "sqlite":
        path = tmp_path / f"{uuid.uuid4().hex}.db"
        return lambda: AsyncStateService(AsyncSqliteBackend(path))
    assert redis_url is not None
    namespace = f"t{uuid.uuid4().hex[:12]}"
    return lambda: AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
