"""chatstate.integrations.otel: spans and the duration metric, read back from the SDK."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from chatstate import (
    AsyncRedisBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate.exceptions import CorruptStateError, PreservedFieldError
from chatstate.integrations.otel import OTelObserver, probe_system
from chatstate.observe import add_observer, remove_observer


class Telemetry:
    """A tracer and a meter provider that keep everything in memory."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("test")

    def finished(self, name_prefix: str = "chatstate ") -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name.startswith(name_prefix)]

    def durations(self) -> list[tuple[dict[str, Any], int]]:
        """Every data point of db.client.operation.duration: its attributes and count."""
        data = self.reader.get_metrics_data()
        points = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "db.client.operation.duration":
                        assert metric.unit == "s"
                        points.extend(
                            (dict(p.attributes or {}), p.count) for p in metric.data.data_points
                        )
        return points


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    observer = add_observer(
        OTelObserver(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    )
    yield t
    remove_observer(observer)


def server_system(url: str) -> str:
    """What the server at ``url`` is, asked directly."""
    with redis.Redis.from_url(url) as raw:
        info = raw.info("server")
    return "valkey" if "valkey_version" in info or info.get("server_name") == "valkey" else "redis"


@pytest.mark.redis
def test_redis_spans_follow_the_database_conventions(
    telemetry: Telemetry, redis_url: str, namespace: str
) -> None:
    """A write is a CLIENT span with db.*, server.* and the script's name, under the caller's span."""
    backend = RedisBackend.from_url(redis_url, namespace=namespace)
    svc = StateService(backend)
    with telemetry.tracer.start_as_current_span("handle message") as parent:
        svc.update("u", {"a": 1})
        svc.get("u")
    svc.close()
    update, get = telemetry.finished()
    described = backend.describe()
    assert update.name == "chatstate update"
    assert update.kind is SpanKind.CLIENT
    assert update.parent is not None
    assert update.parent.span_id == parent.get_span_context().span_id
    assert dict(update.attributes or {}) == {
        "db.system.name": server_system(redis_url),
        "db.operation.name": "update",
        "db.stored_procedure.name": "chatstate.apply",
        "server.address": described["server.address"],
        "server.port": described["server.port"],
        "chatstate.backend": "redis",
        "chatstate.namespace": namespace,
        "chatstate.outcome": "applied",
        "chatstate.attempts": 1,
    }
    assert update.status.status_code is StatusCode.UNSET
    assert get.name == "chatstate get"
    assert get.attributes is not None
    assert "db.stored_procedure.name" not in get.attributes
    assert get.attributes["chatstate.outcome"] == "read"


@pytest.mark.redis
def test_failures_set_error_type_and_status(
    telemetry: Telemetry, redis_url: str, namespace: str
) -> None:
    """An operation that raises ends its span with status ERROR and error.type, and no message."""
    svc = StateService(
        RedisBackend.from_url(redis_url, namespace=namespace), StateData(preserved=["pin"])
    )
    with redis.Redis.from_url(redis_url) as raw:
        raw.set(svc.manager.backend.keys("broken")[0], "not a hash")
    with pytest.raises(CorruptStateError):
        svc.get("broken")
    with pytest.raises(PreservedFieldError):
        svc.update("u", {"pin": "1234"})
    svc.close()
    corrupt, refused = telemetry.finished()
    for span, error in ((corrupt, "CorruptStateError"), (refused, "PreservedFieldError")):
        assert span.attributes is not None
        assert span.attributes["error.type"] == error
        assert span.attributes["chatstate.outcome"] == "error"
        assert span.status.status_code is StatusCode.ERROR
        assert span.status.description == error
        assert not span.events  # no exception event: its message could quote a value


@pytest.mark.redis
def test_the_duration_metric_is_recorded_per_operation(
    telemetry: Telemetry, redis_url: str, namespace: str
) -> None:
    """db.client.operation.duration counts each operation under the conventions' attributes."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
    for _ in range(3):
        svc.update("u", {"a": 1})
    svc.get("u")
    svc.close()
    points = {p[0]["db.operation.name"]: p for p in telemetry.durations()}
    attributes, count = points["update"]
    assert count == 3
    assert attributes["db.system.name"] == server_system(redis_url)
    assert attributes["db.stored_procedure.name"] == "chatstate.apply"
    assert {"server.address", "server.port"} <= set(attributes)
    assert points["get"][1] == 1


@pytest.mark.redis
def test_spans_nest_under_each_tasks_own_parent(
    telemetry: Telemetry, redis_url: str, namespace: str
) -> None:
    """Concurrent asyncio tasks (pipelined into shared round trips) keep their own parents."""

    async def handle(svc: AsyncStateService, i: int) -> int:
        with telemetry.tracer.start_as_current_span(f"message {i}") as parent:
            await asyncio.sleep(0)
            await svc.update(f"u{i}", {"i": i})
            return parent.get_span_context().span_id

    async def main() -> dict[int, int]:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        ids = await asyncio.gather(*(handle(svc, i) for i in range(30)))
        await svc.aclose()
        return dict(enumerate(ids))

    parents = asyncio.run(main())
    spans = {s.parent.span_id: s for s in telemetry.finished() if s.parent is not None}
    assert len(telemetry.finished()) == 30
    assert set(spans) == set(parents.values())
    assert all(s.kind is SpanKind.CLIENT for s in spans.values())


def test_spans_nest_under_each_threads_own_parent(telemetry: Telemetry) -> None:
    """Operations in many threads end their own spans, each under its thread's parent."""
    svc = StateService(MemoryBackend())
    parents: dict[int, int] = {}

    def work(i: int) -> None:
        with telemetry.tracer.start_as_current_span(f"thread {i}") as parent:
            for _ in range(5):
                svc.update(f"u{i}", {"i": i})
            parents[i] = parent.get_span_context().span_id

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans = telemetry.finished()
    assert len(spans) == 40
    by_parent: dict[int, int] = {}
    for span in spans:
        assert span.parent is not None
        by_parent[span.parent.span_id] = by_parent.get(span.parent.span_id, 0) + 1
    assert by_parent == dict.fromkeys(parents.values(), 5)


def test_memory_spans_are_internal_and_record_no_database_metric(telemetry: Telemetry) -> None:
    """The in-memory backend calls no database: INTERNAL spans, no db.system.name, no metric."""
    StateService().update("u", {"a": 1})
    (span,) = telemetry.finished()
    assert span.kind is SpanKind.INTERNAL
    assert span.attributes is not None
    assert "db.system.name" not in span.attributes
    assert span.attributes["chatstate.backend"] == "memory"
    assert span.attributes["db.operation.name"] == "update"
    assert telemetry.durations() == []


@pytest.mark.redis
def test_the_server_kind_is_asked_once_or_given(redis_url: str, namespace: str) -> None:
    """probe_system tells Redis from Valkey; db_system= names it without asking."""
    assert probe_system("127.0.0.1", 1) is None
    described = RedisBackend.from_url(redis_url, namespace=namespace).describe()
    assert probe_system(described["server.address"], described["server.port"]) == server_system(
        redis_url
    )
    t = Telemetry()
    observer = add_observer(OTelObserver(tracer_provider=t.tracer_provider, db_system="valkey"))
    try:
        svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace))
        svc.update("u", {"a": 1})
        svc.close()
    finally:
        remove_observer(observer)
    (span,) = t.finished()
    assert span.attributes is not None
    assert span.attributes["db.system.name"] == "valkey"
