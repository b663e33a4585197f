"""chatstate.integrations.prometheus: real operations counted in a fresh registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, StateData, StateService
from chatstate.auth import get_valid_token
from chatstate.exceptions import CorruptStateError, PreservedFieldError, TokenRefreshError
from chatstate.integrations.prometheus import PrometheusObserver
from chatstate.observe import add_observer, notify_flow_step, remove_observer
from conftest import register_secret


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    fresh = CollectorRegistry()
    observer = add_observer(PrometheusObserver(fresh))
    yield fresh
    remove_observer(observer)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def label_values(registry: CollectorRegistry) -> set[str]:
    return {v for family in registry.collect() for s in family.samples for v in s.labels.values()}


def test_memory_operations_are_counted_and_timed(registry: CollectorRegistry) -> None:
    """Updates, duplicates and reads on the memory backend appear under their labels."""
    svc = StateService(rules=StateData(preserved=["p"]))
    svc.update("alice@example.com", {"a": 1}, op_id="m1")
    svc.update("alice@example.com", {"a": 1}, op_id="m1")
    svc.get("alice@example.com")
    with pytest.raises(PreservedFieldError):
        svc.update("alice@example.com", {"p": 1})
    ops = "chatstate_operations_total"
    assert value(registry, ops, operation="update", outcome="applied") == 1
    assert value(registry, ops, operation="update", outcome="duplicate") == 1
    assert value(registry, ops, operation="get", outcome="read") == 1
    assert value(registry, ops, operation="update", outcome="error") == 1
    errors = "chatstate_operation_errors_total"
    assert value(registry, errors, operation="update", error="PreservedFieldError") == 1
    assert value(registry, "chatstate_operation_duration_seconds_count", operation="update") == 3
    assert value(registry, "chatstate_operation_duration_seconds_sum", operation="update") > 0
    assert not any("alice" in v for v in label_values(registry))


def test_metric_names_follow_prometheus_conventions(registry: CollectorRegistry) -> None:
    """The exposition names counters *_total and the histogram *_seconds with buckets."""
    svc = StateService()
    svc.update("u", {"a": 1})
    svc.manager.transaction("u", lambda d: d)
    notify_flow_step("signup", "ask_name", "answered")
    registry_text = generate_latest(registry).decode()
    for line in (
        "# TYPE chatstate_operations_total counter",
        "# TYPE chatstate_operation_duration_seconds histogram",
        "# TYPE chatstate_operation_errors_total counter",
        "# TYPE chatstate_retries_total counter",
        "# TYPE chatstate_flow_steps_total counter",
        "# TYPE chatstate_token_refreshes_total counter",
        'chatstate_operation_duration_seconds_bucket{le="0.0001",operation="update"}',
        'chatstate_flow_steps_total{flow="signup",outcome="answered",step="ask_name"} 1.0',
    ):
        assert line in registry_text


def test_namespace_and_buckets_are_configurable() -> None:
    """namespace= renames the metrics; buckets= sets the histogram's bounds."""
    fresh = CollectorRegistry()
    observer = add_observer(PrometheusObserver(fresh, namespace="mybot", buckets=[0.5, 1]))
    try:
        StateService().update("u", {"a": 1})
    finally:
        remove_observer(observer)
    assert value(fresh, "mybot_operations_total", operation="update", outcome="applied") == 1
    assert (
        value(fresh, "mybot_operation_duration_seconds_bucket", operation="update", le="0.5") == 1
    )


def test_one_registry_holds_one_observer() -> None:
    """A second observer on the same registry is refused, as prometheus_client refuses duplicates."""
    fresh = CollectorRegistry()
    PrometheusObserver(fresh)
    with pytest.raises(ValueError, match="Duplicated"):
        PrometheusObserver(fresh)


@pytest.mark.redis
def test_redis_operations_retries_and_errors_are_counted(
    registry: CollectorRegistry, redis_url: str, namespace: str
) -> None:
    """On Redis: writes, a transaction retry and a corrupt document's error are all counted."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    svc.update("u", {"n": 0})
    raced: list[int] = []

    def bump(doc: dict[str, Any]) -> dict[str, Any]:
        if not raced:
            raced.append(1)
            svc.update("u", {"other": 1})
        return {**doc, "n": doc["n"] + 1}

    svc.transaction("u", bump)
    with redis.Redis.from_url(redis_url) as raw:
        raw.set(svc.manager.backend.keys("broken")[0], "not a hash")
    with pytest.raises(CorruptStateError):
        svc.get("broken")
    svc.close()
    ops = "chatstate_operations_total"
    assert value(registry, ops, operation="update", outcome="applied") == 2
    assert value(registry, ops, operation="transaction", outcome="applied") == 1
    assert value(registry, "chatstate_retries_total", operation="transaction") == 1
    errors = "chatstate_operation_errors_total"
    assert value(registry, errors, operation="get", error="CorruptStateError") == 1
    assert not any(v in {"u", "broken"} for v in label_values(registry))


@pytest.mark.redis
def test_async_redis_operations_are_counted(
    registry: CollectorRegistry, redis_url: str, namespace: str
) -> None:
    """Concurrent asyncio writes through the pipelined backend are each counted once."""

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        await asyncio.gather(*(svc.increment(f"u{i % 5}", "n") for i in range(50)))
        await svc.aclose()

    asyncio.run(main())
    ops = "chatstate_operations_total"
    assert value(registry, ops, operation="increment", outcome="applied") == 50
    assert (
        value(registry, "chatstate_operation_duration_seconds_count", operation="increment") == 50
    )


@pytest.mark.redis
def test_token_refreshes_are_counted(
    registry: CollectorRegistry, redis_url: str, namespace: str
) -> None:
    """A refreshed token and a failed refresh are counted by outcome; no token in any label."""
    key = "k" * 40
    old = register_secret(jwt.encode({"exp": int(time.time()) - 5}, key, algorithm="HS256"))
    new = register_secret(jwt.encode({"exp": int(time.time()) + 600}, key, algorithm="HS256"))
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace),
        StateData(preserved=["jwt_token"]),
    )
    svc.set_preserved("a", "jwt_token", old)
    svc.set_preserved("b", "jwt_token", old)
    assert get_valid_token(svc.user("a"), lambda _old: new) == new

    def broken(_old: str | None) -> str:
        raise ConnectionError("login API down")

    with pytest.raises(TokenRefreshError):
        get_valid_token(svc.user("b"), broken)
    svc.close()
    refreshes = "chatstate_token_refreshes_total"
    assert value(registry, refreshes, outcome="refreshed") == 1
    assert value(registry, refreshes, outcome="failed") == 1
    assert not any(old in v or new in v for v in label_values(registry))
