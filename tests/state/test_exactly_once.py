"""Exactly once for every call, and the store defects found by attacking it (Redis and Valkey)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import servers
from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, StateData, StateService
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendPermissionError,
    BackendUnavailable,
    CorruptStateError,
    OutcomeUnknown,
    StateTooLargeError,
    StoreBusyError,
)
from chatstate.state import REMEMBERED_OPS
from chatstate.state._backend import OPS_TRIM_AT
from chatstate.testing import BackendContract
from conftest import register_secret
from proxy import ReplyDroppingProxy

pytestmark = pytest.mark.redis


@pytest.fixture
def private(server_kind: str):
    """A server of our own that a test may stall, fill, kill or reconfigure."""
    server = servers.start_server(server_kind, "--enable-debug-command", "yes")
    yield server
    server.cleanup()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


def _evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0))


# -- a call learns that its own earlier attempt applied it -------------------------------


def test_a_lost_reply_to_a_first_write_is_reported_applied(redis_url: str, namespace: str) -> None:
    """A write with an explicit op_id whose reply is lost is re-sent and answers 'applied'."""
    proxy = ReplyDroppingProxy(_port(redis_url))
    svc = StateService(
        RedisBackend.from_url(f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace)
    )
    try:
        svc.update("u", {"n": 0})
        proxy.arm(b"EVALSHA", times=1)
        out = svc.update_once("u", {"n": 1}, op_id="wamid.first")
        assert proxy.dropped == 1
        assert out.status == "applied"
        assert out.version == 2
        # Another call with the same id (a webhook redelivery) is the duplicate.
        assert svc.update_once("u", {"n": 1}, op_id="wamid.first").status == "duplicate"
        assert svc.snapshot("u").version == 2
    finally:
        svc.close()
        proxy.close()


@pytest.mark.slow
def test_a_write_that_outlives_the_socket_timeout_is_reported_applied(private) -> None:
    """A server stalled past the client's socket timeout: the call still answers 'applied'."""
    svc = StateService(RedisBackend.from_url(private.url, socket_timeout=0.5, resolve_attempts=8))
    admin = private.client()
    for trial in range(3):
        stall = threading.Thread(target=lambda: admin.execute_command("DEBUG", "SLEEP", "1.2"))
        stall.start()
        # Wait (with no timing assumption) until the stall has begun.
        probe = private.client(socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.TimeoutError):
            while True:
                probe.ping()
                time.sleep(0.005)
        probe.close()
        out = svc.update_once("u", {"trial": trial}, op_id=f"stalled-{trial}")
        stall.join()
        assert out.status == "applied", trial
        assert out.version == trial + 1
    assert svc.get("u") == {"trial": 2}
    svc.close()


@pytest.mark.slow
def test_client_kill_under_load_never_calls_a_first_write_a_duplicate(private) -> None:  # noqa: C901
    """CLIENT KILL in a loop while threads write: no first call is ever told 'duplicate'."""
    admin = private.client()
    stop = threading.Event()
    statuses: Counter[str] = Counter()
    acked: dict[str, list[int]] = {f"u{i}": [] for i in range(4)}
    errors: list[BaseException] = []

    def killer() -> None:
        while not stop.is_set():
            with contextlib.suppress(redis.RedisError):
                admin.client_kill_filter(_type="normal", skipme=True)
            time.sleep(0.003)

    def writer(user: str) -> None:
        svc = StateService(RedisBackend.from_url(private.url, resolve_attempts=6))
        for i in range(400):
            op_id = f"{user}-{i}"
            try:
                out = svc.update_once(user, {"seen": {str(i): i}}, op_id=op_id)
            except OutcomeUnknown:
                statuses["unknown"] += 1
                # Settle it: the same call again, now as a new call with the same id.
                out = svc.update_once(user, {"seen": {str(i): i}}, op_id=op_id)
                if out.status == "duplicate":
                    acked[user].append(i)
                    continue
            except BackendUnavailable:
                statuses["unavailable"] += 1
                continue
            except BaseException as exc:
                errors.append(exc)
                return
            statuses[out.status] += 1
            acked[user].append(i)
        svc.close()

    kill = threading.Thread(target=killer)
    kill.start()
    threads = [threading.Thread(target=writer, args=(u,)) for u in acked]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    kill.join()
    assert not errors, errors
    assert statuses["duplicate"] == 0, statuses
    assert statuses["applied"] > 0
    check = StateService(RedisBackend.from_url(private.url))
    for user, seen in acked.items():
        stored = {int(k) for k in check.get(user).get("seen", {})}
        assert set(seen) <= stored
    check.close()


# -- op ids outlive documents (ttl shorter than the dedupe window, delete) -------------


def test_op_ids_of_an_expired_document_stay_remembered(redis_url: str, namespace: str) -> None:
    """With ttl < dedupe_window the newest ids survive the document's expiry, exactly as in memory."""
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace), ttl=0.2, dedupe_window=600
    )
    for i in range(REMEMBERED_OPS):
        svc.update_once("u", {"i": i}, op_id=f"m{i}")
    client = redis.Redis.from_url(redis_url)
    doc = svc.manager.backend.keys("u")[0]  # type: ignore[attr-defined]
    while client.exists(doc):  # the document expires on the server's clock
        time.sleep(0.05)
    client.close()
    resent = [svc.update_once("u", {"i": i}, op_id=f"m{i}").status for i in range(REMEMBERED_OPS)]
    assert set(resent) == {"duplicate"}
    assert svc.snapshot("u").version == 0
    svc.close()


def test_the_operation_log_stays_compact_and_knows_the_newest_ids(
    redis_url: str, namespace: str
) -> None:
    """After many writes the log is a listpack hash of at most OPS_TRIM_AT ids, newest kept."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    client = redis.Redis.from_url(redis_url)
    ops = svc.manager.backend.keys("u")[1]  # type: ignore[attr-defined]
    for i in range(1000):
        svc.update_once("u", {"i": i}, op_id=f"message-{i}")
        assert client.hlen(ops) <= OPS_TRIM_AT + 1  # the records and the counter
    assert client.object("encoding", ops) == b"listpack"
    assert all(
        svc.update_once("u", {"i": i}, op_id=f"message-{i}").status == "duplicate"
        for i in range(1000 - REMEMBERED_OPS, 1000)
    )
    client.close()
    svc.close()


# -- a full pool is not a lost write -----------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
def test_many_concurrent_calls_on_a_default_async_backend_all_succeed(
    redis_url: str, namespace: str, pipelining: bool
) -> None:
    """300 reads and 300 updates at once on a default async backend: every one succeeds."""

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(redis_url, namespace=namespace, pipelining=pipelining)
        svc = AsyncStateService(backend)
        await svc.update("hot", {"n": 0})
        calls = [svc.get("hot") for _ in range(300)] + [
            svc.update("hot", {f"k{i}": i}) for i in range(300)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures[:3]
        assert (await svc.snapshot("hot")).version == 301
        await svc.aclose()

    asyncio.run(main())


def test_a_write_that_got_no_connection_is_unavailable_not_unknown(
    redis_url: str, namespace: str
) -> None:
    """With one connection and no patience, writes that never left are BackendUnavailable."""

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(
            redis_url,
            namespace=namespace,
            pipelining=False,
            max_connections=1,
            pool_timeout=0.000_001,
            resolve_attempts=0,
        )
        svc = AsyncStateService(backend)
        results = await asyncio.gather(
            *(svc.update_once("hot", {f"k{i}": i}, op_id=f"w{i}") for i in range(50)),
            return_exceptions=True,
        )
        kinds = Counter(type(r).__name__ for r in results)
        assert kinds["OutcomeUnknown"] == 0, kinds
        assert kinds["BackendUnavailable"] > 0, kinds
        stored = await svc.get("hot")
        for i, result in enumerate(results):
            # What was refused never reached the server; what succeeded is there.
            assert (f"k{i}" in stored) == (not isinstance(result, BaseException))
        await svc.aclose()

    asyncio.run(main())


def test_threads_beyond_the_pool_wait_for_a_connection(redis_url: str, namespace: str) -> None:
    """More threads than connections: they wait their turn, none fails."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace, max_connections=2))
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                svc.update("hot", {f"t{t}": i})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert svc.snapshot("hot").version == 240
    svc.close()


# -- a wide patch never reaches the server -----------------------------------------------


def test_a_huge_patch_is_refused_before_it_is_sent(redis_url: str, namespace: str) -> None:
    """A million keys (set or deleted) are refused in Python; the server never sees them."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    svc.update("u", {"keep": 1})
    client = redis.Redis.from_url(redis_url)
    before = _evalsha_calls(client)
    started = time.perf_counter()
    with pytest.raises(StateTooLargeError):
        svc.update("u", {f"k{i}": i for i in range(10**6)})
    with pytest.raises(StateTooLargeError):
        svc.update("u", dict.fromkeys((f"k{i}" for i in range(10**6)), None))
    with pytest.raises(StateTooLargeError):
        svc.update("u", {"blob": "x" * (svc.rules.max_bytes + 1)})
    assert time.perf_counter() - started < 30  # generous: only a stall of the server would miss
    assert _evalsha_calls(client) == before
    assert svc.get("u") == {"keep": 1}
    client.close()
    svc.close()


# -- an error means "not applied" ---------------------------------------------------------


def test_a_corrupt_value_elsewhere_does_not_fail_a_write_that_landed(
    redis_url: str, namespace: str
) -> None:
    """The write applies and says so; only reading the corrupt document raises."""
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace), StateData(preserved=["jwt_token"])
    )
    svc.update("u", {"a": 1})
    client = redis.Redis.from_url(redis_url)
    key = svc.manager.backend.keys("u")[0]  # type: ignore[attr-defined]
    client.hset(key, '"bad"', "{not json")
    out = svc.update_once("u", {"b": 2}, op_id="m1")
    assert out.status == "applied"
    assert client.hget(key, '"b"') == b"2"
    doc = svc.set_preserved("u", "jwt_token", "tok")  # no error: the token is stored
    assert client.hget(key, '"jwt_token"') == b'"tok"'
    with pytest.raises(CorruptStateError):
        dict(doc)
    with pytest.raises(CorruptStateError):
        svc.get("u")
    client.close()
    svc.close()


def test_busy_after_an_unknown_outcome_stays_unknown() -> None:
    """Once an attempt's outcome is unknown, a BUSY answer to the re-send is OutcomeUnknown."""
    from redis.exceptions import BusyLoadingError, ResponseError

    from chatstate.state import StateManager
    from chatstate.state._memory import MemoryBackend
    from chatstate.state.redis._backends import map_redis_errors

    write = StateManager(MemoryBackend()).update_write({"a": 1}, "m1")
    for error in (ResponseError("BUSY Redis is busy running a script"), BusyLoadingError("x")):
        with pytest.raises(OutcomeUnknown), map_redis_errors("k", write, unknown=True):
            raise error
        with pytest.raises(StoreBusyError), map_redis_errors("k", write, unknown=False):
            raise error


def test_a_client_bug_is_not_disguised_as_an_unknown_outcome() -> None:
    """AttributeError, TypeError and RuntimeError from the client pass through as they are."""
    from chatstate.state import StateManager
    from chatstate.state._memory import MemoryBackend
    from chatstate.state.redis._backends import map_redis_errors

    write = StateManager(MemoryBackend()).update_write({"a": 1}, "m1")
    for error in (AttributeError("x"), TypeError("y"), RuntimeError("z")):
        with pytest.raises(type(error)), map_redis_errors("k", write):
            raise error


# -- permissions ----------------------------------------------------------------------------

# The exact ACL chatstate needs, as docs/operations.md states it.
ACL_COMMANDS = (
    "+evalsha +eval +script|load +hgetall +ping "
    "+hmget +hget +hset +hdel +hincrby +exists +type +del +pexpire +pttl +get +set "
    "+zadd +zrem +zrangebyscore +scan"
)


def _acl_user(server: servers.Server, name: str, namespace: str, commands: str) -> str:
    password = register_secret(f"acl-secret-{name}-9d1")
    server.client().execute_command(
        "ACL", "SETUSER", name, "reset", "on", f">{password}", f"~{namespace}:*", "-@all",
        *commands.split(),
    )  # fmt: skip
    return f"redis://{name}:{password}@127.0.0.1:{server.port}/0"


def test_the_documented_acl_is_enough_for_the_refresh_lock(private) -> None:
    """Single-flight token refresh (redis-py's Lock) works as the documented ACL user."""
    url = _acl_user(private, "locker", "ns", ACL_COMMANDS)
    backend = RedisBackend.from_url(url, namespace="ns")
    private.client().script_flush()  # the lock must (re)load its scripts too
    with backend.lock("u", "jwt-refresh", lease=5, wait=1):
        pass
    with backend.lock("u", "jwt-refresh", lease=5, wait=1):
        pass
    backend.close()


def test_a_user_without_a_needed_command_gets_a_permission_error(private) -> None:
    """An ACL user without +hmget sees BackendPermissionError, not 'corrupt data'."""
    url = _acl_user(private, "nohmget", "ns", ACL_COMMANDS.replace("+hmget ", ""))
    svc = StateService(RedisBackend.from_url(url, namespace="ns"))
    with pytest.raises(BackendPermissionError) as info:
        svc.update("u", {"a": 1})
    assert isinstance(info.value, BackendAuthenticationError)
    assert not isinstance(info.value, BackendUnavailable)
    svc.close()


@pytest.fixture(scope="module", params=list(servers.KINDS))
def acl_server(request: pytest.FixtureRequest):
    """One server per kind for the ACL contract run (each test uses its own namespace)."""
    if servers.find_binary(request.param) is None:
        pytest.fail(f"no {request.param} server binary")
    server = servers.start_server(request.param)
    yield server
    server.cleanup()


class TestTheDocumentedAclIsEnough(BackendContract):
    """The whole contract suite passes as an ACL user with exactly the documented commands."""

    @pytest.fixture(autouse=True)
    def _store(self, acl_server: servers.Server, namespace: str) -> None:
        self.url = _acl_user(acl_server, f"u{namespace}", namespace, ACL_COMMANDS)
        self.namespace = namespace

    def make_backend(self) -> RedisBackend:
        return RedisBackend.from_url(self.url, namespace=self.namespace)

    def make_async_backend(self) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(self.url, namespace=self.namespace)


# -- corrupt data and forced deletes ----------------------------------------------------


def test_a_fractional_version_is_corrupt(redis_url: str, namespace: str) -> None:
    """A #v of '1.5' is refused on read and on write; nothing is overwritten."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    client = redis.Redis.from_url(redis_url)
    key = svc.manager.backend.keys("u")[0]  # type: ignore[attr-defined]
    client.hset(key, mapping={"#v": "1.5", "#s": "0"})
    with pytest.raises(CorruptStateError):
        svc.get("u")
    with pytest.raises(CorruptStateError):
        svc.update("u", {"a": 1})
    assert client.hgetall(key) == {b"#v": b"1.5", b"#s": b"0"}
    client.close()
    svc.close()


def test_a_forced_delete_removes_what_a_plain_delete_refuses(
    redis_url: str, namespace: str
) -> None:
    """delete(force=True) removes a wrong-type document and log; delete() refuses them."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    client = redis.Redis.from_url(redis_url)
    doc, ops, _ = svc.manager.backend.keys("u")  # type: ignore[attr-defined]
    client.rpush(doc, "not", "a", "hash")
    client.set(ops, "not a log")
    with pytest.raises(CorruptStateError):
        svc.delete("u")
    assert client.exists(doc)
    assert client.exists(ops)
    svc.delete("u", force=True)
    assert not client.exists(doc)
    assert client.type(ops) == b"hash"  # a fresh log remembering the forced delete
    svc.update("u", {"fresh": 1})
    assert svc.get("u") == {"fresh": 1}
    client.close()
    svc.close()


# -- regressions found in review ---------------------------------------------------------------


def test_a_resent_increment_returns_its_value(redis_url: str, namespace: str) -> None:
    """An increment whose reply is lost is re-sent and returns the counter's value."""
    proxy = ReplyDroppingProxy(_port(redis_url))
    svc = StateService(
        RedisBackend.from_url(f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace)
    )
    try:
        assert svc.increment("u", "n", 5) == 5
        proxy.arm(b"EVALSHA", times=1)
        assert svc.increment("u", "n", 2) == 7
        assert proxy.dropped == 1
        assert svc.get("u") == {"n": 7}
    finally:
        svc.close()
        proxy.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
def test_no_server_fails_every_async_caller_promptly(namespace: str, pipelining: bool) -> None:
    """Nothing listening: 50 concurrent callers each get BackendUnavailable, none waits forever."""
    port = servers.free_port()

    async def main() -> list[BaseException | object]:
        backend = AsyncRedisBackend.from_url(
            f"redis://127.0.0.1:{port}/0",
            namespace=namespace,
            pipelining=pipelining,
            socket_connect_timeout=0.5,
        )
        svc = AsyncStateService(backend)
        calls = [svc.update(f"u{i}", {"a": i}) for i in range(25)] + [
            svc.get(f"u{i}") for i in range(25)
        ]
        # A generous bound: only a caller left waiting forever would reach it.
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 120)
        await svc.aclose()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, BackendUnavailable) for r in results), results[:3]
    assert not any(isinstance(r, OutcomeUnknown) for r in results)


def test_failed_connections_do_not_use_up_the_pool(server_kind: str) -> None:
    """With two connections allowed, many failures while the server is down, then it works."""
    server = servers.start_server(server_kind)
    svc = StateService(
        RedisBackend.from_url(server.url, max_connections=2, socket_connect_timeout=0.5)
    )
    try:
        svc.update("u", {"a": 1})
        server.stop()
        for _ in range(10):
            with pytest.raises(BackendUnavailable):
                svc.get("u")
        server.start()
        assert svc.update("u", {"b": 2}) == {"b": 2}  # the data died with the server (no AOF)
    finally:
        svc.close()
        server.cleanup()
