"""chatstate under pyTelegramBotAPI: the state storages (sync, asyncio) and the dedupe middlewares.

The storages run the same call sequences as telebot's own ``StateMemoryStorage``
and must answer alike; concurrent ``set_data`` calls (what ``add_data`` makes)
of one key must all land, while telebot's ``StateRedisStorage`` under the same
forced interleaving loses all but one (the negative control). Real ``TeleBot``
and ``AsyncTeleBot`` instances are fed real ``Update`` objects; their
``send_message`` records instead of sending (no network).
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import logging
import multiprocessing
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from telebot import TeleBot, custom_filters
from telebot.async_telebot import AsyncTeleBot
from telebot.asyncio_filters import StateFilter as AsyncStateFilter
from telebot.asyncio_storage import StateMemoryStorage as AsyncStateMemoryStorage
from telebot.asyncio_storage import StateRedisStorage as AsyncStateRedisStorage
from telebot.states import State, StatesGroup
from telebot.states.asyncio.context import StateContext as AsyncStateContext
from telebot.states.asyncio.middleware import StateMiddleware as AsyncStateMiddleware
from telebot.states.sync.context import StateContext
from telebot.states.sync.middleware import StateMiddleware
from telebot.storage import StateMemoryStorage, StateRedisStorage
from telebot_support import (
    BOT_ID,
    TOKEN,
    AsyncFactory,
    SyncFactory,
    async_factory,
    callback,
    edited,
    record_sends,
    sync_factory,
    update,
)

import servers
from chatstate import AsyncStateService, RedisBackend, StateService
from chatstate.exceptions import (
    ConfigurationError,
    SerializationError,
    UsageError,
    UserBusyError,
)
from chatstate.integrations.telebot import (
    AsyncChatstateStateStorage,
    AsyncUpdateDedupeMiddleware,
    ChatstateStateStorage,
    UpdateDedupeMiddleware,
    update_key,
)
from conftest import EXTERNAL, _missing, register_secret
from strategies import canonical, json_values, keys

N = 50  # concurrent handlers of one user
HANG_GUARD = 120  # seconds: a guard against a hang, never a pace
BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


class Form(StatesGroup):
    name = State()
    age = State()


@pytest.fixture(scope="module")
def one_redis_url() -> Iterator[str]:
    """One throwaway redis-server for the tests parametrized over backends (or ``REDIS_URL``).

    The suite's ``redis_url`` is itself parametrized (Redis, Valkey), so a
    fixture parametrized over backends cannot ask for it only for Redis.
    """
    if EXTERNAL:
        yield EXTERNAL
        return
    if servers.find_binary("redis") is None:
        _missing("redis")
    server = servers.start_server("redis")
    try:
        yield server.url
    finally:
        server.cleanup()


# -- parity with telebot's StateMemoryStorage -----------------------------------------------

# (chat_id, user_id, business_connection_id, message_thread_id, bot_id). bot_id None and 0
# build the same key in telebot (a falsy part is left out), and so must ours.
_KEYS = [
    (7, 7, None, None, BOT_ID),
    (7, 8, None, None, BOT_ID),
    (-100, 7, None, 5, BOT_ID),
    (7, 7, "bc1", None, None),
    (7, 7, None, None, 0),
    (7, 7, None, None, None),
]
_key = st.sampled_from(_KEYS)
_state = st.sampled_from(["Form:name", "other", Form.name, Form.age, None])
_fields = st.dictionaries(keys, json_values(6), max_size=3)
_ops = st.one_of(
    st.tuples(st.just("set_state"), _key, _state),
    st.tuples(st.just("get_state"), _key),
    st.tuples(st.just("delete_state"), _key),
    st.tuples(st.just("set_data"), _key, keys, json_values(8)),
    st.tuples(st.just("get_data"), _key),
    st.tuples(st.just("reset_data"), _key),
    st.tuples(st.just("save"), _key, _fields),
    st.tuples(st.just("block"), _key, _fields, st.lists(keys, max_size=2)),
)


def _outcome(call: Callable[[], Any]) -> str:
    try:
        return canonical(call())
    except RuntimeError:  # a key that does not exist: both raise it
        return "RuntimeError"


def _run(storage: Any, op: tuple[Any, ...]) -> str:
    name, key, *args = copy.deepcopy(op)
    if name == "block":
        sets, drops = args

        def block() -> None:
            with storage.get_interactive_data(*key) as data:
                data.update(sets)
                for field in drops:
                    data.pop(field, None)

        return _outcome(block)
    chat_id, user_id, business, thread, bot_id = key
    where = {"business_connection_id": business, "message_thread_id": thread, "bot_id": bot_id}
    method = getattr(storage, name)
    return _outcome(lambda: method(chat_id, user_id, *args, **where))


async def _arun(storage: Any, op: tuple[Any, ...]) -> str:
    name, key, *args = copy.deepcopy(op)
    try:
        if name == "block":
            sets, drops = args
            async with storage.get_interactive_data(*key) as data:
                data.update(sets)
                for field in drops:
                    data.pop(field, None)
            return canonical(None)
        chat_id, user_id, business, thread, bot_id = key
        where = {"business_connection_id": business, "message_thread_id": thread, "bot_id": bot_id}
        return canonical(await getattr(storage, name)(chat_id, user_id, *args, **where))
    except RuntimeError:
        return "RuntimeError"


def _dump(storage: Any) -> list[str]:
    return [_run(storage, (name, key)) for key in _KEYS for name in ("get_state", "get_data")]


def _parity(make: SyncFactory, ops: list[tuple[Any, ...]]) -> None:
    theirs, ours = StateMemoryStorage(), ChatstateStateStorage(make(), close_service=True)
    try:
        for op in ops:
            assert _run(ours, op) == _run(theirs, op), op
        assert _dump(ours) == _dump(theirs)
    finally:
        ours.close()


def _async_parity(make: AsyncFactory, ops: list[tuple[Any, ...]]) -> None:
    async def main() -> None:
        theirs = AsyncStateMemoryStorage()
        ours = AsyncChatstateStateStorage(make(), close_service=True)
        try:
            for op in ops:
                assert await _arun(ours, op) == await _arun(theirs, op), op
            names = ("get_state", "get_data")
            dump = [(name, key) for key in _KEYS for name in names]
            assert [await _arun(ours, op) for op in dump] == [
                await _arun(theirs, op) for op in dump
            ]
        finally:
            await ours.close()

    asyncio.run(main())


@settings(max_examples=80)
@given(ops=st.lists(_ops, max_size=30))
def test_parity_with_state_memory_storage(ops: list[tuple[Any, ...]]) -> None:
    """Every call sequence gives StateMemoryStorage's answers, call by call and at the end."""
    _parity(StateService, ops)


@settings(max_examples=80)
@given(ops=st.lists(_ops, max_size=30))
def test_async_parity_with_state_memory_storage(ops: list[tuple[Any, ...]]) -> None:
    """The asyncio twin gives the asyncio StateMemoryStorage's answers."""
    _async_parity(AsyncStateService, ops)


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_parity_on_sqlite_and_redis(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The same call sequences on SQLite and Redis, both twins, give the memory storage's answers."""
    url = request.getfixturevalue("one_redis_url") if kind == "redis" else None

    @settings(max_examples=15)
    @given(ops=st.lists(_ops, max_size=20))
    def check(ops: list[tuple[Any, ...]]) -> None:
        _parity(sync_factory(kind, tmp_path, url), ops)
        _async_parity(async_factory(kind, tmp_path, url), ops)

    check()


def test_parity_catches_a_wrong_answer() -> None:
    """The parity check itself fails on a storage that answers one call differently."""

    class Wrong(ChatstateStateStorage):
        def reset_data(self, *args: Any, **kwargs: Any) -> bool:
            super().reset_data(*args, **kwargs)
            return True  # telebot answers False for a key that does not exist

    ours, theirs = Wrong(StateService()), StateMemoryStorage()
    op = ("reset_data", _KEYS[0])
    assert _run(ours, op) != _run(theirs, op)


def test_the_key_is_telebots_key() -> None:
    """A key is stored under the id telebot's own storages would use."""
    service = StateService()
    storage = ChatstateStateStorage(service)
    storage.set_state(-100, 7, Form.name, "bc", 3, BOT_ID)
    assert service.get("telebot:42:bc:3:-100:7") == {"state": "Form:name", "data": {}}
    assert storage.user_id(-100, 7, "bc", 3, BOT_ID) == StateMemoryStorage()._get_key(
        -100, 7, "telebot", ":", "bc", 3, BOT_ID
    )


def test_values_are_exact_json() -> None:
    """Values come back as stored (ints past 64 bits, -0.0, nested None); tuples as lists."""
    storage = ChatstateStateStorage(StateService())
    storage.set_state(1, 2, "s")
    values = {"big": 2**70, "neg": -0.0, "none": None, "nested": {"a": [None, {"b": 1.5}]}}
    for name, value in values.items():
        storage.set_data(1, 2, name, value)
    storage.set_data(1, 2, "pair", (1, (2, 3)))
    got = storage.get_data(1, 2)
    assert canonical(got) == canonical({**values, "pair": [1, [2, 3]]})


def test_a_value_that_is_not_json_stores_nothing() -> None:
    """set_data of a set raises SerializationError and stores nothing."""
    storage = ChatstateStateStorage(StateService())
    storage.set_state(1, 2, "s")
    with pytest.raises(SerializationError):
        storage.set_data(1, 2, "tags", {"a", "b"})
    assert storage.get_data(1, 2) == {}


@pytest.mark.parametrize(("before", "after"), [(1, True), (1, 1.0), (0.0, -0.0), ([1], [True])])
def test_a_block_saves_a_change_of_type(before: Any, after: Any) -> None:
    """A block that turns a value into an equal one of another type saves it (1 -> True, ...)."""
    storage = ChatstateStateStorage(StateService())
    storage.set_state(1, 2, "s")
    storage.set_data(1, 2, "v", before)
    with storage.get_interactive_data(1, 2) as data:
        data["v"] = after
    assert canonical(storage.get_data(1, 2)) == canonical({"v": after})


def test_a_block_that_raises_saves_nothing_and_propagates() -> None:
    """retrieve_data's block that raises saves none of its changes, and the error reaches the caller."""
    storage = ChatstateStateStorage(StateService())
    storage.set_state(1, 2, "s")
    storage.set_data(1, 2, "n", 1)

    def fails() -> None:
        with storage.get_interactive_data(1, 2) as data:
            data["n"] = 2
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fails()
    assert storage.get_data(1, 2) == {"n": 1}


def test_the_wrong_twin_is_refused() -> None:
    """Each storage and middleware refuses the other twin's service, and an empty prefix."""
    bot = TeleBot(TOKEN, threaded=False)
    with pytest.raises(UsageError):
        ChatstateStateStorage(AsyncStateService())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        AsyncChatstateStateStorage(StateService())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        UpdateDedupeMiddleware(bot, AsyncStateService())  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        AsyncUpdateDedupeMiddleware(bot, StateService())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        ChatstateStateStorage(StateService(), prefix="")
    with pytest.raises(ConfigurationError, match="poll"):
        UpdateDedupeMiddleware(bot, StateService(), update_types=["message", "poll"])


@pytest.mark.redis
def test_no_secret_in_reprs_or_logs(redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A Redis password and the bot token show in no repr, str or log record."""
    password = register_secret(f"pw-{uuid.uuid4().hex}")
    token = register_secret(f"{BOT_ID}:{uuid.uuid4().hex}")
    url = redis_url.replace("redis://", f"redis://user:{password}@")
    storage = ChatstateStateStorage.from_url(url)
    guard = UpdateDedupeMiddleware(TeleBot(token, threaded=False), storage.service)
    shown = repr(storage) + str(storage) + repr(guard) + str(guard)
    assert password not in shown
    assert token not in shown
    assert str(BOT_ID) in repr(guard)
    storage.close()
    assert password not in caplog.text


# -- concurrent set_data: nothing lost; telebot's StateRedisStorage loses ---------------------


class _ReadBarrierService(StateService):
    """A service whose first read in each thread waits at a barrier once armed.

    Every thread has read before any of them writes: the interleaving that
    loses read-modify-write updates.
    """

    barrier: threading.Barrier | None = None
    _waited: threading.local

    def get(self, user_id: str) -> Any:
        doc = super().get(user_id)
        if self.barrier is not None and not getattr(self._local(), "waited", False):
            self._local().waited = True
            self.barrier.wait()
        return doc

    def _local(self) -> threading.local:
        if not hasattr(self, "_waited"):
            self._waited = threading.local()
        return self._waited


def _barriered_redis(url: str, barrier: threading.Barrier) -> redis.Redis:
    """A client whose pipelines wait at ``barrier`` right after a read (telebot's HGET)."""

    class Pipeline(redis.client.Pipeline):
        def execute(self, raise_on_error: bool = True) -> list[Any]:
            reads = any(args[0] == "HGET" for args, _ in self.command_stack)
            result: list[Any] = super().execute(raise_on_error)
            if reads:
                barrier.wait()
            return result

    class Client(redis.Redis):
        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            return Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    return Client.from_url(url)


def _in_threads(count: int, work: Callable[[int], object]) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD)
    assert not errors, errors[:3]


def _lost_by_bots(storage: Any) -> int:
    """N handlers of one user, each ``bot.add_data`` of a field of its own; how many fields were lost."""
    bot = TeleBot(TOKEN, state_storage=storage, threaded=False)
    bot.set_state(7, Form.name, 7)
    _in_threads(N, lambda i: bot.add_data(7, 7, **{f"k{i}": i}))
    return N - len(bot.current_states.get_data(7, 7, bot_id=BOT_ID))


@pytest.mark.parametrize("kind", BACKENDS)
def test_concurrent_add_data_loses_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """50 threads' add_data of distinct fields on one key all land, with every read forced first.

    Each read waits at a barrier until all 50 have read, so the interleaving
    that loses updates is forced, not left to timing: a set_data that wrote
    back the data it read would keep one field of 50.
    """
    url = request.getfixturevalue("one_redis_url") if kind == "redis" else None
    backend = sync_factory(kind, tmp_path, url)().manager.backend
    service = _ReadBarrierService(backend)
    storage = ChatstateStateStorage(service, close_service=True)
    bot = TeleBot(TOKEN, state_storage=storage, threaded=False)
    bot.set_state(7, Form.name, 7)
    service.barrier = threading.Barrier(N, timeout=HANG_GUARD)
    _in_threads(N, lambda i: bot.add_data(7, 7, **{f"k{i}": i}))
    service.barrier = None
    assert storage.get_data(7, 7, bot_id=BOT_ID) == {f"k{i}": i for i in range(N)}
    storage.close()


@pytest.mark.redis
def test_telebots_redis_storage_loses_fields_when_reads_interleave(redis_url: str) -> None:
    """The control: telebot's StateRedisStorage under the same forced reads keeps 1 field of 50."""
    storage = StateRedisStorage(redis_url=redis_url, prefix=f"t{uuid.uuid4().hex[:12]}")
    bot = TeleBot(TOKEN, state_storage=storage, threaded=False)
    bot.set_state(7, Form.name, 7)
    storage.redis = _barriered_redis(redis_url, threading.Barrier(N, timeout=HANG_GUARD))
    _in_threads(N, lambda i: bot.add_data(7, 7, **{f"k{i}": i}))
    assert N - len(storage.get_data(7, 7, bot_id=BOT_ID)) == N - 1


@pytest.mark.redis
def test_free_running_add_data_on_redis(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Free-running (no barrier): ours loses nothing; what telebot's Redis storage loses is printed."""
    lost = {"ours": 0, "telebot": 0}
    for _ in range(3):
        namespace = f"t{uuid.uuid4().hex[:12]}"
        ours = ChatstateStateStorage(
            StateService(RedisBackend.from_url(redis_url, namespace=namespace)),
            close_service=True,
        )
        lost["ours"] += _lost_by_bots(ours)
        ours.close()
        lost["telebot"] += _lost_by_bots(StateRedisStorage(redis_url=redis_url, prefix=namespace))
    with capsys.disabled():
        print(f"\n3 rounds x {N} threads' add_data, fields lost: {lost}")  # noqa: T201
    assert lost["ours"] == 0


def test_async_concurrent_add_data_loses_nothing() -> None:
    """50 tasks' add_data of distinct fields on one key all land, every read forced first."""

    class Barriered(AsyncStateService):
        barrier: asyncio.Barrier | None = None

        async def get(self, user_id: str) -> Any:
            doc = await super().get(user_id)
            if self.barrier is not None:
                await self.barrier.wait()
            return doc

    async def main() -> dict[str, Any]:
        service = Barriered()
        storage = AsyncChatstateStateStorage(service)
        bot = AsyncTeleBot(TOKEN, state_storage=storage)
        await bot.set_state(7, Form.name, 7)
        service.barrier = asyncio.Barrier(N)
        jobs = (bot.add_data(7, 7, **{f"k{i}": i}) for i in range(N))
        await asyncio.wait_for(asyncio.gather(*jobs), HANG_GUARD)
        service.barrier = None
        return await storage.get_data(7, 7, bot_id=BOT_ID)

    assert asyncio.run(main()) == {f"k{i}": i for i in range(N)}


PROCESSES, TASKS = 4, 25


def _async_storage(kind: str, url: str, namespace: str) -> Any:
    if kind == "telebot":
        return AsyncStateRedisStorage(redis_url=url, prefix=namespace)
    return AsyncChatstateStateStorage.from_url(url, namespace=namespace)


async def _close(storage: Any) -> None:
    if isinstance(storage, AsyncStateRedisStorage):
        await storage.redis.aclose()
    else:
        await storage.close()


def _add_data_worker(kind: str, url: str, namespace: str, proc: int, barrier: Any) -> None:
    async def main() -> None:
        storage = _async_storage(kind, url, namespace)
        bot = AsyncTeleBot(TOKEN, state_storage=storage)
        barrier.wait()
        await asyncio.gather(*(bot.add_data(7, 7, **{f"p{proc}k{i}": i}) for i in range(TASKS)))
        await _close(storage)

    asyncio.run(main())


def _lost_by_processes(kind: str, url: str) -> int:
    """4 processes of an AsyncTeleBot, 25 tasks each, add_data of fields of their own; lost."""
    namespace = f"t{uuid.uuid4().hex[:12]}"

    async def start() -> None:
        storage = _async_storage(kind, url, namespace)
        await AsyncTeleBot(TOKEN, state_storage=storage).set_state(7, Form.name, 7)
        await _close(storage)

    asyncio.run(start())
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES, timeout=HANG_GUARD)  # a hang guard: they start together
    procs = [
        ctx.Process(target=_add_data_worker, args=(kind, url, namespace, p, barrier))
        for p in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(HANG_GUARD)
        assert proc.exitcode == 0

    async def count() -> int:
        storage = _async_storage(kind, url, namespace)
        data = await storage.get_data(7, 7, bot_id=BOT_ID)
        await _close(storage)
        return len(data)

    return PROCESSES * TASKS - asyncio.run(count())


@pytest.mark.redis
@pytest.mark.slow
def test_four_async_processes_lose_nothing(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 AsyncTeleBot processes x 25 tasks, free-running: ours keeps all 100 fields.

    telebot's asyncio StateRedisStorage serialises the tasks of one process
    with an asyncio.Lock; across processes it loses fields. What it loses is
    printed, not asserted (it depends on timing).
    """
    ours, theirs = (
        _lost_by_processes("chatstate", redis_url),
        _lost_by_processes("telebot", redis_url),
    )
    with capsys.disabled():
        lost = f"ours {ours}, telebot {theirs}"
        print(f"\n{PROCESSES} processes x {TASKS} tasks, fields lost: {lost}")  # noqa: T201
    assert ours == 0


def test_concurrent_retrieve_data_blocks_keep_each_others_fields() -> None:
    """50 threads' `with retrieve_data() as d: d[k] = v` blocks, reads forced first: all land.

    telebot's own block writes back the whole data it read (the last block
    wins); ours writes only the fields the block changed.
    """
    service = _ReadBarrierService()
    storage = ChatstateStateStorage(service)
    bot = TeleBot(TOKEN, state_storage=storage, threaded=False)
    bot.set_state(7, Form.name, 7)
    bot.add_data(7, 7, keep=1, drop=2)

    def block(i: int) -> None:
        with bot.retrieve_data(7, 7) as data:
            data[f"k{i}"] = i
            if i == 0:
                del data["drop"]

    service.barrier = threading.Barrier(N, timeout=HANG_GUARD)
    _in_threads(N, block)
    service.barrier = None
    assert storage.get_data(7, 7, bot_id=BOT_ID) == {"keep": 1, **{f"k{i}": i for i in range(N)}}


# -- the dedupe middleware on real bots ----------------------------------------------------


def _sync_bot(service: StateService, calls: list[str], *, fail_first: bool = False) -> TeleBot:
    """A TeleBot with our storage, the guard and telebot's StateMiddleware: a two-step form."""
    storage = ChatstateStateStorage(service)
    bot = TeleBot(TOKEN, state_storage=storage, threaded=False, use_class_middlewares=True)
    record_sends(bot)
    failures = [fail_first]

    @bot.message_handler(commands=["start"])
    def start(message: Any, state: StateContext) -> None:
        calls.append(f"start:{message.message_id}")
        if failures[0]:
            failures[0] = False
            raise RuntimeError("the handler failed")
        state.set(Form.name)
        bot.send_message(message.chat.id, "Your name?")

    @bot.message_handler(state=Form.name)
    def name(message: Any, state: StateContext) -> None:
        calls.append(f"name:{message.text}")
        state.add_data(name=message.text)

    @bot.edited_message_handler(func=lambda m: True)
    def edit(message: Any) -> None:
        calls.append(f"edit:{message.text}")

    @bot.callback_query_handler(func=lambda q: True)
    def press(query: Any) -> None:
        calls.append(f"press:{query.data}")

    bot.add_custom_filter(custom_filters.StateFilter(bot))
    bot.setup_middleware(UpdateDedupeMiddleware(bot, service))
    bot.setup_middleware(StateMiddleware(bot))
    return bot


@pytest.fixture(params=BACKENDS)
def sync_services(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], StateService]]:
    """Services of two 'processes' of one bot, over one store of the given backend."""
    url = request.getfixturevalue("one_redis_url") if request.param == "redis" else None
    make = sync_factory(request.param, tmp_path, url)
    made: list[StateService] = []

    def new() -> StateService:
        made.append(make())
        return made[-1]

    yield new
    for service in made:
        service.close()


@pytest.fixture(params=BACKENDS)
def async_services(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncFactory:
    """The asyncio twin of ``sync_services`` (each test closes what it makes)."""
    url = request.getfixturevalue("one_redis_url") if request.param == "redis" else None
    return async_factory(request.param, tmp_path, url)


def test_an_update_delivered_to_two_bots_runs_once(sync_services: SyncFactory) -> None:
    """The same update processed by two TeleBots on one backend: the handler runs once."""
    calls: list[str] = []
    one, two = _sync_bot(sync_services(), calls), _sync_bot(sync_services(), calls)
    one.process_new_updates([update(1, "/start")])
    two.process_new_updates([update(1, "/start")])
    one.process_new_updates([update(1, "/start")])
    two.process_new_updates([update(2, "Ana")])
    one.process_new_updates([update(2, "Ana")])
    assert calls == ["start:1", "name:Ana"]
    assert one.current_states.get_data(7, 7, bot_id=BOT_ID) == {"name": "Ana"}


def test_copies_at_once_run_the_handler_once(sync_services: SyncFactory) -> None:
    """Two bots handling one update at the same moment: the copy waits, then runs nothing."""
    calls: list[str] = []
    entered, release = threading.Event(), threading.Event()
    bots = [_sync_bot(sync_services(), calls) for _ in range(2)]
    for bot in bots:

        @bot.message_handler(commands=["slow"])
        def slow(message: Any) -> None:
            calls.append("slow")
            entered.set()
            release.wait(HANG_GUARD)

    first = threading.Thread(target=bots[0].process_new_updates, args=([update(5, "/slow")],))
    first.start()
    assert entered.wait(HANG_GUARD)
    second = threading.Thread(target=bots[1].process_new_updates, args=([update(5, "/slow")],))
    second.start()
    second.join(0.3)
    assert second.is_alive()  # waiting for the first delivery's claim
    release.set()
    first.join(HANG_GUARD)
    second.join(HANG_GUARD)
    assert calls == ["slow"]


def test_a_copy_that_waits_too_long_raises_user_busy() -> None:
    """A copy still waiting for the first delivery after ``wait`` raises UserBusyError, runs nothing."""
    service, calls = StateService(), []
    entered, release = threading.Event(), threading.Event()
    first = TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    copy_ = TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    for bot in (first, copy_):
        bot.setup_middleware(UpdateDedupeMiddleware(bot, service, wait=0.3))

    @first.message_handler(func=lambda m: True)
    def slow(message: Any) -> None:
        calls.append("first")
        entered.set()
        release.wait(HANG_GUARD)

    copy_.message_handler(func=lambda m: True)(lambda m: calls.append("copy"))
    runner = threading.Thread(target=first.process_new_updates, args=([update(1, "hi")],))
    runner.start()
    assert entered.wait(HANG_GUARD)
    try:
        with pytest.raises(UserBusyError):
            copy_.process_new_updates([update(1, "hi")])
    finally:
        release.set()
        runner.join(HANG_GUARD)
    copy_.process_new_updates([update(1, "hi")])  # now remembered: cancelled
    assert calls == ["first"]


def test_a_failed_update_runs_again_then_once(sync_services: SyncFactory) -> None:
    """A handler that raised releases its update: a redelivery runs, and then it is remembered."""
    calls: list[str] = []
    bot = _sync_bot(sync_services(), calls, fail_first=True)
    logging.getLogger("TeleBot").disabled = True  # telebot logs the handler's error
    try:
        for _ in range(3):
            bot.process_new_updates([update(1, "/start")])
    finally:
        logging.getLogger("TeleBot").disabled = False
    assert calls == ["start:1", "start:1"]
    assert bot.get_state(7, 7) == "Form:name"


def test_edits_and_presses_are_their_own_updates(sync_services: SyncFactory) -> None:
    """An edit is not a copy of its message, two edits differ, a button press is deduped by its id."""
    calls: list[str] = []
    one, two = _sync_bot(sync_services(), calls), _sync_bot(sync_services(), calls)
    for bot in (one, two):
        bot.process_new_updates([update(1, "hello")])
        bot.process_new_updates([edited(2, 1, "hello!", edit_date=1_700_000_060)])
        bot.process_new_updates([edited(3, 1, "hello!!", edit_date=1_700_000_120)])
        bot.process_new_updates([callback(4, "q1", "buy")])
    assert calls == ["edit:hello!", "edit:hello!!", "press:buy"]


def test_two_bots_never_share_update_records() -> None:
    """Another bot (another token) on the same backend handles its own copy of a message id."""
    service, calls = StateService(), []
    ours = _sync_bot(service, calls)
    other = TeleBot("43:OTHER", threaded=False, use_class_middlewares=True)
    other.message_handler(commands=["start"])(lambda m: calls.append("other"))
    other.setup_middleware(UpdateDedupeMiddleware(other, service))
    ours.process_new_updates([update(1, "/start")])
    other.process_new_updates([update(1, "/start")])
    assert calls == ["start:1", "other"]


def test_update_key_tells_messages_edits_and_queries_apart() -> None:
    """update_key: chat and message id, business connection, edit date, query id; None otherwise."""
    assert update_key(update(1, "x", message_id=9).message) == "message:7:9"
    assert update_key(update(1, "x", message_id=9, chat_id=8).message) == "message:8:9"
    assert update_key(edited(2, 9, "x", 5).edited_message) == "message:7:9:e5"
    assert update_key(callback(3, "q", "d").callback_query) == "callback_query:q"
    assert update_key(object()) is None


async def _async_bot(service: AsyncStateService, calls: list[str]) -> AsyncTeleBot:
    bot = AsyncTeleBot(TOKEN, state_storage=AsyncChatstateStateStorage(service))
    record_sends(bot)

    @bot.message_handler(commands=["start"])
    async def start(message: Any, state: AsyncStateContext) -> None:
        calls.append(f"start:{message.message_id}")
        await state.set(Form.name)
        await bot.send_message(message.chat.id, "Your name?")

    @bot.message_handler(state=Form.name)
    async def name(message: Any, state: AsyncStateContext) -> None:
        calls.append(f"name:{message.text}")
        await state.add_data(name=message.text)
        async with state.data() as data:
            data["seen"] = True

    bot.add_custom_filter(AsyncStateFilter(bot))
    bot.setup_middleware(AsyncUpdateDedupeMiddleware(bot, service))
    bot.setup_middleware(AsyncStateMiddleware(bot))
    return bot


def test_async_an_update_delivered_to_two_bots_runs_once(async_services: AsyncFactory) -> None:
    """The same updates processed by two AsyncTeleBots on one backend, also at once: run once."""

    async def main() -> tuple[list[str], Any]:
        calls: list[str] = []
        services = [async_services(), async_services()]
        one, two = [await _async_bot(service, calls) for service in services]
        await one.process_new_updates([update(1, "/start")])
        await two.process_new_updates([update(1, "/start")])
        await asyncio.gather(
            one.process_new_updates([update(2, "Ana")]),
            two.process_new_updates([update(2, "Ana")]),
        )
        data = await one.current_states.get_data(7, 7, bot_id=BOT_ID)
        for service in services:
            await service.aclose()
        return calls, data

    calls, data = asyncio.run(main())
    assert calls == ["start:1", "name:Ana"]
    assert data == {"name": "Ana", "seen": True}


def test_async_a_failed_update_runs_again_then_once(async_services: AsyncFactory) -> None:
    """On AsyncTeleBot too, a handler that raised releases its update; a success is remembered."""

    async def main() -> list[str]:
        service, calls = async_services(), []
        bot = AsyncTeleBot(TOKEN)
        failures = [True]

        @bot.message_handler(func=lambda m: True)
        async def flaky(message: Any) -> None:
            calls.append(message.text)
            if failures.pop() if failures else False:
                raise RuntimeError("the handler failed")

        bot.setup_middleware(AsyncUpdateDedupeMiddleware(bot, service))
        logging.getLogger("TeleBot").disabled = True  # telebot logs the handler's error
        try:
            for _ in range(3):
                await bot.process_new_updates([update(1, "hi")])
        finally:
            logging.getLogger("TeleBot").disabled = False
            await service.aclose()
        return calls

    assert asyncio.run(main()) == ["hi", "hi"]


# -- examples/telebot_bot.py -----------------------------------------------------------------


def _example() -> Any:
    path = Path(__file__).resolve().parents[2] / "examples" / "telebot_bot.py"
    spec = importlib.util.spec_from_file_location("telebot_bot_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_bot_talks_once_across_two_processes(sync_services: SyncFactory) -> None:
    """examples/telebot_bot.py as two 'processes' on one store, every update delivered to both."""
    example, bots = _example(), []
    for _ in range(2):
        bot = example.build_bot(TOKEN, ChatstateStateStorage(sync_services()))
        bot.threaded = False
        bot.worker_pool.close()
        record = record_sends(bot)
        bots.append((bot, record))
    for update_id, text in enumerate(["/start", "Ana", "old", "30"], start=1):
        for bot, _ in bots:
            bot.process_new_updates([update(update_id, text)])
    sent = [reply for _, record in bots for reply in record]
    assert sorted(text for _, text in sent) == sorted(
        [
            "What is your name?",
            "How old are you?",
            "Please send your age as a number.",
            "Ana is 30.",
        ]
    )
    assert bots[0][0].get_state(7, 7) is None


# -- erase_user ------------------------------------------------------------------------------

_USER_7 = [(7, 7, None, None, BOT_ID), (7, 7, None, 5, BOT_ID), (7, 7, "bc:x", None, 43)]
_USER_7 += [(-100, 7, None, None, BOT_ID)]
_OTHERS = [(8, 8, None, None, BOT_ID), (-100, 8, None, None, BOT_ID), (-100, 17, None, 7, None)]


def test_erase_user_erases_every_key_of_the_user(sync_services: SyncFactory) -> None:
    """erase_user(7): user 7's keys in every bot, thread, business connection and chat; no other."""
    storage = ChatstateStateStorage(sync_services())
    for key in _USER_7 + _OTHERS:
        storage.set_state(key[0], key[1], "s", *key[2:])
        storage.set_data(key[0], key[1], "name", "x", *key[2:])
    erased = storage.erase_user(7)
    assert erased == sorted(storage.user_id(*key) for key in _USER_7)
    assert all(storage.get_state(*key[:2], *key[2:]) is None for key in _USER_7)
    assert all(storage.get_data(*key[:2], *key[2:]) == {"name": "x"} for key in _OTHERS)
    assert storage.erase_user(7) == []


def test_async_erase_user_erases_every_key_of_the_user(async_services: AsyncFactory) -> None:
    """The asyncio twin erases the same keys."""

    async def main() -> tuple[list[str], list[str], list[Any]]:
        storage = AsyncChatstateStateStorage(async_services(), close_service=True)
        for key in _USER_7 + _OTHERS:
            await storage.set_state(key[0], key[1], "s", *key[2:])
        erased = await storage.erase_user(7)
        left = [await storage.get_state(*key) for key in _USER_7 + _OTHERS]
        await storage.close()
        return erased, [storage.user_id(*key) for key in _USER_7], left

    erased, expected, left = asyncio.run(main())
    assert erased == sorted(expected)
    assert left == [None] * len(_USER_7) + ["s"] * len(_OTHERS)


def test_the_middleware_refuses_a_bad_bot_and_bad_update_types() -> None:
    """A str or empty update_types, or something that is no bot: clear errors at once."""
    bot = TeleBot(TOKEN, threaded=False, use_class_middlewares=True)
    service = StateService()
    with pytest.raises(ConfigurationError, match="must be a list"):
        UpdateDedupeMiddleware(bot, service, update_types="message")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="empty"):
        UpdateDedupeMiddleware(bot, service, update_types=[])
    with pytest.raises(UsageError, match="not object"):
        UpdateDedupeMiddleware(object(), service)
