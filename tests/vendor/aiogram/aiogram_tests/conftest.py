"""Fixtures for aiogram v3.31.0's FSM storage tests, pointed at chatstate's storage.

chatstate's replacement for the parts of aiogram's ``tests/conftest.py`` these
tests use (see README.md): the storages and isolations they are parametrized
over are ``ChatstateStorage`` and ``ChatstateEventIsolation``, on the memory
backend and on a throwaway redis-server (``tests/servers.py``; ``REDIS_URL``
points them at another server, a namespace per test, as for the rest of the
suite); aiogram's ``MemoryStorage`` and ``SimpleEventIsolation``, where a test
or the ``Dispatcher`` makes one, are ours too; a small runner for ``async def``
tests (aiogram uses pytest-asyncio, which chatstate's suite does not); and the
tests that fail for reasons other than the storage marked here, each with its
reason.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiogram.fsm.storage.base import StorageKey
from aiogram.fsm.storage.memory import DisabledEventIsolation

import servers
from chatstate import AsyncMemoryBackend, AsyncRedisBackend, AsyncStateService
from chatstate.integrations.aiogram import ChatstateEventIsolation, ChatstateStorage

from .mocked_bot import MockedBot

HERE = Path(__file__).parent
CHAT_ID = -42
USER_ID = 42

# Test (its bare name) -> why it fails on ChatstateStorage: it reads aiogram internals.
XFAIL = {
    "test_address_mapping": (
        "reads and fills MemoryStorage.storage, aiogram's in-process dict of records "
        "(ChatstateStorage keeps its records in the chatstate backend)"
    ),
}
# Parameters of aiogram's storage tests that chatstate has nothing to run on.
NO_BACKEND = {"mongo_storage", "pymongo_storage"}

_CLOSERS: list[Callable[[], Awaitable[Any]]] = []  # closed inside the test's event loop


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in item.path.parents:
            continue
        name = getattr(item, "originalname", item.name)
        if name in XFAIL:
            item.add_marker(pytest.mark.xfail(strict=True, reason=XFAIL[name]))
        if "redis" in item.name:
            item.add_marker(pytest.mark.redis)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test in an event loop of its own, then close what it opened."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def main() -> None:
        try:
            await pyfuncitem.obj(**kwargs)
        finally:
            while _CLOSERS:
                await _CLOSERS.pop()()

    asyncio.run(main())
    return True


@pytest.fixture(scope="session")
def aiogram_redis_url() -> Iterator[str]:
    """A throwaway redis-server for the session (or the suite's REDIS_URL, namespaced)."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    if servers.find_binary("redis") is None:
        message = "no redis server binary: cannot run aiogram's storage tests on Redis"
        if os.environ.get("CI") or os.environ.get("CHATSTATE_REQUIRE_SERVERS"):
            pytest.fail(message)
        pytest.skip(message)
    server = servers.start_server("redis")
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def memory_backend() -> AsyncMemoryBackend:
    """The test's memory store: every storage and isolation of the test shares it."""
    return AsyncMemoryBackend()


@pytest.fixture(autouse=True)
def _aiogram_memory_is_chatstate(
    request: pytest.FixtureRequest, memory_backend: AsyncMemoryBackend, monkeypatch: Any
) -> None:
    """Make aiogram's MemoryStorage and SimpleEventIsolation ours (in tests and Dispatcher)."""

    def storage(*_: Any, **__: Any) -> ChatstateStorage:
        return ChatstateStorage(AsyncStateService(memory_backend))

    def isolation(*_: Any, **__: Any) -> ChatstateEventIsolation:
        return ChatstateEventIsolation(AsyncStateService(memory_backend))

    monkeypatch.setattr("aiogram.dispatcher.dispatcher.MemoryStorage", storage)
    for name, factory in (("MemoryStorage", storage), ("SimpleEventIsolation", isolation)):
        if hasattr(request.module, name):
            monkeypatch.setattr(request.module, name, factory)


@pytest.fixture
def memory_storage(memory_backend: AsyncMemoryBackend) -> ChatstateStorage:
    return ChatstateStorage(AsyncStateService(memory_backend))


@pytest.fixture
def redis_storage(aiogram_redis_url: str) -> ChatstateStorage:
    namespace = f"aiogram{uuid.uuid4().hex[:12]}"
    storage = ChatstateStorage(
        AsyncStateService(AsyncRedisBackend.from_url(aiogram_redis_url, namespace=namespace)),
        close_service=True,
    )
    _CLOSERS.append(storage.close)
    return storage


@pytest.fixture
def mongo_storage() -> None:
    pytest.skip("chatstate has no MongoDB backend")


@pytest.fixture
def pymongo_storage() -> None:
    pytest.skip("chatstate has no MongoDB backend")


@pytest.fixture
def redis_isolation(redis_storage: ChatstateStorage) -> ChatstateEventIsolation:
    return redis_storage.create_isolation()


@pytest.fixture
def lock_isolation(memory_storage: ChatstateStorage) -> ChatstateEventIsolation:
    return memory_storage.create_isolation()


@pytest.fixture
def disabled_isolation() -> DisabledEventIsolation:
    return DisabledEventIsolation()


@pytest.fixture
def bot() -> MockedBot:
    return MockedBot()


@pytest.fixture(name="storage_key")
def create_storage_key(bot: MockedBot) -> StorageKey:
    return StorageKey(chat_id=CHAT_ID, user_id=USER_ID, bot_id=bot.id)


@pytest.fixture
def storage(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)


@pytest.fixture
def isolation(request: pytest.FixtureRequest) -> Any:
    return request.getfixturevalue(request.param)
