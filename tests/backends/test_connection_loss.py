"""Connections the server closes (CLIENT KILL, a restart, a lost reply): every call carries on.

Issue 17's chaos run: after ``CLIENT KILL`` the first use of a killed pooled
connection failed the deadline-scheduling call with ``BackendUnavailable``. Here
every store call of both twins (standalone, pipelined or not, and Cluster) is
made right after its connections were killed, after a restart of the test's own
server, and with its reply dropped, and must answer as if nothing had happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import warnings
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.exceptions as rex
from redis.cluster import RedisCluster

import servers
from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, RetryPolicy, StateService
from chatstate.exceptions import BackendUnavailable, OutcomeUnknown
from chatstate.state import StateManager
from chatstate.state._memory import MemoryBackend
from proxy import ReplyDroppingProxy

pytestmark = pytest.mark.redis

QUICK = RetryPolicy(attempts=4, initial=0.01, maximum=0.02)  # redis-py's connect retries too


@pytest.fixture(scope="module", params=list(servers.KINDS))
def private(request: pytest.FixtureRequest) -> Iterator[servers.Server]:
    """A server of this module's own, whose clients it may kill and which it may restart."""
    if servers.find_binary(request.param) is None:
        pytest.skip(f"no {request.param} server binary")
    server = servers.start_server(request.param)
    yield server
    server.cleanup()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


class Killer:
    """Closes every connection but its own on some servers, as ``CLIENT KILL`` does."""

    def __init__(self, ports: list[int], *, by_id: bool = False) -> None:
        self.admins = [redis.Redis(port=port) for port in ports]
        self.by_id = by_id

    def __call__(self) -> int:
        killed = 0
        for admin in self.admins:
            if self.by_id:  # CLIENT KILL ID, one connection at a time
                mine = admin.client_id()
                for client in admin.client_list(_type="normal"):
                    if int(client["id"]) != mine:
                        with contextlib.suppress(rex.ResponseError):  # gone meanwhile
                            killed += int(admin.client_kill_filter(_id=client["id"]))
            else:  # CLIENT KILL TYPE normal SKIPME yes
                killed += int(admin.client_kill_filter(_type="normal", skipme=True))
        return killed

    def close(self) -> None:
        for admin in self.admins:
            admin.close()


def _cluster_ports(url: str) -> list[int]:
    client = RedisCluster.from_url(url)
    try:
        return [int(node.port) for node in client.get_nodes()]
    finally:
        client.close()


# -- the calls of the message path, each one step ---------------------------------------

USER = "+34 600 000 001"
ERASED = ["document", "operations"]
Calls = list[tuple[str, Callable[[], Any]]]


def _sync_calls(  # noqa: C901 - one small function per call
    svc: StateService, backend: RedisBackend, kill: Callable[[], int], *, lost: bool = False
) -> Calls:
    """Every store call of a message's life, each checking its own answer, in order.

    ``lost``: replies are lost, so erase may be re-sent after it ran, and then
    report only what its first run left (nothing), though everything is gone.
    """
    erased = ([], ERASED) if lost else (ERASED,)
    held: dict[str, Any] = {}

    def apply() -> None:
        assert svc.update_once(USER, {"n": 1}, op_id="m-1").status == "applied"

    def load() -> None:
        snapshot = backend.load(USER)
        assert snapshot is not None
        assert snapshot.data["n"] == 1

    def claim() -> None:
        held["claim"] = svc.claim(USER, "m-commit", lease=30)

    def commit() -> None:
        held["claim"].update({"step": "done"})
        assert held["claim"].commit().status == "applied"

    def claim_again() -> None:
        held["claim"] = svc.claim(USER, "m-release", lease=30)

    def release() -> None:
        held["claim"].release()

    def schedule() -> None:
        backend.schedule(USER, 1_000)

    def due() -> None:
        assert backend.due(10**12) == [(USER, 1_000)]

    def unschedule() -> None:
        backend.unschedule(USER)
        assert backend.due(10**12) == []

    def lock() -> None:
        with backend.lock(USER, "jwt-refresh", lease=5, wait=1):
            assert kill() > 0  # the release too goes out on a killed connection

    def erase() -> None:
        assert backend.erase(USER) in erased
        assert backend.load(USER) is None

    return [
        ("apply", apply),
        ("load", load),
        ("claim", claim),
        ("commit", commit),
        ("claim", claim_again),
        ("release", release),
        ("schedule", schedule),
        ("due", due),
        ("unschedule", unschedule),
        ("ping", backend.ping),
        ("lock", lock),
        ("erase", erase),
    ]


def _async_calls(  # noqa: C901 - one small function per call
    svc: AsyncStateService,
    backend: AsyncRedisBackend,
    kill: Callable[[], int],
    *,
    lost: bool = False,
) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    """The asyncio twin of :func:`_sync_calls`."""
    erased = ([], ERASED) if lost else (ERASED,)
    held: dict[str, Any] = {}

    async def apply() -> None:
        assert (await svc.update_once(USER, {"n": 1}, op_id="m-1")).status == "applied"

    async def load() -> None:
        snapshot = await backend.load(USER)
        assert snapshot is not None
        assert snapshot.data["n"] == 1

    async def claim() -> None:
        held["claim"] = await svc.claim(USER, "m-commit", lease=30)

    async def commit() -> None:
        held["claim"].update({"step": "done"})
        assert (await held["claim"].commit()).status == "applied"

    async def claim_again() -> None:
        held["claim"] = await svc.claim(USER, "m-release", lease=30)

    async def release() -> None:
        await held["claim"].release()

    async def schedule() -> None:
        await backend.schedule(USER, 1_000)

    async def due() -> None:
        assert await backend.due(10**12) == [(USER, 1_000)]

    async def unschedule() -> None:
        await backend.unschedule(USER)
        assert await backend.due(10**12) == []

    async def lock() -> None:
        async with backend.lock(USER, "jwt-refresh", lease=5, wait=1):
            assert kill() > 0

    async def erase() -> None:
        assert await backend.erase(USER) in erased
        assert await backend.load(USER) is None

    return [
        ("apply", apply),
        ("load", load),
        ("claim", claim),
        ("commit", commit),
        ("claim", claim_again),
        ("release", release),
        ("schedule", schedule),
        ("due", due),
        ("unschedule", unschedule),
        ("ping", backend.ping),
        ("lock", lock),
        ("erase", erase),
    ]


def _check_sync(backend: RedisBackend, kill: Callable[[], int]) -> None:
    """Make every call of the message path right after a CLIENT KILL; none may raise."""
    assert backend.load(USER) is None  # a pooled connection to kill
    for name, call in _sync_calls(StateService(backend), backend, kill):
        assert kill() > 0, f"no connection to kill before {name}"
        call()


async def _check_async(backend: AsyncRedisBackend, kill: Callable[[], int]) -> None:
    """The asyncio twin of :func:`_check_sync`."""
    assert await backend.load(USER) is None
    for name, call in _async_calls(AsyncStateService(backend), backend, kill):
        assert kill() > 0, f"no connection to kill before {name}"
        await call()


# -- CLIENT KILL -----------------------------------------------------------------------


@pytest.mark.parametrize("by_id", [False, True], ids=["type-normal", "by-id"])
def test_every_sync_call_survives_client_kill(
    private: servers.Server, namespace: str, by_id: bool
) -> None:
    """After CLIENT KILL (TYPE normal, or ID), every sync call of the message path succeeds."""
    backend = RedisBackend.from_url(private.url, namespace=namespace)
    kill = Killer([private.port], by_id=by_id)
    try:
        _check_sync(backend, kill)
    finally:
        kill.close()
        backend.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "plain"])
def test_every_async_call_survives_client_kill(
    private: servers.Server, namespace: str, pipelining: bool
) -> None:
    """After CLIENT KILL, every asyncio call succeeds, pipelined or not."""
    kill = Killer([private.port])

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(
            private.url, namespace=namespace, pipelining=pipelining
        )
        try:
            await _check_async(backend, kill)
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        kill.close()


def test_every_sync_call_survives_client_kill_on_a_cluster(
    cluster_url: str, namespace: str
) -> None:
    """On a Cluster, CLIENT KILL on every node: every sync call succeeds."""
    backend = RedisBackend.from_url(cluster_url, namespace=namespace, cluster=True)
    kill = Killer(_cluster_ports(cluster_url))
    try:
        _check_sync(backend, kill)
    finally:
        kill.close()
        backend.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "plain"])
def test_every_async_call_survives_client_kill_on_a_cluster(
    cluster_url: str, namespace: str, pipelining: bool
) -> None:
    """On a Cluster, CLIENT KILL on every node: every asyncio call succeeds."""
    kill = Killer(_cluster_ports(cluster_url))

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(
            cluster_url, namespace=namespace, cluster=True, pipelining=pipelining
        )
        try:
            await _check_async(backend, kill)
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        kill.close()
        # redis-py 7's async RedisCluster replaces its node objects when a connection
        # breaks and leaves the old ones to the garbage collector, which warns about
        # them in whichever test runs next: collect them here (redis-py's, not ours).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


# -- a restart of the server -------------------------------------------------------------


def _restart(server: servers.Server) -> None:
    """SIGKILL the server and start it again on its port (no persistence: data is gone)."""
    server.kill()
    server.start()


def test_every_sync_call_survives_a_server_restart(private: servers.Server, namespace: str) -> None:
    """SIGKILL and a restart leave 8 dead pooled connections; every call still succeeds.

    While the server is down a write is BackendUnavailable saying nothing was sent.
    """
    backend = RedisBackend.from_url(private.url, namespace=namespace, retry=QUICK)
    svc = StateService(backend)
    try:
        pool = backend._conns  # eight idle connections, to be killed
        assert pool is not None
        conns = [pool.acquire() for _ in range(8)]
        for conn in conns:
            pool.release(conn)
        private.kill()
        with pytest.raises(BackendUnavailable) as info:
            svc.update_once(USER, {"n": 1}, op_id="while-down")
        assert not isinstance(info.value, OutcomeUnknown)
        assert "nothing was sent" in str(info.value)
        private.start()
        for _name, call in _sync_calls(svc, backend, lambda: 1):
            call()
        _restart(private)
        for _name, call in _sync_calls(svc, backend, lambda: 1):
            call()
    finally:
        backend.close()
        if private.proc is None:  # the module's server, for the tests after this one
            private.start()


def test_every_async_call_survives_a_server_restart(
    private: servers.Server, namespace: str
) -> None:
    """The asyncio twin: lanes and idle connections dead after a restart; every call succeeds."""

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(private.url, namespace=namespace, retry=QUICK)
        svc = AsyncStateService(backend)
        try:
            # Every lane holds a connection, and eight more wait idle.
            await asyncio.gather(*(backend.load(f"warm-{i}") for i in range(64)))
            pool = backend._conns
            assert pool is not None
            conns = [await pool.acquire() for _ in range(8)]
            for conn in conns:
                pool.release(conn)
            _restart(private)
            for _name, call in _async_calls(svc, backend, lambda: 1):
                await call()
        finally:
            await backend.aclose()

    asyncio.run(main())


# -- a reply lost on the way: the command ran, or not --------------------------------------


class Dropped:
    """Each call of the message path, with the reply to its command thrown away once."""

    def __init__(self, backend: Any) -> None:
        self.lock = backend._lock_sha.encode()  # the lock script's SHA
        self.load = b"HGETALL" if backend._plain_reads else backend._load_script.sha.encode()
        self.apply = backend._apply_script.sha.encode()

    def markers(self) -> dict[str, tuple[bytes, int]]:
        """What the requests to drop the reply of hold, and how many, by call."""
        return {
            "apply": (self.apply, 1),
            "load": (self.load, 1),
            "claim": (self.apply, 1),
            "commit": (self.apply, 1),
            "release": (self.apply, 1),
            "schedule": (b"ZADD", 1),
            "due": (b"ZRANGEBYSCORE", 1),
            "unschedule": (b"ZREM", 1),
            "lock": (self.lock, 2),  # the acquire's, and the release's (armed in the block)
            "erase": (b"local parts", 1),
        }


def test_a_lost_reply_to_any_sync_call_is_settled(redis_url: str, namespace: str) -> None:
    """A reply dropped (the connection closed after the command ran): every call answers right."""
    proxy = ReplyDroppingProxy(_port(redis_url))
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace)
    markers = Dropped(backend).markers()

    def drop_the_release() -> int:
        proxy.arm(markers["lock"][0], times=1)
        return 1

    try:
        calls = _sync_calls(StateService(backend), backend, drop_the_release, lost=True)
        for name, call in calls:
            if name == "ping":
                call()
                continue
            before = proxy.dropped
            marker, times = markers[name]
            proxy.arm(marker, times=1)
            call()
            assert proxy.dropped == before + times, name
    finally:
        backend.close()
        proxy.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "plain"])
def test_a_lost_reply_to_any_async_call_is_settled(
    redis_url: str, namespace: str, pipelining: bool
) -> None:
    """The asyncio twin: a dropped reply is settled for every call, pipelined or not."""
    proxy = ReplyDroppingProxy(_port(redis_url))

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(
            f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace, pipelining=pipelining
        )
        markers = Dropped(backend).markers()

        def drop_the_release() -> int:
            proxy.arm(markers["lock"][0], times=1)
            return 1

        try:
            calls = _async_calls(AsyncStateService(backend), backend, drop_the_release, lost=True)
            for name, call in calls:
                if name == "ping":
                    await call()
                    continue
                before = proxy.dropped
                marker, times = markers[name]
                proxy.arm(marker, times=1)
                await call()
                assert proxy.dropped == before + times, name
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        proxy.close()


# -- what the errors say ------------------------------------------------------------------


class RefusingAfterDrop(ReplyDroppingProxy):
    """Drops one reply, and from then on refuses every connection: no re-send can go out."""

    def _down(self, upstream: socket.socket, client: socket.socket, state: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            while data := upstream.recv(65536):
                if state["drop_next_reply"]:
                    # Refuse first, then hang up: the client reconnects at once.
                    self.closing = True
                    with contextlib.suppress(OSError):
                        self.listener.shutdown(socket.SHUT_RDWR)
                    self.listener.close()
                    with self.lock:
                        self.dropped += 1
                    break
                client.sendall(data)
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def test_a_write_lost_then_not_resent_is_unknown_and_says_only_that(
    redis_url: str, namespace: str
) -> None:
    """Reply lost, re-send refused: OutcomeUnknown that may have applied, never 'nothing sent'."""
    proxy = RefusingAfterDrop(_port(redis_url))
    backend = RedisBackend.from_url(
        f"redis://127.0.0.1:{proxy.port}/0",
        namespace=namespace,
        retry=RetryPolicy(attempts=1),
        resolve_retry=RetryPolicy(attempts=2, initial=0.0, jitter=0),
    )
    svc = StateService(backend)
    try:
        svc.update("u", {"n": 0})
        proxy.arm(b"EVALSHA", times=1)
        with pytest.raises(OutcomeUnknown) as info:
            svc.update("u", {"n": 1}, op_id="wamid.lost")
    finally:
        svc.close()
        proxy.close()
    text = str(info.value)
    assert info.value.op_id == "wamid.lost"
    assert "may or may not have been applied" in text
    assert "re-sending it failed" in text
    assert "nothing was sent" not in text
    assert "NotSent" not in text


def test_each_failure_says_one_thing() -> None:
    """Not sent: BackendUnavailable 'nothing was sent'; sent and lost: 'may or may not'."""
    from chatstate.state.redis._core import translate
    from chatstate.state.redis._pipeline import NotSent

    write = StateManager(MemoryBackend()).update_write({"a": 1}, "m1")
    refused = NotSent("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    lost = rex.ConnectionError("Connection closed by server.")

    not_sent = translate(refused, "k", write)
    assert type(not_sent) is BackendUnavailable
    assert "nothing was sent" in str(not_sent)
    assert "may" not in str(not_sent)

    sent = translate(lost, "k", write)
    assert isinstance(sent, OutcomeUnknown)
    assert "may or may not have been applied" in str(sent)
    assert "nothing was sent" not in str(sent)

    resent = translate(refused, "k", write, lost=lost)
    assert isinstance(resent, OutcomeUnknown)
    assert "Connection closed by server" in str(resent)  # why it is unknown
    assert "Connection refused" in str(resent)  # and why it stays so
    assert "nothing was sent" not in str(resent)
    assert "NotSent" not in str(resent)

    read = translate(lost, "k")  # a read has no outcome to doubt
    assert type(read) is BackendUnavailable
    assert "may" not in str(read)
