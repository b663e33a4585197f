"""Redis and Valkey backend behaviour beyond the contract: keys, layout, faults, ownership."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.cluster import key_slot

import servers
from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, StateData, StateService
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendUnavailable,
    ConfigurationError,
    CorruptStateError,
    LockLostError,
    OutcomeUnknown,
    StateError,
    StoreBusyError,
    StoreFullError,
    UsageError,
)
from chatstate.state.redis._lua import APPLY_SCRIPT
from conftest import register_secret
from proxy import ReplyDroppingProxy

pytestmark = pytest.mark.redis

SECRET = "S3NTINEL-secret-9f2b"


@pytest.fixture
def private(server_kind: str):
    """A server of our own that a test may flush, fill, stop or kill."""
    server = servers.start_server(server_kind)
    yield server
    server.cleanup()


def _svc(url: str, namespace: str = "chatstate", **kw) -> StateService:
    return StateService(RedisBackend.from_url(url, namespace=namespace, **kw))


# -- keys ----------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.text(min_size=1, max_size=40), b=st.text(min_size=1, max_size=40))
def test_distinct_ids_give_distinct_keys_in_one_slot(a: str, b: str) -> None:
    """Keys are injective in the id, and a user's two keys share one hash slot."""
    backend = RedisBackend(redis.Redis(), namespace="ns")
    svc = StateService(backend)
    try:
        ua, ub = svc.manager.user_id(a), svc.manager.user_id(b)
    except StateError:
        return
    ka, kb = backend.keys(ua), backend.keys(ub)
    assert (ka == kb) == (ua == ub)
    assert key_slot(ka[0].encode()) == key_slot(ka[1].encode())


@pytest.mark.parametrize(
    "hostile", ["}{", "{", "}", "{x}", "a}{b", "*", "?", "[a-z]", "\n", "\u00e9", "x" * 256, "%7B"]
)
def test_hostile_ids_cannot_choose_the_hash_tag(hostile: str) -> None:
    """The hash tag is the percent-encoded id: braces in an id never open or close one."""
    backend = RedisBackend(redis.Redis(), namespace="bot")
    doc, ops, claim = backend.keys(hostile)
    tag = doc[doc.index("{") + 1 : doc.index("}")]
    assert "{" not in tag
    assert "}" not in tag
    assert doc == f"bot:{{{tag}}}"
    assert ops == doc + ":ops"
    assert claim == doc + ":claim"
    assert (
        key_slot(doc.encode())
        == key_slot(ops.encode())
        == key_slot(claim.encode())
        == key_slot(tag.encode())
    )


def test_namespaces_keep_tenants_apart(redis_url: str, namespace: str) -> None:
    """Two namespaces on one server never see each other's documents."""
    a, b = _svc(redis_url, namespace + "a"), _svc(redis_url, namespace + "b")
    a.update("u", {"tenant": "a"})
    assert b.get("u") == {}
    b.update("u", {"tenant": "b"})
    assert a.get("u") == {"tenant": "a"}
    with pytest.raises(ValueError):
        RedisBackend(redis.Redis(), namespace="bad{ns}")
    a.close()
    b.close()


# -- layout and TTL ------------------------------------------------------------


def test_ttl_is_set_on_both_keys_in_the_same_script(redis_url: str, namespace: str) -> None:
    """With a ttl, a write leaves a PTTL on the document; ops expire after the dedupe window."""
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace), ttl=60, dedupe_window=30
    )
    svc.update("u", {"a": 1})
    client = svc.manager.backend.client  # type: ignore[attr-defined]
    doc, ops, _ = svc.manager.backend.keys("u")  # type: ignore[attr-defined]
    assert 59_000 < client.pttl(doc) <= 60_000
    assert 29_000 < client.pttl(ops) <= 30_000
    svc.close()


def test_a_write_without_ttl_keeps_an_existing_ttl(redis_url: str, namespace: str) -> None:
    """HSET does not drop a TTL set earlier, unlike a plain SET would."""
    with_ttl = StateService(RedisBackend.from_url(redis_url, namespace=namespace), ttl=60)
    without = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    with_ttl.update("u", {"a": 1})
    without.update("u", {"b": 2})
    client = without.manager.backend.client  # type: ignore[attr-defined]
    assert client.pttl(without.manager.backend.keys("u")[0]) > 0  # type: ignore[attr-defined]
    with_ttl.close()
    without.close()


def test_only_changed_fields_are_written(redis_url: str, namespace: str) -> None:
    """A merge writes the fields it changes; deleting an object drops its whole subtree."""
    svc = _svc(redis_url, namespace)
    svc.update("u", {"a": {"b": 1, "c": 2}, "d": [1]})
    client = svc.manager.backend.client  # type: ignore[attr-defined]
    key = svc.manager.backend.keys("u")[0]  # type: ignore[attr-defined]
    assert client.hlen(key) == 6  # "a", "a""b", "a""c", "d", #v, #s
    svc.update("u", {"a": None})
    assert sorted(client.hkeys(key)) == [b'"d"', b"#s", b"#v"]
    svc.close()


# -- scripts -------------------------------------------------------------------


def test_script_flush_in_a_loop_never_surfaces(private: servers.Server) -> None:
    """NOSCRIPT after SCRIPT FLUSH is reloaded transparently, under load."""
    svc = _svc(private.url)
    admin = private.client()
    stop = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        while not stop.is_set():
            admin.script_flush()
            flushes += 1
            time.sleep(0.002)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for i in range(500):
            svc.update("u", {"n": i})
            assert svc.get("u") == {"n": i}
    finally:
        stop.set()
        thread.join()
    assert flushes > 10
    assert svc.snapshot("u").version == 500
    svc.close()


def test_busy_server_maps_to_store_busy(private: servers.Server) -> None:
    """A server stuck in a long script answers BUSY, which becomes StoreBusyError."""
    admin = private.client()
    admin.config_set("busy-reply-threshold" if private.kind == "valkey" else "lua-time-limit", 50)
    blocker = threading.Thread(
        target=lambda: private.client(socket_timeout=10).eval(
            "local t = redis.call('TIME'); while true do "
            "local n = redis.call('TIME'); if n[1] - t[1] > 1 then break end end",
            0,
        )
    )
    blocker.start()
    time.sleep(0.3)
    svc = _svc(private.url, socket_timeout=5)
    try:
        with pytest.raises(StoreBusyError) as info:
            svc.update("u", {"a": 1})
        assert str(info.value).startswith("Failed to update state")
    finally:
        blocker.join()
    assert svc.get("u") == {}
    svc.close()


def test_maxmemory_gives_store_full_and_keeps_data(private: servers.Server) -> None:
    """At maxmemory (noeviction) writes fail with StoreFullError; stored data stays readable."""
    admin = private.client()
    used = int(admin.info("memory")["used_memory"])
    admin.config_set("maxmemory", used + 2_000_000)
    admin.config_set("maxmemory-policy", "noeviction")
    svc = StateService(RedisBackend.from_url(private.url), StateData(max_bytes=1_000_000))
    stored = 0
    error: StateError | None = None
    for i in range(10_000):
        try:
            svc.update(f"u{i}", {"blob": "x" * 20_000, "i": i})
        except StateError as exc:
            error = exc
            break
        stored = i + 1
    assert isinstance(error, StoreFullError)
    assert stored > 10
    for i in range(stored):
        assert svc.get(f"u{i}")["i"] == i
    svc.close()


# -- corrupt data ----------------------------------------------------------------


def test_foreign_and_corrupt_data_is_reported_and_kept(redis_url: str, namespace: str) -> None:
    """Wrong types, pickles, foreign hashes, bad JSON: CorruptStateError, nothing overwritten."""
    svc = _svc(redis_url, namespace)
    backend = svc.manager.backend
    client = backend.client  # type: ignore[attr-defined]
    cases = {
        "string": lambda k: client.set(k, b"\x80\x04\x95pickle"),
        "list": lambda k: client.rpush(k, "a"),
        "foreign-hash": lambda k: client.hset(k, mapping={"name": "x", "#v": 1}),
        "no-version": lambda k: client.hset(k, '"a"', "1"),
        "bad-version": lambda k: client.hset(k, mapping={"#v": "x"}),
    }
    for user, plant in cases.items():
        key = backend.keys(user)[0]  # type: ignore[attr-defined]
        plant(key)
        before = client.dump(key)
        for action in (lambda u=user: svc.get(u), lambda u=user: svc.update(u, {"a": 2})):
            with pytest.raises(CorruptStateError) as info:
                action()
            assert info.value.key == key
            assert key in str(info.value)
        assert client.dump(key) == before, user

    # A stored value that is not JSON is caught when read back.
    key = backend.keys("bad-json")[0]  # type: ignore[attr-defined]
    client.hset(key, mapping={"#v": 1, '"a"': "{not json"})
    with pytest.raises(CorruptStateError):
        svc.get("bad-json")
    # The ops key of the wrong type is refused before anything is written.
    doc, ops, _ = backend.keys("bad-ops")  # type: ignore[attr-defined]
    client.set(ops, "x")
    with pytest.raises(CorruptStateError) as info:
        svc.update("bad-ops", {"a": 1})
    assert info.value.key == ops
    assert not client.exists(doc)
    svc.close()


# -- connection faults -------------------------------------------------------------


def test_lost_reply_is_applied_exactly_once(redis_url: str, namespace: str) -> None:
    """A write whose reply is lost is re-sent with its op id and applied once."""
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = ReplyDroppingProxy(port)
    svc = _svc(f"redis://127.0.0.1:{proxy.port}/0", namespace)
    try:
        svc.update("u", {"n": 0})
        proxy.arm(b"EVALSHA", times=1)
        out = svc.update_once("u", {"n": 1, "items": [1]}, op_id=None)
        assert proxy.dropped == 1
        assert out.applied
        assert out.version == 2
        assert svc.snapshot("u").version == 2
    finally:
        svc.close()
        proxy.close()


def test_lost_reply_without_retries_is_outcome_unknown(redis_url: str, namespace: str) -> None:
    """Without retries a lost reply raises OutcomeUnknown; a retry with the op id settles it."""
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = ReplyDroppingProxy(port)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    backend = RedisBackend.from_url(
        f"redis://127.0.0.1:{proxy.port}/0",
        namespace=namespace,
        retry=Retry(NoBackoff(), 0),
        resolve_attempts=0,
    )
    svc = StateService(backend)
    try:
        svc.update("u", {"n": 0})
        proxy.arm(b"EVALSHA", times=1)
        with pytest.raises(OutcomeUnknown) as info:
            svc.update("u", {"n": 1}, op_id="msg-7")
        assert info.value.op_id == "msg-7"
        again = svc.update_once("u", {"n": 1}, op_id="msg-7")
        assert again.status == "duplicate"
        assert again.version == 2
        assert svc.snapshot("u").version == 2
    finally:
        svc.close()
        proxy.close()


def test_server_down_is_backend_unavailable(namespace: str) -> None:
    """Nothing listening: reads and writes raise BackendUnavailable (or its OutcomeUnknown)."""
    port = servers.free_port()
    svc = _svc(f"redis://127.0.0.1:{port}/0", namespace, socket_connect_timeout=0.5)
    with pytest.raises(BackendUnavailable) as info:
        svc.get("u")
    assert str(info.value).startswith("Failed to read state")
    with pytest.raises(BackendUnavailable):
        svc.update("u", {"a": 1})
    svc.close()


def test_an_unreachable_cluster_is_backend_unavailable(namespace: str) -> None:
    """No node answers: from_url(cluster=True) and the async twin's first call raise ours."""
    url = f"redis://127.0.0.1:{servers.free_port()}/0"
    with pytest.raises(BackendUnavailable, match="cluster"):
        RedisBackend.from_url(url, cluster=True, socket_connect_timeout=0.5)

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(
            url, namespace=namespace, cluster=True, socket_connect_timeout=0.5
        )
        try:
            with pytest.raises(BackendUnavailable):
                await AsyncStateService(backend).get("u")
        finally:
            await backend.aclose()

    asyncio.run(main())


def test_bad_password_fails_fast_and_never_shows_the_secret(server_kind: str) -> None:
    """A wrong password raises BackendAuthenticationError after one connection, no retries."""
    register_secret(SECRET)
    server = servers.start_server(server_kind, "--requirepass", SECRET)
    try:
        admin = server.client(password=SECRET)
        before = int(admin.info("stats")["total_connections_received"])
        wrong = f"redis://:{SECRET}-wrong@127.0.0.1:{server.port}/0"
        svc = _svc(wrong)
        with pytest.raises(BackendAuthenticationError) as info:
            svc.update("u", {"a": 1})
        after = int(admin.info("stats")["total_connections_received"])
        assert after - before == 1
        texts = [str(info.value), repr(info.value), repr(svc), repr(svc.manager.backend)]
        assert not any(SECRET in t for t in texts)
        right = _svc(f"redis://:{SECRET}@127.0.0.1:{server.port}/0")
        assert right.update("u", {"a": 1}) == {"a": 1}
        assert SECRET not in repr(right.manager.backend)
        svc.close()
        right.close()
    finally:
        server.cleanup()


def test_kill_and_restart_with_aof_loses_no_acknowledged_update(server_kind: str) -> None:
    """SIGKILL mid-load with appendfsync always: every acknowledged update is there afterwards."""
    server = servers.start_server(server_kind, "--appendonly", "yes", "--appendfsync", "always")
    rules = StateData(preserved=["jwt_token"])
    acked: dict[str, set[int]] = {f"u{i}": set() for i in range(4)}
    errors: list[str] = []
    stop = threading.Event()

    def writer(user: str) -> None:
        svc = StateService(
            RedisBackend.from_url(server.url, socket_timeout=1, socket_connect_timeout=0.5), rules
        )
        svc.set_preserved(user, "jwt_token", f"token-{user}")
        i = 0
        while not stop.is_set():
            try:
                svc.update(user, {"seen": {str(i): i}})
                acked[user].add(i)
            except (BackendUnavailable, StoreBusyError):
                # Down, or up but still loading its AOF: neither acknowledges anything.
                errors.append("unavailable")
                time.sleep(0.05)
            i += 1
        svc.close()

    threads = [threading.Thread(target=writer, args=(u,)) for u in acked]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        run_id = server.client().info("server")["run_id"]
        server.kill()
        time.sleep(0.3)
        server.start()
        acked_at_restart = sum(len(v) for v in acked.values())
        assert server.client().info("server")["run_id"] != run_id
        # The writers come back once their retries reach the new server.
        deadline = time.monotonic() + 15
        while sum(len(v) for v in acked.values()) <= acked_at_restart + 20:
            assert time.monotonic() < deadline, "no write got through after the restart"
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    try:
        check = StateService(RedisBackend.from_url(server.url), rules)
        for user, seen in acked.items():
            doc = check.get(user)
            assert doc["jwt_token"] == f"token-{user}"
            stored = {int(k) for k in doc["seen"]}
            assert seen <= stored, f"lost {sorted(seen - stored)[:5]}"
        check.close()
    finally:
        server.cleanup()


# -- async ---------------------------------------------------------------------------


def test_cancelled_tasks_never_mix_users_or_half_write(redis_url: str, namespace: str) -> None:
    """Cancelling tasks mid-call never shows one user's state to another or half a write."""

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        users = [f"user{i}" for i in range(20)]
        rnd = random.Random(7)

        async def worker(user: str) -> None:
            for i in range(30):
                await svc.update(user, {"owner": user, "pair": {"a": i, "b": i}})
                doc = await svc.get(user)
                assert doc["owner"] == user
                assert doc["pair"]["a"] == doc["pair"]["b"]

        for _round in range(10):
            tasks = [asyncio.create_task(worker(u)) for u in users]
            await asyncio.sleep(rnd.uniform(0.001, 0.02))
            for task in tasks:
                if rnd.random() < 0.5:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    raise result
        for user in users:
            doc = await svc.get(user)
            assert doc["owner"] == user
            assert doc["pair"]["a"] == doc["pair"]["b"]
        await svc.aclose()

    asyncio.run(main())


# -- ownership -----------------------------------------------------------------------


def test_a_client_passed_in_is_never_closed(redis_url: str, namespace: str) -> None:
    """close() closes a client from_url created, and never the caller's own client."""
    client = redis.Redis.from_url(redis_url)
    closed: list[str] = []
    real_close = client.close
    client.close = lambda: closed.append("close")  # type: ignore[method-assign]
    client.connection_pool.disconnect = lambda *a, **k: closed.append("disconnect")  # type: ignore[method-assign]
    svc = StateService(RedisBackend(client, namespace=namespace))
    svc.update("u", {"a": 1})
    svc.close()
    assert closed == []
    owned = RedisBackend.from_url(redis_url, namespace=namespace)
    owned_closed: list[str] = []
    owned.client.close = lambda: owned_closed.append("close")  # type: ignore[method-assign]
    owned.close()
    assert owned_closed == ["close"]
    real_close()


def test_a_write_and_a_read_are_one_command_each(redis_url: str, namespace: str) -> None:
    """update() is one EVALSHA of the apply script, get() one command: the server says so."""
    import hashlib

    svc = _svc(redis_url, namespace)
    svc.update("u", {"warm": 1})
    svc.get("u")
    admin = redis.Redis.from_url(redis_url)
    admin.ping()  # connected before MONITOR starts, so its handshake is not counted
    with redis.Redis.from_url(redis_url).monitor() as monitor:
        svc.update("u", {"a": 1})
        svc.get("u")
        admin.echo("end-of-test")
        seen: list[str] = []
        while True:
            event = monitor.next_command()
            if "end-of-test" in event["command"]:
                break
            if event.get("client_type") != "lua":
                seen.append(event["command"])
    assert len(seen) == 2, seen
    assert seen[0].startswith("EVALSHA " + hashlib.sha1(APPLY_SCRIPT.encode()).hexdigest())  # noqa: S324
    assert seen[1].split()[0] in ("EVALSHA", "HGETALL")
    admin.close()
    svc.close()


def test_erase_leaves_no_key_of_the_user(redis_url: str, namespace: str) -> None:
    """After erase, no key names the user and the deadline index forgets them."""
    svc = _svc(redis_url, namespace)
    backend = svc.manager.backend
    try:
        svc.update_once("+34 600", {"a": 1}, op_id="m1")
        svc.update("other", {"b": 1})
        backend.schedule("+34 600", 1_000)
        claim = svc.claim("+34 600", "m2", lease=30)
        with (
            pytest.raises(LockLostError),  # its holder learns the lock went
            backend.lock("+34 600", "jwt-refresh", lease=30, wait=1),
        ):
            removed = svc.erase("+34 600")
        claim.release()
        assert removed == ["document", "operations", "claim", "lock", "deadline"]
        keys = {k.decode() for k in backend.client.scan_iter(match=f"{namespace}:*")}
        tails = [k.removeprefix(f"{namespace}:") for k in keys]  # the namespace is random hex
        assert not [t for t in tails if "34" in t], keys
        assert f"{namespace}:{{other}}" in keys
        assert backend.due(10**12) == []
    finally:
        svc.close()


def test_key_secret_keeps_user_ids_out_of_key_names(redis_url: str, namespace: str) -> None:
    """With key_secret no key name holds a user id; the same id always finds its keys."""
    secret = register_secret("pseudonym-secret-7c41d0e2aa")
    phone = "34600123456"
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace, key_secret=secret), StateData()
    )
    backend = svc.manager.backend
    try:
        svc.update_once(phone, {"a": 1}, op_id="m1")
        with svc.claim(phone, "m2", lease=30) as claim:
            claim.update({"b": 2})
            keys = [k.decode() for k in backend.client.scan_iter(match=f"{namespace}:*")]
        assert len(keys) == 3  # document, op log, claim
        assert not [k for k in keys if "600123" in k], keys
        assert all(
            re.fullmatch(rf"{namespace}:\{{#[a-z2-7]{{32}}\}}(:ops|:claim)?", k) for k in keys
        )
        assert secret not in repr(backend)
        assert svc.get(phone) == {"a": 1, "b": 2}
        other = RedisBackend.from_url(redis_url, namespace=namespace, key_secret=secret + "x")
        try:
            assert other.load(phone) is None  # another secret names other keys
        finally:
            other.close()
        assert svc.erase(phone) == ["document", "operations"]
        assert list(backend.client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        svc.close()
    with pytest.raises(ConfigurationError, match="16 bytes"):
        RedisBackend.from_url(redis_url, key_secret="short")


def test_deadline_shards_zero_keeps_no_index(redis_url: str, namespace: str) -> None:
    """deadline_shards=0: scheduling writes nothing, due() is a UsageError."""
    backend = RedisBackend.from_url(redis_url, namespace=namespace, deadline_shards=0)
    try:
        backend.schedule("ana", 1_000)
        backend.unschedule("ana")
        assert backend.deadline_keys() == []
        with pytest.raises(UsageError, match="deadline_shards=0"):
            backend.due(2_000)
        assert list(backend.client.scan_iter(match=f"{namespace}:*")) == []
    finally:
        backend.close()


@pytest.mark.parametrize("url", ["sqlite:///bot.db", "postgresql://u:hunter2@db/x", "localhost"])
@pytest.mark.parametrize("cluster", [False, True])
def test_a_url_that_is_not_redis_is_a_configuration_error_without_the_url(
    url: str, cluster: bool
) -> None:
    """Both twins, standalone and Cluster: a typed error naming the schemes, never the password."""
    for backend in (RedisBackend, AsyncRedisBackend):
        with pytest.raises(ConfigurationError, match="not a Redis URL") as caught:
            backend.from_url(url, cluster=cluster)
        assert "hunter2" not in str(caught.value)
