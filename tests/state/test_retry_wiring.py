"""The retry policy wired into the four loops: transactions, claims, re-sends and redis-py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatstate import AsyncStateService, RedisBackend, RetryPolicy, StateService
from chatstate.exceptions import (
    BackendUnavailable,
    ConfigurationError,
    ConflictError,
    UserBusyError,
)
from chatstate.observe import (
    Observer,
    OperationFinished,
    RetryScheduled,
    add_observer,
    remove_observer,
)
from chatstate.state.redis._sync.retry import PolicyRetry
from fakes import Fake
from proxy import ReplyDroppingProxy


def _always_losing(svc: StateService) -> Any:
    def fn(doc: dict[str, Any]) -> dict[str, Any]:
        svc.update("u", {"other": doc.get("other", 0) + 1})  # another writer wins every race
        return {**doc, "n": 1}

    return fn


def test_a_transaction_follows_its_policy() -> None:
    """retry=RetryPolicy(attempts=3): three runs, two fake sleeps, two events, then ConflictError."""
    fake = Fake()
    svc = StateService(retry=fake.policy(attempts=3, jitter=0))
    with pytest.raises(ConflictError) as info:
        svc.transaction("u", _always_losing(svc))
    assert info.value.attempts == 3
    assert "gave up after 3 attempts" in str(info.value)
    assert fake.naps == pytest.approx([0.05, 0.1])
    assert [(e.operation, e.attempt, e.reason) for e in fake.events] == [
        ("transaction", 1, "conflict"),
        ("transaction", 2, "conflict"),
    ]


def test_max_attempts_per_call_still_wins() -> None:
    """``transaction(max_attempts=2)`` overrides the policy's attempts for one call."""
    fake = Fake()
    svc = StateService(retry=fake.policy(attempts=8))
    with pytest.raises(ConflictError) as info:
        svc.transaction("u", _always_losing(svc), max_attempts=2)
    assert (info.value.attempts, len(fake.naps)) == (2, 1)


def test_max_attempts_and_retry_together_are_refused() -> None:
    """Two answers to one question: ConfigurationError at construction."""
    with pytest.raises(ConfigurationError, match="max_attempts or retry"):
        StateService(max_attempts=3, retry=RetryPolicy())
    with pytest.raises(ConfigurationError, match="retry must be a chatstate RetryPolicy"):
        StateService(retry=3)  # type: ignore[arg-type]
    assert StateService(max_attempts=3).manager.retry.attempts == 3


def test_the_async_transaction_awaits_the_policys_asleep() -> None:
    """The asyncio twin sleeps through ``asleep`` and gives up after ``attempts``."""
    fake = Fake()

    async def main() -> None:
        svc = AsyncStateService(retry=fake.policy(attempts=4))

        async def fn(doc: dict[str, Any]) -> dict[str, Any]:
            await svc.update("u", {"other": doc.get("other", 0) + 1})
            return doc

        with pytest.raises(ConflictError):
            await svc.transaction("u", fn)

    asyncio.run(main())
    assert len(fake.naps) == 3


def test_a_busy_claim_waits_within_its_wait_by_the_claim_policy() -> None:
    """claim(wait=0.05) on a busy user: fake sleeps add up to at most 50 ms, each reported."""
    fake = Fake()
    svc = StateService(claim_retry=fake.policy(attempts=None, budget=10, initial=0.01, jitter=0))
    held = svc.claim("ana", "m1", lease=30)
    with pytest.raises(UserBusyError):
        svc.claim("ana", "m2", lease=30, wait=0.05)
    held.release()
    assert 0 < sum(fake.naps) <= 0.05
    assert {(e.operation, e.reason) for e in fake.events} == {("claim", "busy")}


def test_a_claim_without_wait_never_sleeps() -> None:
    """wait=0: one request, busy, UserBusyError at once (the router's due() relies on it)."""
    fake = Fake()
    svc = StateService(claim_retry=fake.policy(attempts=None, budget=10))
    held = svc.claim("ana", "m1", lease=30)
    with pytest.raises(UserBusyError):
        svc.claim("ana", "m2", lease=30, wait=0)
    held.release()
    assert (fake.naps, fake.events) == ([], [])


class Seen(Observer):
    def __init__(self) -> None:
        self.events: list[RetryScheduled] = []
        self.finished: list[OperationFinished] = []

    def retry_scheduled(self, event: RetryScheduled) -> None:
        self.events.append(event)

    def operation_finished(self, event: OperationFinished, token: Any) -> None:
        self.finished.append(event)


def test_observers_hear_of_claim_retries_and_count_them_as_attempts() -> None:
    """A busy claim's retries reach retry_scheduled; attempts counts them."""
    fake = Fake()
    svc = StateService(
        claim_retry=RetryPolicy(
            attempts=3, initial=0.001, clock=fake.clock, sleep=fake.sleep
        )  # the default hook: the observers
    )
    held = svc.claim("ana", "m1", lease=30)
    seen = add_observer(Seen())
    try:
        with pytest.raises(UserBusyError):
            svc.claim("ana", "m2", lease=30, wait=5)
    finally:
        remove_observer(seen)
        held.release()
    assert [(e.operation, e.attempt, e.error) for e in seen.events] == [
        ("claim", 1, None),
        ("claim", 2, None),
    ]
    (claim,) = [e for e in seen.finished if e.operation == "claim"]
    assert (claim.outcome, claim.attempts) == ("error", 3)


@pytest.mark.redis
def test_a_lost_reply_is_resent_by_the_resolve_policy(redis_url: str, namespace: str) -> None:
    """A dropped reply: the write is re-sent per resolve_retry (fake sleep), reported as resolve."""
    port = int(redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])
    proxy = ReplyDroppingProxy(port)
    fake = Fake()
    backend = RedisBackend.from_url(
        f"redis://127.0.0.1:{proxy.port}/0",
        namespace=namespace,
        retry=RetryPolicy(attempts=1),  # redis-py itself does not retry
        resolve_retry=fake.policy(attempts=3, jitter=0),
    )
    svc = StateService(backend)
    try:
        svc.update("u", {"n": 0})
        proxy.arm(b"EVALSHA", times=1)
        assert svc.update("u", {"n": 1}, op_id="msg-1") == {"n": 1}
        assert svc.manager.load("u").version == 2  # applied once
    finally:
        svc.close()
        proxy.close()
    resends = [(e.operation, e.attempt, e.reason) for e in fake.events if e.operation != "noscript"]
    assert resends == [("resolve", 1, "OutcomeUnknown")]  # a fresh server also says NOSCRIPT once
    assert fake.naps == pytest.approx([0.05])


@pytest.mark.redis
def test_noscript_is_reported_and_answered_by_eval(redis_url: str, namespace: str) -> None:
    """After SCRIPT FLUSH the write still lands, and the hook hears one ``noscript`` retry."""
    fake = Fake()
    backend = RedisBackend.from_url(redis_url, namespace=namespace, resolve_retry=fake.policy())
    svc = StateService(backend)
    try:
        svc.update("u", {"n": 0})
        backend.client.script_flush()
        assert svc.update("u", {"n": 1}) == {"n": 1}
    finally:
        svc.close()
    assert [(e.operation, e.reason, e.delay) for e in fake.events] == [
        ("noscript", "NoScriptError", 0.0)
    ]


def test_from_url_takes_a_policy_for_redis_pys_own_retries() -> None:
    """``from_url(retry=RetryPolicy(...))`` becomes a PolicyRetry; the default is REDIS_CLIENT."""
    policy = RetryPolicy(attempts=2)
    backend = RedisBackend.from_url("redis://127.0.0.1:1/0", retry=policy)
    retry = backend.client.connection_pool.connection_kwargs["retry"]
    assert isinstance(retry, PolicyRetry)
    assert retry.policy is policy
    assert retry.get_retries() == 1
    backend.close()


def test_redis_py_retries_are_not_nested() -> None:
    """A policy of 3 attempts makes 3 connections, not 3 x 3 (redis-py connects inside a retry)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(50)
    accepted: list[int] = []

    def hang_up() -> None:  # accept every connection and close it at once
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    events: list[Any] = []
    policy = RetryPolicy(attempts=3, initial=0.0, sleep=lambda _s: None, on_retry=events.append)
    port = listener.getsockname()[1]
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0", retry=policy)
    try:
        with pytest.raises(BackendUnavailable):
            backend.ping()
        assert len(accepted) == 3
        assert len(events) == 2  # two retries after the first attempt
    finally:
        backend.close()
        listener.close()


def test_from_url_refuses_a_retry_that_is_no_policy() -> None:
    """retry= takes a RetryPolicy or a redis-py Retry; anything else fails at once."""
    with pytest.raises(ConfigurationError, match="retry must be"):
        RedisBackend.from_url("redis://127.0.0.1:1/0", retry=5)
