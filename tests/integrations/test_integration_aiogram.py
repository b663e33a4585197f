"""chatstate under aiogram 3: the FSM storage, its key builder, event isolation and dedupe.

The storage runs the same call sequences as aiogram's own ``MemoryStorage`` and
must answer alike; concurrent ``update_data`` calls (tasks and processes) must
all land, while aiogram's ``RedisStorage`` under the same test loses updates
(the negative control). A real ``Dispatcher`` is fed real ``Update`` objects;
its bot's session records requests instead of sending them (no network).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import multiprocessing
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import unicodedata
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.session.base import BaseSession
from aiogram.exceptions import DataNotDictLikeError
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.fsm.scene import Scene, SceneRegistry, on
from aiogram.fsm.state import State, StatesGroup, any_state, default_state
from aiogram.fsm.storage.base import BaseStorage, DefaultKeyBuilder, StorageKey
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.fsm.storage.redis import RedisStorage
from aiogram.methods import SendMessage, TelegramMethod
from aiogram.types import CallbackQuery, Chat, Message, Update, User
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

import chatstate
from chatstate import AsyncMemoryBackend, AsyncRedisBackend, AsyncStateService
from chatstate.exceptions import ConfigurationError, SerializationError
from chatstate.integrations.aiogram import (
    ChatstateDedupeMiddleware,
    ChatstateEventIsolation,
    ChatstateKeyBuilder,
    ChatstateStorage,
    dedupe_key,
)
from strategies import canonical, json_values, keys

BOT_TOKEN = "42:TEST-TOKEN"
KEY = StorageKey(bot_id=42, chat_id=-100, user_id=7)
TASKS = 50
PROCESSES = 4
HANG_GUARD = 600  # seconds: a guard against a hang, never a pace
ROUNDS = 25


# -- helpers ---------------------------------------------------------------------------


ServiceFactory = Callable[[], AsyncStateService]


class RecordingSession(BaseSession):
    """A bot session that records every API call and answers it locally (no network)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[TelegramMethod[Any]] = []
        self._ids = itertools.count(1000)

    async def make_request(
        self,
        bot: Bot,
        method: TelegramMethod[Any],
        timeout: int | None = None,  # noqa: ASYNC109 - aiogram's signature
    ) -> Any:
        self.requests.append(method)
        if isinstance(method, SendMessage):
            chat = Chat(id=int(method.chat_id), type="private")
            sent = Message(message_id=next(self._ids), date=_now(), chat=chat, text=method.text)
            return sent.as_(bot)
        return True

    async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    @property
    def texts(self) -> list[str]:
        return [m.text for m in self.requests if isinstance(m, SendMessage)]


def _now() -> datetime:
    return datetime.now(UTC)


_USER = User(id=7, is_bot=False, first_name="Ana")


def message_update(update_id: int, text: str, *, message_id: int | None = None) -> Update:
    chat = Chat(id=7, type="private")
    message = Message(
        message_id=message_id or update_id, date=_now(), chat=chat, from_user=_USER, text=text
    )
    return Update(update_id=update_id, message=message)


class Form(StatesGroup):
    name = State()
    age = State()


def form_router(calls: list[str] | None = None) -> Router:
    """The classic aiogram form: /start asks a name, then an age, then sums up."""
    router = Router()

    @router.message(Command("start"))
    async def start(message: Message, state: FSMContext) -> None:
        if calls is not None:
            calls.append("start")
        await state.set_state(Form.name)
        await message.answer("What is your name?")

    @router.message(Form.name)
    async def name(message: Message, state: FSMContext) -> None:
        await state.update_data(name=message.text)
        await state.set_state(Form.age)
        await message.answer("How old are you?")

    @router.message(Form.age)
    async def age(message: Message, state: FSMContext) -> None:
        data = await state.update_data(age=message.text)
        await state.clear()
        await message.answer(f"{data['name']} is {data['age']}")

    return router


def build_dispatcher(
    service: AsyncStateService, *routers: Router, dedupe: bool | str = False
) -> tuple[Dispatcher, Bot, RecordingSession]:
    """A dispatcher on ``service``; ``dedupe``: True (``setup``) or ``"outer"`` (the old line)."""
    storage = ChatstateStorage(service)
    dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
    if dedupe == "outer":
        dp.update.outer_middleware(ChatstateDedupeMiddleware(service))
    elif dedupe:
        ChatstateDedupeMiddleware(service).setup(dp)
    for router in routers:
        dp.include_router(router)
    session = RecordingSession()
    return dp, Bot(BOT_TOKEN, session=session), session


# -- the key builder -------------------------------------------------------------------

_texts = st.sampled_from(["", ":", "%", "%3A", "a:b", "a", "d", "\u00e9", "e\u0301", "t1", "/"])
storage_keys = st.builds(
    StorageKey,
    bot_id=st.sampled_from([1, 2, 12, -1]),
    chat_id=st.sampled_from([1, 2, 21, -1, -100]),
    user_id=st.sampled_from([1, 2, 11, -1]),
    thread_id=st.sampled_from([None, 0, 1, -1]),
    business_connection_id=st.none() | _texts,
    destiny=st.sampled_from(["default", "scenes_history"]) | _texts,
)


@given(st.lists(storage_keys, unique=True, min_size=2, max_size=30))
def test_key_builder_is_injective_over_the_whole_key(keys_: list[StorageKey]) -> None:
    """Distinct storage keys (any field, separators and Unicode forms inside) give distinct ids."""
    build = ChatstateKeyBuilder().build
    ids = [build(k) for k in keys_]
    assert len(set(ids)) == len(ids)
    for user_id in ids:
        assert unicodedata.normalize("NFC", user_id) == user_id


@given(storage_keys, storage_keys, st.sampled_from(list(StorageKey.__dataclass_fields__)))
def test_key_builder_tells_apart_keys_differing_in_one_field(
    a: StorageKey, b: StorageKey, field: str
) -> None:
    """Changing any single field of a key (thread None to 0, one destiny to another) changes its id."""
    changed = dataclasses.replace(a, **{field: getattr(b, field)})
    build = ChatstateKeyBuilder().build
    assert (build(changed) == build(a)) == (changed == a)


def test_default_key_builder_is_not_injective() -> None:
    """Aiogram's DefaultKeyBuilder merges keys ours keeps apart (why we do not use it by default)."""
    a = StorageKey(1, 2, 3, thread_id=None)
    b = StorageKey(1, 2, 3, thread_id=0)
    c = StorageKey(1, 2, 3, business_connection_id="x")
    assert DefaultKeyBuilder().build(a) == DefaultKeyBuilder().build(b)
    assert DefaultKeyBuilder().build(a) == DefaultKeyBuilder().build(c)
    ours = ChatstateKeyBuilder()
    assert len({ours.build(a), ours.build(b), ours.build(c)}) == 3


def test_key_builder_options_mirror_default_key_builder() -> None:
    """prefix, separator and the with_* switches behave like DefaultKeyBuilder's."""
    key = StorageKey(1, 2, 3, business_connection_id="bc", destiny="quiz")
    assert ChatstateKeyBuilder().build(key) == "fsm:1:2:3:bbc:dquiz"
    assert ChatstateKeyBuilder().build(key, "lock") == "fsm:1:2:3:bbc:dquiz:plock"
    slim = ChatstateKeyBuilder(prefix="bot", separator="/", with_bot_id=False)
    assert slim.build(key) == "bot/2/3/bbc/dquiz"
    assert ChatstateKeyBuilder(with_business_connection_id=False).build(key) == "fsm:1:2:3:dquiz"
    with pytest.raises(ValueError, match="destiny"):
        ChatstateKeyBuilder(with_destiny=False).build(key)
    for bad in ["", "-", "a", "%", ":a"]:
        with pytest.raises(ConfigurationError):
            ChatstateKeyBuilder(separator=bad)


def test_long_keys_fit_a_user_id() -> None:
    """The id of a key with every field set is accepted by the service as it is."""

    async def main() -> None:
        svc = AsyncStateService()
        key = StorageKey(-(2**62), -(2**62), 2**62, 2**31, "b" * 40, "scenes_history")
        user_id = ChatstateKeyBuilder().build(key)
        assert svc.manager.user_id(user_id) == user_id
        await ChatstateStorage(svc).set_state(key, "s")
        assert await svc.get(user_id) == {"state": "s"}

    asyncio.run(main())


# -- parity with aiogram's MemoryStorage -------------------------------------------------

_parity_keys = [
    StorageKey(42, 7, 7),
    StorageKey(42, 7, 7, thread_id=0),
    StorageKey(42, 7, 7, business_connection_id=""),
    StorageKey(42, 7, 7, destiny="scenes_history"),
    StorageKey(43, 7, 7),
]
_states = st.sampled_from(
    [None, "Form:name", "", "x:y", Form.name, Form.age, default_state, any_state]
)
_data = st.dictionaries(keys, json_values(8), max_size=4)
_ops = st.one_of(
    st.tuples(st.just("set_state"), st.integers(0, 4), _states),
    st.tuples(st.just("get_state"), st.integers(0, 4)),
    st.tuples(st.just("set_data"), st.integers(0, 4), _data),
    st.tuples(st.just("set_data"), st.integers(0, 4), st.sampled_from([[], (), "x", None, 1])),
    st.tuples(st.just("get_data"), st.integers(0, 4)),
    st.tuples(st.just("get_value"), st.integers(0, 4), keys, json_values(2)),
    st.tuples(st.just("update_data"), st.integers(0, 4), _data),
    st.tuples(st.just("fsm_update"), st.integers(0, 4), _data, _data),
    st.tuples(st.just("clear"), st.integers(0, 4)),
)


async def _run(storage: BaseStorage, op: tuple[Any, ...]) -> str:
    """Apply one call; return its result (or error type) as canonical text."""
    name, index, *args = op
    key = _parity_keys[index]
    ctx = FSMContext(storage, key)
    try:
        if name == "set_state":
            result: Any = await storage.set_state(key, args[0])
        elif name == "get_state":
            result = await storage.get_state(key)
        elif name == "set_data":
            result = await storage.set_data(key, args[0])
        elif name == "get_data":
            result = await storage.get_data(key)
        elif name == "get_value":
            result = await storage.get_value(key, args[0], args[1])
        elif name == "update_data":
            result = await storage.update_data(key, args[0])
        elif name == "fsm_update":
            result = await ctx.update_data(args[0], **args[1])
        else:
            result = await ctx.clear()
    except DataNotDictLikeError:
        return "DataNotDictLikeError"
    return canonical(result)


async def _dump(storage: BaseStorage) -> list[str]:
    out = []
    for key in _parity_keys:
        out += [canonical(await storage.get_state(key)), canonical(await storage.get_data(key))]
    return out


def _parity(make_service: ServiceFactory, ops: list[tuple[Any, ...]]) -> None:
    async def main() -> None:
        theirs = MemoryStorage()
        ours = ChatstateStorage(make_service(), close_service=True)
        for op in ops:
            assert await _run(ours, op) == await _run(theirs, op), op
        assert await _dump(ours) == await _dump(theirs)
        await ours.close()

    asyncio.run(main())


@settings(max_examples=60)
@given(ops=st.lists(_ops, max_size=25))
def test_parity_with_memory_storage(ops: list[tuple[Any, ...]]) -> None:
    """Every call sequence gives MemoryStorage's results, call by call and at the end (memory)."""
    store = AsyncMemoryBackend()
    _parity(lambda: AsyncStateService(store), ops)


@pytest.mark.redis
def test_parity_with_memory_storage_on_redis(redis_url: str) -> None:
    """The same call sequences on Redis give MemoryStorage's results too."""

    @settings(max_examples=25)
    @given(ops=st.lists(_ops, max_size=25))
    def check(ops: list[tuple[Any, ...]]) -> None:
        namespace = f"t{uuid.uuid4().hex[:12]}"
        _parity(
            lambda: AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace)),
            ops,
        )

    check()


@pytest.mark.parametrize(
    "calls",
    [
        [("update_data", {"a": None})],
        [("update_data", {"a": {"x": 1, "y": 2}}), ("update_data", {"a": {"z": 3}})],
        [("update_data", {"a": 1, "b": 2}), ("set_data", {})],
        [("set_data", {"a.b": [1, None]}), ("update_data", {"": 0})],
    ],
    ids=["none-is-stored", "nested-dict-replaces", "set-data-empties", "odd-keys"],
)
def test_documented_dict_update_semantics(calls: list[tuple[str, dict[str, Any]]]) -> None:
    """The cases aiogram's contract spells out answer exactly as MemoryStorage answers."""

    async def main() -> None:
        ours, theirs = ChatstateStorage(AsyncStateService()), MemoryStorage()
        for name, arg in calls:
            for storage in (ours, theirs):
                await getattr(storage, name)(KEY, arg)
            assert await ours.get_data(KEY) == await theirs.get_data(KEY)
        assert await ours.get_state(KEY) is None

    asyncio.run(main())


def test_layout_is_one_document_per_key() -> None:
    """State and data of a key live in one document; clearing both leaves it empty."""

    async def main() -> None:
        svc = AsyncStateService()
        storage = ChatstateStorage(svc)
        await storage.set_state(KEY, Form.name)
        await storage.update_data(KEY, {"n": 1})
        assert await svc.get(storage.user_id(KEY)) == {"state": "Form:name", "data": {"n": 1}}
        await FSMContext(storage, KEY).clear()
        assert await svc.get(storage.user_id(KEY)) == {}

    asyncio.run(main())


def test_erase_user_refuses_a_key_builder_it_cannot_read_back() -> None:
    """DefaultKeyBuilder's ids cannot be parsed: a ConfigurationError, nothing erased."""

    async def main() -> dict[str, Any]:
        storage = ChatstateStorage(AsyncStateService(), key_builder=DefaultKeyBuilder())
        await storage.update_data(KEY, {"n": 1})
        with pytest.raises(ConfigurationError, match="nothing was erased"):
            await storage.erase_user(KEY.user_id)
        return await storage.get_data(KEY)

    assert asyncio.run(main()) == {"n": 1}


def test_non_json_data_is_refused_before_anything_is_stored() -> None:
    """A set, a datetime or a non-str key raises SerializationError; the data stays as it was."""

    async def main() -> None:
        storage = ChatstateStorage(AsyncStateService())
        await storage.set_data(KEY, {"a": 1})
        with pytest.raises(SerializationError):
            await storage.update_data(KEY, {"b": 2, "c": (1, {2})})
        with pytest.raises(SerializationError):
            await storage.update_data(KEY, {"b": 2, "c": [_now()]})
        with pytest.raises(SerializationError):
            await storage.set_data(KEY, {1: "x"})
        with pytest.raises(SerializationError):
            await storage.set_data(KEY, {Step.NAME: "x"})  # an int key, as the enum's value
        assert await storage.get_data(KEY) == {"a": 1}

    asyncio.run(main())


class Step(enum.IntEnum):
    NAME = 1
    AGE = 2


class Color(enum.StrEnum):
    RED = "red"


class Mode(str, enum.Enum):  # noqa: UP042 - the older spelling, still common
    FAST = "fast"


class Plain(enum.Enum):
    ONE = (1, "one")


# What aiogram's RedisStorage stores (json.dumps): enum members as values, tuples as lists.
FRAMEWORK_VALUES: dict[str, Any] = {
    "step": Step.AGE,
    "color": Color.RED,
    "mode": Mode.FAST,
    "pair": (1, 2),
    "nested": {"t": ((1,), [Step.NAME]), Color.RED: "a str enum key"},
}
AS_STORED: dict[str, Any] = {
    "step": 2,
    "color": "red",
    "mode": "fast",
    "pair": [1, 2],
    "nested": {"t": [[1], [1]], "red": "a str enum key"},
}


def test_enum_members_and_tuples_are_stored_as_their_json() -> None:
    """update_data, set_data and set_state take enum members and tuples, stored as JSON values."""

    async def main() -> None:
        storage = ChatstateStorage(AsyncStateService())
        ctx = FSMContext(storage, KEY)
        returned = await ctx.update_data(FRAMEWORK_VALUES, plain=Plain.ONE)
        assert returned == await ctx.get_data() == {**AS_STORED, "plain": [1, "one"]}
        assert returned["step"] == Step.AGE  # an IntEnum member equals its value
        await ctx.set_data({"again": (Mode.FAST,)})
        assert await ctx.get_data() == {"again": ["fast"]}
        await ctx.set_state(Color.RED)
        assert await ctx.get_state() == "red"
        doc = await storage.service.get(storage.user_id(KEY))
        assert doc == {"state": "red", "data": {"again": ["fast"]}}

    asyncio.run(main())


@pytest.mark.redis
def test_enums_and_tuples_read_back_as_aiogram_redis_storage_reads_them(
    redis_url: str, namespace: str
) -> None:
    """The values RedisStorage accepts come back from ours exactly as from RedisStorage."""

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        theirs = RedisStorage(
            Redis.from_url(redis_url), key_builder=DefaultKeyBuilder(prefix=namespace)
        )
        ours = ChatstateStorage.from_url(redis_url, namespace=namespace)
        got = []
        for storage in (theirs, ours):
            await FSMContext(storage, KEY).update_data(FRAMEWORK_VALUES)
            got.append(await storage.get_data(KEY))
        await theirs.redis.aclose()
        await ours.close()
        return got[0], got[1]

    from_theirs, from_ours = asyncio.run(main())
    assert from_theirs == from_ours == AS_STORED


def test_returned_data_is_a_private_copy() -> None:
    """Changing what get_data or update_data returned changes nothing stored."""

    async def main() -> None:
        storage = ChatstateStorage(AsyncStateService())
        got = await storage.update_data(KEY, {"cart": {"items": [1]}})
        got["cart"]["items"].append(2)
        (await storage.get_data(KEY))["cart"]["x"] = 1
        (await storage.get_value(KEY, "cart"))["items"].append(3)
        assert await storage.get_data(KEY) == {"cart": {"items": [1]}}

    asyncio.run(main())


def test_close_closes_only_an_owned_service(redis_url: str, namespace: str) -> None:
    """close() leaves a service passed in open and closes the one from_url made."""

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        await ChatstateStorage(svc).close()
        await svc.update("u", {"still": "open"})
        await svc.aclose()
        owned = ChatstateStorage.from_url(redis_url, namespace=namespace)
        await owned.set_state(KEY, "s")
        assert await owned.get_state(KEY) == "s"
        await owned.close()

    asyncio.run(main())


def test_importing_chatstate_imports_no_framework() -> None:
    """Importing chatstate and chatstate.integrations loads no aiogram, telegram or starlette."""
    import subprocess
    import sys

    code = (
        "import sys, chatstate, chatstate.integrations;"
        "bad = [m for m in ('aiogram', 'telegram', 'starlette', 'fastapi') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert chatstate.__name__ == "chatstate"


# -- concurrent update_data: nothing lost; aiogram's RedisStorage loses --------------------


def _with_read_barrier(cls: type[BaseStorage], wait: Callable[[], Any]) -> type[BaseStorage]:
    """``cls`` whose get_data waits at a barrier after reading: every reader reads first."""

    class Barriered(cls):  # type: ignore[valid-type,misc]
        async def get_data(self, key: StorageKey) -> dict[str, Any]:
            data = await super().get_data(key)
            result = wait()
            if asyncio.iscoroutine(result):
                await result
            return data

    return Barriered


def _storage(kind: str, url: str | None, namespace: str, wait: Callable[[], Any]) -> BaseStorage:
    if kind == "aiogram-redis":
        cls = _with_read_barrier(RedisStorage, wait)
        assert url is not None
        return cls(Redis.from_url(url), key_builder=DefaultKeyBuilder(prefix=namespace))
    cls = _with_read_barrier(ChatstateStorage, wait)
    if kind == "chatstate-memory":
        return cls(AsyncStateService(), close_service=True)
    assert url is not None
    backend = AsyncRedisBackend.from_url(url, namespace=namespace)
    return cls(AsyncStateService(backend), close_service=True)


async def _fifty_tasks(kind: str, url: str | None) -> int:
    """Run 50 concurrent FSMContext.update_data calls of distinct keys; return how many were lost."""
    barrier = asyncio.Barrier(TASKS)
    storage = _storage(kind, url, f"t{uuid.uuid4().hex[:12]}", barrier.wait)
    ctx = FSMContext(storage, KEY)
    await asyncio.gather(*(ctx.update_data({f"k{i}": i}) for i in range(TASKS)))
    got = await _raw_data(storage)
    await storage.close()
    return TASKS - len(got)


def test_fifty_tasks_update_data_lose_nothing_on_memory() -> None:
    """50 tasks' FSMContext.update_data on one key all land (memory backend).

    Every reader waits at a barrier until all 50 have read: the interleaving
    that loses updates is forced, not left to timing. Our update_data never
    reads, so the barrier never closes on it.
    """
    assert asyncio.run(_fifty_tasks("chatstate-memory", None)) == 0


@pytest.mark.redis
@pytest.mark.parametrize(("kind", "lost"), [("chatstate-redis", 0), ("aiogram-redis", TASKS - 1)])
def test_fifty_tasks_update_data_lose_nothing_on_redis(
    redis_url: str, kind: str, lost: int
) -> None:
    """Ours keeps all 50 tasks' keys on Redis; aiogram's RedisStorage keeps 1 of 50 (control)."""
    assert asyncio.run(_fifty_tasks(kind, redis_url)) == lost


async def _raw_data(storage: BaseStorage) -> dict[str, Any]:
    """The key's data read past the barrier."""
    return await type(storage).__mro__[1].get_data(storage, KEY)  # type: ignore[no-any-return]


def _process_worker(kind: str, url: str, namespace: str, proc: int, barrier: Any) -> None:
    async def main() -> None:
        storage = _storage(kind, url, namespace, barrier.wait)
        ctx = FSMContext(storage, KEY)
        for i in range(ROUNDS):
            await ctx.update_data({f"p{proc}-{i}": i})
        await storage.close()

    asyncio.run(main())


@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chatstate-redis", "aiogram-redis"])
def test_four_processes_update_data_lose_nothing(redis_url: str, namespace: str, kind: str) -> None:
    """4 processes x 25 update_data calls on one key all land; RedisStorage loses some.

    As above, a reader waits until all 4 processes have read, so RedisStorage
    loses at least the other 3 processes' last keys whatever the timing.
    """
    ctx = multiprocessing.get_context("spawn")
    # The timeouts only keep a dead process from hanging the run: a spawned process
    # importing aiogram on a loaded machine can take most of a minute to reach the
    # barrier (60 s failed once so), and the barrier decides the interleaving, not time.
    barrier = ctx.Barrier(PROCESSES, timeout=HANG_GUARD)
    procs = [
        ctx.Process(target=_process_worker, args=(kind, redis_url, namespace, p, barrier))
        for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_GUARD)
        assert p.exitcode == 0

    async def read() -> int:
        storage = _storage(kind, redis_url, namespace, lambda: None)
        got = await _raw_data(storage)
        await storage.close()
        return len(got)

    kept = asyncio.run(read())
    if kind == "aiogram-redis":
        assert kept <= PROCESSES * ROUNDS - (PROCESSES - 1)
    else:
        assert kept == PROCESSES * ROUNDS


def _free_worker(url: str, namespace: str, proc: int) -> None:
    async def main() -> None:
        storage = ChatstateStorage.from_url(url, namespace=namespace)
        ctx = FSMContext(storage, KEY)
        await asyncio.gather(*(ctx.update_data({f"p{proc}-t{i}": i}) for i in range(TASKS)))
        await storage.close()

    asyncio.run(main())


@pytest.mark.redis
@pytest.mark.slow
def test_four_processes_of_fifty_tasks_lose_nothing(redis_url: str, namespace: str) -> None:
    """4 processes x 50 concurrent tasks, free-running, leave all 200 keys in the data."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_free_worker, args=(redis_url, namespace, p)) for p in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_GUARD)
        assert p.exitcode == 0

    async def read() -> dict[str, Any]:
        storage = ChatstateStorage.from_url(redis_url, namespace=namespace)
        data = await storage.get_data(KEY)
        await storage.close()
        return data

    data = asyncio.run(read())
    assert data == {f"p{p}-t{i}": i for p in range(PROCESSES) for i in range(TASKS)}


# -- event isolation -------------------------------------------------------------------------


def test_isolation_lets_other_keys_run_alongside() -> None:
    """Holding one key's lock does not block another key."""

    async def main() -> None:
        isolation = ChatstateEventIsolation(AsyncStateService())
        async with isolation.lock(KEY), isolation.lock(StorageKey(42, -100, 8)):
            pass
        await isolation.close()

    asyncio.run(main())


def test_isolation_needs_no_backend_locks() -> None:
    """A backend with only load/apply (no lock()) isolates too: the lock is a claim, a write."""

    class NoLocks:
        def __init__(self) -> None:
            self.store = AsyncMemoryBackend()

        async def load(self, user_id: str) -> Any:
            return await self.store.load(user_id)

        async def apply(self, user_id: str, write: Any) -> Any:
            return await self.store.apply(user_id, write)

        async def aclose(self) -> None:
            pass

    async def main() -> list[str]:
        isolation = ChatstateEventIsolation(AsyncStateService(NoLocks()), wait=5)
        order: list[str] = []
        first_in = asyncio.Event()

        async def first() -> None:
            async with isolation.lock(KEY):
                order.append("first in")
                first_in.set()
                await asyncio.sleep(0)  # the second is waiting meanwhile, not running
                await asyncio.sleep(0)
                order.append("first out")

        async def second() -> None:
            await first_in.wait()
            async with isolation.lock(KEY):
                order.append("second in")

        await asyncio.gather(first(), second())
        await isolation.close()
        return order

    assert asyncio.run(main()) == ["first in", "first out", "second in"]
    with pytest.raises(ConfigurationError):
        ChatstateEventIsolation(AsyncStateService(), wait=0)


@pytest.mark.redis
@pytest.mark.parametrize("dedupe", [True, "outer"])
def test_isolation_and_dedupe_hold_5_s_leases_by_default(
    redis_url: str, namespace: str, dedupe: bool | str
) -> None:
    """A handler's key claim (and update claim) lapse 5 s after their holder stops renewing them.

    With ``setup()`` the key's claim is the update's too: no record of its own.
    """

    async def main() -> list[int]:
        backend = AsyncRedisBackend.from_url(redis_url, namespace=namespace)
        service = AsyncStateService(backend)
        client = Redis.from_url(redis_url)
        router, seen = Router(), []

        @router.message()
        async def look(message: Message, bot: Bot) -> None:
            key = StorageKey(bot_id=bot.id, chat_id=message.chat.id, user_id=7)
            held = backend.keys(storage.user_id(key))[2]
            record = backend.keys(f"aiogram-update:{bot.id}:update:{message.message_id}")[2]
            seen.extend([await client.pttl(held), await client.pttl(record)])

        dp, bot, _ = build_dispatcher(service, router, dedupe=dedupe)
        storage = dp.storage
        assert isinstance(storage, ChatstateStorage)
        await dp.feed_update(bot, message_update(40, "hi"))
        await client.aclose()
        await service.aclose()
        return seen

    key_ttl, record_ttl = asyncio.run(main())
    assert 4000 < key_ttl <= 5000
    if dedupe == "outer":
        assert 4000 < record_ttl <= 5000
    else:
        assert record_ttl == -2  # no such key: the key's claim deduped the update


@pytest.mark.redis
def test_a_slow_handler_keeps_its_key_and_its_update_past_the_lease(
    redis_url: str, namespace: str
) -> None:
    """With a 1 s lease, a 3 s handler keeps both: its copy waits, then runs nothing."""

    async def main() -> tuple[list[int], int]:
        calls, started = [], asyncio.Event()

        async def slow(message: Message) -> None:
            calls.append(message.message_id)
            started.set()
            await asyncio.sleep(3.0)
            await message.answer("done")

        def dispatcher() -> tuple[Dispatcher, Bot, RecordingSession, AsyncStateService]:
            svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
            storage = ChatstateStorage(svc)
            dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation(lease=1.0))
            ChatstateDedupeMiddleware(svc, lease=1.0, wait=10).setup(dp)
            dp.message.register(slow)
            session = RecordingSession()
            return dp, Bot(BOT_TOKEN, session=session), session, svc

        dp_a, bot_a, sent_a, svc_a = dispatcher()
        dp_b, bot_b, sent_b, svc_b = dispatcher()
        update = message_update(41, "hi")
        first = asyncio.create_task(dp_a.feed_update(bot_a, update))
        await started.wait()
        await dp_b.feed_update(bot_b, update)  # a copy: waits past four leases, then skips
        await first
        for svc in (svc_a, svc_b):
            await svc.aclose()
        return calls, len(sent_a.texts) + len(sent_b.texts)

    calls, replies = asyncio.run(main())
    assert calls == [41]
    assert replies == 1


CRASHING_BOT = textwrap.dedent(
    """
    import asyncio, sys
    from aiogram import Bot, Dispatcher, Router
    from aiogram.fsm.context import FSMContext
    from aiogram.types import Chat, Message, Update, User
    from datetime import datetime, UTC
    from chatstate import AsyncRedisBackend, AsyncStateService
    from chatstate.integrations.aiogram import ChatstateDedupeMiddleware, ChatstateStorage

    url, namespace = sys.argv[1], sys.argv[2]
    router = Router()

    @router.message()
    async def hang(message: Message, state: FSMContext) -> None:
        await state.update_data(name="half way")
        await state.set_state("Form:age")
        print("handling", flush=True)
        await asyncio.sleep(3600)  # killed here

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(url, namespace=namespace))
        storage = ChatstateStorage(svc)
        dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
        ChatstateDedupeMiddleware(svc).setup(dp)
        dp.include_router(router)
        user = User(id=7, is_bot=False, first_name="Ana")
        message = Message(
            message_id=50, date=datetime.now(UTC), chat=Chat(id=7, type="private"),
            from_user=user, text="hi",
        )
        await dp.feed_update(Bot("42:TEST-TOKEN"), Update(update_id=50, message=message))

    asyncio.run(main())
    """
)


@pytest.mark.redis
def test_a_killed_handler_frees_its_update_and_key_within_one_lease(
    redis_url: str, namespace: str
) -> None:
    """A kill -9 mid-handler: nothing it wrote lands; the survivor reruns the update in ~5 s.

    The killed handler had set data and state: none of it is stored, so the
    redelivered update runs against the state as it was. Before, the key's lock
    had a 60 s lease: the survivor's events waited for it (and a redelivery
    gave up after the dedupe wait, dropped).
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_BOT, redis_url, namespace],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the bot never started its handler"
        assert proc.stdout.readline().strip() == "handling"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()

        async def survivor() -> tuple[list[str], list[float]]:
            svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
            dp, bot, session = build_dispatcher(svc, form_router(), dedupe=True)
            key = StorageKey(bot_id=bot.id, chat_id=7, user_id=7)
            assert await svc.get(ChatstateKeyBuilder().build(key)) == {}  # nothing landed
            handled = []
            for update in (message_update(50, "/start"), message_update(51, "Ana")):
                await dp.feed_update(bot, update)
                handled.append(time.monotonic() - killed)
            await svc.aclose()
            return session.texts, handled

        texts, handled = asyncio.run(survivor())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert texts == ["What is your name?", "How old are you?"]
    assert handled[-1] < 5.0 + 2.5, handled  # one lease, and some room for a loaded machine


# -- a real Dispatcher ------------------------------------------------------------------------


def test_a_failed_update_is_handled_again() -> None:
    """When a handler raises, the update's claim is released: a redelivery runs it again."""

    async def main() -> list[int]:
        router, attempts = Router(), []

        @router.message()
        async def flaky(message: Message) -> None:
            attempts.append(message.message_id)
            if len(attempts) == 1:
                raise RuntimeError("boom")
            await message.answer("ok")

        svc = AsyncStateService()
        dp, bot, session = build_dispatcher(svc, router, dedupe=True)
        update = message_update(20, "hi")
        with pytest.raises(RuntimeError, match="boom"):
            await dp.feed_update(bot, update)
        await dp.feed_update(bot, update)
        await dp.feed_update(bot, update)
        assert session.texts == ["ok"]
        return attempts

    assert asyncio.run(main()) == [20, 20]


def test_example_bot_runs_its_form() -> None:
    """examples/aiogram_bot.py answers a whole form, and a redelivered update only once."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from aiogram_bot import build_dispatcher as example_dispatcher

    async def main() -> list[str]:
        dp = example_dispatcher(ChatstateStorage(AsyncStateService()))
        session = RecordingSession()
        bot = Bot(BOT_TOKEN, session=session)
        for i, text in enumerate(["/start", "Ana", "Ana", "33"], start=100):
            await dp.feed_update(bot, message_update(i if text != "Ana" else 101, text))
        return session.texts

    assert asyncio.run(main()) == [
        "What is your name?",
        "How old are you?",
        "Nice to meet you, Ana (33).",
    ]


def test_example_bot_is_configured_by_the_environment(redis_url: str, namespace: str) -> None:
    """examples/aiogram_bot.py takes its token, Bot API server and Redis from the environment."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from aiogram_bot import build_bot, build_storage

    env = {
        "TELEGRAM_TOKEN": BOT_TOKEN,
        "TELEGRAM_API_URL": "http://127.0.0.1:8081/",
        "REDIS_URL": redis_url,
        "CHATSTATE_NAMESPACE": namespace,
    }
    bot = build_bot(env)
    assert bot.token == BOT_TOKEN
    assert (
        bot.session.api.api_url(BOT_TOKEN, "getMe") == f"http://127.0.0.1:8081/bot{BOT_TOKEN}/getMe"
    )
    default = build_bot({"BOT_TOKEN": BOT_TOKEN}).session.api
    assert default.api_url(BOT_TOKEN, "getMe") == f"https://api.telegram.org/bot{BOT_TOKEN}/getMe"

    async def main() -> dict[str, Any]:
        storage = build_storage(env)
        await storage.update_data(KEY, {"seen": True})
        await storage.close()
        await bot.session.close()
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        stored = await svc.get(ChatstateKeyBuilder().build(KEY))
        await svc.aclose()
        return stored

    assert asyncio.run(main()) == {"data": {"seen": True}}


def test_dedupe_keys() -> None:
    """update_id mode keys on the update; message_id mode on the message, edits and queries apart."""
    first = message_update(1, "a", message_id=5)
    again = message_update(2, "a", message_id=5)
    edited = Update(
        update_id=3,
        edited_message=Message(
            message_id=5,
            date=_now(),
            edit_date=1700000000,
            chat=Chat(id=7, type="private"),
            text="b",
        ),
    )
    query = Update(
        update_id=4, callback_query=CallbackQuery(id="q1", from_user=_USER, chat_instance="c")
    )
    assert dedupe_key(first) == "update:1"
    assert dedupe_key(first, "message_id") == dedupe_key(again, "message_id") == "message:7:5"
    assert dedupe_key(edited, "message_id") == "edited_message:7:5:e1700000000"
    assert dedupe_key(query, "message_id") == "callback_query:q1"
    assert dedupe_key(Update(update_id=9), "message_id") == "update:9"
    with pytest.raises(ConfigurationError):
        ChatstateDedupeMiddleware(AsyncStateService(), by="chat")  # type: ignore[arg-type]


def test_message_id_mode_drops_the_same_message_in_a_new_update() -> None:
    """With by='message_id', one message delivered under two update ids is handled once."""

    async def main() -> list[str]:
        svc = AsyncStateService()
        storage = ChatstateStorage(svc)
        dp = Dispatcher(storage=storage)
        ChatstateDedupeMiddleware(svc, by="message_id").setup(dp)  # no isolation: its own claims
        dp.include_router(form_router())
        session = RecordingSession()
        bot = Bot(BOT_TOKEN, session=session)
        await dp.feed_update(bot, message_update(30, "/start", message_id=3))
        await dp.feed_update(bot, message_update(31, "/start", message_id=3))
        return session.texts

    assert asyncio.run(main()) == ["What is your name?"]


class NameScene(Scene, state="name"):
    """Asks a name; /cancel leaves."""

    @on.message.enter()
    async def ask(self, message: Message) -> None:
        await message.answer("Your name?")

    @on.message(Command("cancel"))
    async def cancel(self, message: Message) -> None:
        await self.wizard.exit()

    @on.message(F.text)
    async def got_name(self, message: Message) -> None:
        await self.wizard.update_data(name=message.text)
        await self.wizard.goto(AgeScene)

    @on.message.exit()
    async def bye(self, message: Message) -> None:
        await message.answer("Bye")


class AgeScene(Scene, state="age"):
    """Asks an age; /back returns to the name, an age sums up and leaves."""

    @on.message.enter()
    async def ask(self, message: Message) -> None:
        await message.answer("Your age?")

    @on.message(Command("back"))
    async def back(self, message: Message) -> None:
        await self.wizard.back()

    @on.message(F.text)
    async def got_age(self, message: Message) -> None:
        data = await self.wizard.get_data()
        await message.answer(f"{data['name']} is {message.text}")
        await self.wizard.exit()


class _OnEveryBackend:
    """Tests that run on each backend; a subclass says how to make a service."""

    def make_service(self) -> AsyncStateService:
        """A new service over this test's store (the same store for every call)."""
        raise NotImplementedError

    def test_erase_user_erases_their_keys_in_every_bot_and_thread_only(self) -> None:
        """Keys with the user as user or chat go; another user's, in the same group, stay."""
        ana, bea, group = 7, 8, -100
        keys = {
            "private": StorageKey(1, ana, ana),
            "group": StorageKey(1, group, ana),
            "other bot, thread": StorageKey(2, group, ana, thread_id=5),
            "destiny": StorageKey(1, ana, ana, destiny="d"),
            "bea in the group": StorageKey(1, group, bea),
            "bea": StorageKey(1, bea, bea),
            "ana's id as a bot": StorageKey(ana, bea, bea),
        }

        async def main() -> tuple[list[str], dict[str, dict[str, Any]]]:
            storage = ChatstateStorage(self.make_service(), close_service=True)
            for name, key in keys.items():
                await storage.update_data(key, {"name": name})
            erased = await storage.erase_user(ana)
            left = {name: await storage.get_data(key) for name, key in keys.items()}
            await storage.close()
            return erased, left

        erased, left = asyncio.run(main())
        assert erased == sorted(
            ChatstateKeyBuilder().build(keys[n])
            for n in ("private", "group", "other bot, thread", "destiny")
        )
        assert left == {
            "private": {},
            "group": {},
            "other bot, thread": {},
            "destiny": {},
            "bea in the group": {"name": "bea in the group"},
            "bea": {"name": "bea"},
            "ana's id as a bot": {"name": "ana's id as a bot"},
        }

    def test_isolation_runs_one_event_of_a_key_at_a_time(self) -> None:
        """Two isolations (two 'processes') never let two events of one key overlap."""

        async def main() -> list[str]:
            events: list[str] = []
            one, two = self.make_service(), self.make_service()
            isolations = [ChatstateEventIsolation(one), ChatstateEventIsolation(two)]

            async def handle(name: str, isolation: ChatstateEventIsolation) -> None:
                async with isolation.lock(KEY):
                    events.append(f"enter {name}")
                    for _ in range(20):
                        await asyncio.sleep(0)
                    events.append(f"leave {name}")

            await asyncio.gather(*(handle(str(i), iso) for i, iso in enumerate(isolations * 2)))
            for svc in (one, two):
                await svc.aclose()
            return events

        events = asyncio.run(main())
        assert len(events) == 8
        for enter, leave in zip(events[::2], events[1::2], strict=True):
            assert enter.replace("enter", "leave") == leave

    def test_dispatcher_runs_a_form_and_survives_a_restart(self) -> None:
        """A form started on one Dispatcher finishes on a new one (a restart) over the same store."""

        async def main() -> tuple[list[str], list[str], dict[str, Any]]:
            svc = self.make_service()
            dp, bot, session = build_dispatcher(svc, form_router())
            await dp.feed_update(bot, message_update(1, "/start"))
            await dp.feed_update(bot, message_update(2, "Ana"))
            await svc.aclose()

            svc = self.make_service()
            dp2, bot2, session2 = build_dispatcher(svc, form_router())
            key = StorageKey(bot_id=bot2.id, chat_id=7, user_id=7)
            assert await dp2.storage.get_state(key) == "Form:age"
            await dp2.feed_update(bot2, message_update(3, "33"))
            left = await svc.get(ChatstateKeyBuilder().build(key))
            await svc.aclose()
            return session.texts, session2.texts, left

        first, second, left = asyncio.run(main())
        assert first == ["What is your name?", "How old are you?"]
        assert second == ["Ana is 33"]
        assert left == {}

    @pytest.mark.parametrize("dedupe", [True, "outer"])
    def test_redelivered_update_is_handled_once(self, dedupe: bool | str) -> None:
        """The same update fed again (also concurrently, also to a second dispatcher) sends nothing.

        With ``setup()`` (the key's claim dedupes) and with the old
        ``outer_middleware`` line (a record of its own, inside the lock).
        """

        async def main() -> tuple[list[str], list[str], list[str]]:
            calls: list[str] = []
            svc_a, svc_b = self.make_service(), self.make_service()
            dp_a, bot_a, session_a = build_dispatcher(svc_a, form_router(calls), dedupe=dedupe)
            dp_b, bot_b, session_b = build_dispatcher(svc_b, form_router(calls), dedupe=dedupe)
            start = message_update(10, "/start")
            await asyncio.gather(dp_a.feed_update(bot_a, start), dp_a.feed_update(bot_a, start))
            await dp_b.feed_update(bot_b, start)
            await dp_a.feed_update(bot_a, message_update(11, "Ana"))
            await dp_b.feed_update(bot_b, message_update(11, "Ana"))
            for svc in (svc_a, svc_b):
                await svc.aclose()
            return calls, session_a.texts, session_b.texts

        calls, texts_a, texts_b = asyncio.run(main())
        assert calls == ["start"]
        assert texts_a + texts_b == ["What is your name?", "How old are you?"]

    def test_scene_flow_with_back_and_restart(self) -> None:
        """A scene wizard (enter, goto, back, exit) runs over the storage and across a restart."""

        def dispatcher(svc: AsyncStateService) -> tuple[Dispatcher, Bot, RecordingSession]:
            dp, bot, session = build_dispatcher(svc, dedupe=True)
            SceneRegistry(dp).add(NameScene, AgeScene)
            dp.message.register(NameScene.as_handler(), Command("quiz"))
            return dp, bot, session

        async def main() -> tuple[list[str], list[str], dict[str, Any]]:
            svc = self.make_service()
            dp, bot, session = dispatcher(svc)
            for i, text in enumerate(["/quiz", "Ana", "/back", "Bea"], start=1):
                await dp.feed_update(bot, message_update(i, text))
            await dp.feed_update(bot, message_update(4, "Bea"))  # a redelivery: nothing happens
            await svc.aclose()

            svc = self.make_service()
            dp2, bot2, session2 = dispatcher(svc)
            await dp2.feed_update(bot2, message_update(5, "33"))
            key = StorageKey(bot_id=bot2.id, chat_id=7, user_id=7)
            doc = await svc.get(ChatstateKeyBuilder().build(key))
            await svc.aclose()
            return session.texts, session2.texts, doc

        first, second, doc = asyncio.run(main())
        assert first == ["Your name?", "Your age?", "Your name?", "Your age?"]
        assert second == ["Bea is 33"]
        assert "state" not in doc


class TestOnMemory(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = AsyncMemoryBackend()

    def make_service(self) -> AsyncStateService:
        return AsyncStateService(self.store)


@pytest.mark.redis
class TestOnRedis(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str, namespace: str) -> None:
        self.url, self.namespace = redis_url, namespace

    def make_service(self) -> AsyncStateService:
        return AsyncStateService(AsyncRedisBackend.from_url(self.url, namespace=self.namespace))


@pytest.mark.redis
@pytest.mark.cluster
class TestOnCluster(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _server(self, cluster_url: str, namespace: str) -> None:
        self.url, self.namespace = cluster_url, namespace

    def make_service(self) -> AsyncStateService:
        backend = AsyncRedisBackend.from_url(self.url, namespace=self.namespace, cluster=True)
        return AsyncStateService(backend)
