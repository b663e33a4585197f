"""Fixtures for python-telegram-bot v22.8's persistence tests, pointed at ChatstatePersistence.

chatstate's replacement for the parts of PTB's ``tests/conftest.py`` and
``tests/ext/conftest.py`` these tests use (see README.md): a made-up offline
bot, a throwaway Redis per session with a namespace per test, a small runner
for ``async def`` tests (PTB uses pytest-asyncio, which chatstate's suite does
not), and the tests that fail for reasons other than the persistence marked
here, each with its reason.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from telegram.ext import ApplicationBuilder

import servers

from .ptb_auxil import chatstate_store
from .ptb_auxil.ci_bots import BOT_INFO_PROVIDER
from .ptb_auxil.monkeypatch import return_true
from .ptb_auxil.pytest_classes import PytestApplication, make_bot

HERE = Path(__file__).parent

MUST_RUN = bool(os.environ.get("CI")) or bool(os.environ.get("CHATSTATE_REQUIRE_SERVERS"))


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# python-telegram-bot's extras these tests need, as PTB's own CI installs them.
EXTRAS = {"cachetools": "callback-data", "apscheduler": "job-queue"}
MISSING = [extra for module, extra in EXTRAS.items() if not _installed(module)]

# As PTB's own pyproject.toml (its suite runs with filterwarnings "error" too).
PTB_IGNORES = (
    r"ignore:Tasks created via `Application\.create_task` while the application is not running"
)

# Test (name as pytest shows it, parameters included, or its bare name) -> why it is skipped.
SKIP = {
    "test_update_interval": (
        "times PTB's own update loop over 5 s with update_persistence monkeypatched (the "
        "persistence is not involved); marked flaky upstream"
    ),
}

# Test -> why it fails on ChatstatePersistence: it reads PTB internals (strict: it must fail).
XFAIL: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "flaky: PTB's rerun marker (no rerun plugin here)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in item.path.parents:
            continue
        item.add_marker(pytest.mark.redis)
        item.add_marker(pytest.mark.filterwarnings(PTB_IGNORES))
        name = getattr(item, "originalname", item.name)
        for key in (item.name, name):
            if key in SKIP:
                item.add_marker(pytest.mark.skip(reason=SKIP[key]))
            if key in XFAIL:
                item.add_marker(pytest.mark.xfail(strict=True, reason=XFAIL[key]))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test in an event loop of its own, then close its connections."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def main() -> None:
        try:
            await pyfuncitem.obj(**kwargs)
        finally:
            await chatstate_store.current().aclose()

    asyncio.run(main())
    return True


@pytest.fixture(scope="session")
def ptb_redis_url() -> Iterator[str]:
    """A throwaway redis-server for the session (or the suite's REDIS_URL, namespaced)."""
    external = os.environ.get("REDIS_URL")
    if external:
        yield external
        return
    if servers.find_binary("redis") is None:
        message = "no redis server binary: cannot run PTB's persistence tests"
        if os.environ.get("CI") or os.environ.get("CHATSTATE_REQUIRE_SERVERS"):
            pytest.fail(message)
        pytest.skip(message)
    server = servers.start_server("redis")
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _chatstate_store(ptb_redis_url: str) -> Iterator[chatstate_store.Store]:
    """A namespace of its own for each test; its connections closed after it."""
    if MISSING:
        message = f"PTB's persistence tests need python-telegram-bot[{','.join(MISSING)}]"
        if MUST_RUN:
            pytest.fail(message)
        pytest.skip(message)
    store = chatstate_store.Store(ptb_redis_url, f"ptb{uuid.uuid4().hex[:12]}")
    chatstate_store.STORE = store
    try:
        yield store
    finally:
        asyncio.run(store.aclose())
        chatstate_store.STORE = None


@pytest.fixture(scope="session")
def bot_info() -> dict[str, object]:
    return BOT_INFO_PROVIDER.get_info()


@pytest.fixture
def bot(bot_info):
    """PTB's ``tests/ext`` ``bot``: an offline ExtBot (only its token is used here)."""
    return make_bot(bot_info, offline=True)


@pytest.fixture(scope="session")
def chat_id(bot_info):
    return bot_info["chat_id"]


@pytest.fixture
def app(bot_info, monkeypatch):
    application = (
        ApplicationBuilder()
        .bot(make_bot(bot_info, offline=True))
        .application_class(PytestApplication)
        .build()
    )
    monkeypatch.setattr(application.bot, "delete_webhook", return_true)
    monkeypatch.setattr(application.bot, "set_webhook", return_true)
    return application
