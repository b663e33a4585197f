"""OpenTelemetry traces and metrics for chatstate (``pip install 'chatstate[otel]'``).

:class:`OTelObserver` makes one span per state operation, a child of whatever
span is current where the operation was called, following OpenTelemetry's
database semantic conventions, and records the ``db.client.operation.duration``
histogram:

Examples:
    >>> from opentelemetry.sdk.trace import TracerProvider
    >>> from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    >>> from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    ...     InMemorySpanExporter,
    ... )
    >>> from chatstate import StateService
    >>> from chatstate.integrations.otel import OTelObserver
    >>> from chatstate.observe import add_observer, remove_observer
    >>> exporter = InMemorySpanExporter()
    >>> provider = TracerProvider()
    >>> provider.add_span_processor(SimpleSpanProcessor(exporter))
    >>> tracing = add_observer(OTelObserver(tracer_provider=provider))
    >>> _ = StateService().update("u", {"a": 1})
    >>> [(s.name, s.attributes["db.operation.name"]) for s in exporter.get_finished_spans()]
    [('chatstate update', 'update')]
    >>> remove_observer(tracing)

On Redis and Valkey a span is of kind ``CLIENT`` and carries
``db.system.name`` (``redis`` or ``valkey``), ``db.operation.name`` (the
chatstate operation: ``get``, ``update``, ``transaction``, ...),
``db.stored_procedure.name`` (the Lua script writes run: ``chatstate.apply``),
``server.address`` and ``server.port``. Reads name no script: they are a plain
``HGETALL`` or a small read script, whichever the client parses faster. The
in-memory backend makes no call to a database: its spans are ``INTERNAL``, with
``chatstate.backend`` = ``memory`` and no ``db.system.name``, and it records no
``db.client.operation.duration``.

An operation that raises gets ``error.type`` (the exception's class name, never
its message) and the status ``ERROR``. Every span also has
``chatstate.outcome`` (``applied``, ``duplicate``, ``conflict``, ...) and
``chatstate.attempts``; ``chatstate.namespace`` is the key prefix (not
``db.namespace``, which for Redis means the database index).

Redis or Valkey? A backend describes itself as ``redis``. Unless you pass
``db_system``, the observer asks each server it has not met yet once, on a
short-lived connection of its own without credentials (``INFO server``, 0.5 s
timeout) and remembers the answer; a server that wants a password, or a Cluster
(whose backend names no single address), stays ``redis``. Pass
``db_system="valkey"`` to name it without asking.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import metrics, trace
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from chatstate.observe import Observer, OperationFinished, OperationStarted

__all__ = ["DURATION_BUCKETS", "OTelObserver"]

DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
"""The buckets the semantic conventions advise for ``db.client.operation.duration``."""

APPLY_SCRIPT_NAME: Final = "chatstate.apply"
"""The name spans give the Lua script every write runs."""

_READS: Final = frozenset({"get", "snapshot"})
_PROBE_TIMEOUT: Final = 0.5


def _version() -> str:
    from chatstate import __version__  # noqa: PLC0415 - the package imports this module lazily

    return __version__


def probe_system(host: str, port: int) -> str | None:
    """``"valkey"`` or ``"redis"``, from the server's ``INFO server``; ``None`` if it won't say.

    Connects without credentials, so a server that requires a password answers
    nothing. Never raises.
    """
    import redis  # noqa: PLC0415 - only when a new server is met
    from redis.backoff import NoBackoff  # noqa: PLC0415
    from redis.retry import Retry  # noqa: PLC0415

    try:
        with redis.Redis(
            host=host,
            port=port,
            socket_timeout=_PROBE_TIMEOUT,
            socket_connect_timeout=_PROBE_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        ) as client:
            info = client.execute_command("INFO", "server")
    except Exception:  # noqa: BLE001 - unreachable, refused, NOAUTH: cannot tell
        return None
    if isinstance(info, bytes):
        info = info.decode("utf-8", "replace")
    text = info if isinstance(info, str) else "\n".join(f"{k}:{v}" for k, v in dict(info).items())
    if "valkey_version" in text or "server_name:valkey" in text:
        return "valkey"
    return "redis"


class _Started:
    """What ``operation_started`` hands over: the span and the metric's attributes."""

    __slots__ = ("metric_attributes", "span")

    def __init__(self, span: trace.Span, metric_attributes: dict[str, Any] | None) -> None:
        self.span = span
        self.metric_attributes = metric_attributes


class OTelObserver(Observer):
    """Spans per state operation and the ``db.client.operation.duration`` histogram.

    A span starts in the caller's thread or task, as a child of the span
    current there, and travels to ``operation_finished`` in the observer's
    token, so concurrent operations in threads and tasks never mix their spans.
    The span is not made current: spans of redis-py's own instrumentation, if
    you run it, are siblings of chatstate's.

    Args:
        tracer_provider: Where spans go; the global provider when omitted.
        meter_provider: Where the histogram goes; the global provider when omitted.
        db_system: ``"redis"`` or ``"valkey"`` for every Redis backend, instead
            of asking each server once (see the module's description).
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        *,
        db_system: str | None = None,
    ) -> None:
        version = _version()
        self._tracer = trace.get_tracer("chatstate", version, tracer_provider=tracer_provider)
        meter = metrics.get_meter("chatstate", version, meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of database client operations.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.db_system = db_system
        self._systems: dict[tuple[str, int], str] = {}
        self._lock = threading.Lock()

    def _system(self, attributes: Mapping[str, Any]) -> str:
        declared = str(attributes.get("db.system.name", "redis"))
        if self.db_system is not None:
            return self.db_system
        host, port = attributes.get("server.address"), attributes.get("server.port")
        if not isinstance(host, str) or not isinstance(port, int):
            return declared
        known = self._systems.get((host, port))
        if known is None:
            with self._lock:  # one probe per server, even when many threads start at once
                known = self._systems.get((host, port))
                if known is None:
                    known = probe_system(host, port) or declared
                    self._systems[(host, port)] = known
        return known

    def operation_started(self, event: OperationStarted) -> _Started:
        """Start the operation's span under the caller's current span."""
        described = event.attributes
        attributes: dict[str, Any] = {
            "db.operation.name": event.operation,
            "chatstate.backend": event.backend,
        }
        if "db.namespace" in described:
            attributes["chatstate.namespace"] = str(described["db.namespace"])
        if "db.system.name" not in described:
            span = self._tracer.start_span(
                f"chatstate {event.operation}", kind=SpanKind.INTERNAL, attributes=attributes
            )
            return _Started(span, None)
        metric = {
            "db.system.name": self._system(described),
            "db.operation.name": event.operation,
        }
        if event.operation not in _READS:
            metric["db.stored_procedure.name"] = APPLY_SCRIPT_NAME
        for name in ("server.address", "server.port"):
            if name in described:
                metric[name] = described[name]
        attributes.update(metric)
        span = self._tracer.start_span(
            f"chatstate {event.operation}", kind=SpanKind.CLIENT, attributes=attributes
        )
        return _Started(span, metric)

    def operation_finished(self, event: OperationFinished, token: Any) -> None:
        """End the span (with ``error.type`` and status ERROR if it raised); record the time."""
        if not isinstance(token, _Started):
            return
        span = token.span
        span.set_attribute("chatstate.outcome", event.outcome)
        span.set_attribute("chatstate.attempts", event.attempts)
        metric = token.metric_attributes
        if event.error is not None:
            span.set_attribute("error.type", event.error)
            span.set_status(Status(StatusCode.ERROR, event.error))
            if metric is not None:
                metric = {**metric, "error.type": event.error}
        span.end()
        if metric is not None:
            self._duration.record(event.duration, metric)
