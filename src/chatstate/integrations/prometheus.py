"""Prometheus metrics for chatstate (``pip install 'chatstate[prometheus]'``).

Register one :class:`PrometheusObserver` per process and expose the registry as
you already do (``prometheus_client.start_http_server``, ``make_asgi_app``):

Examples:
    >>> from prometheus_client import CollectorRegistry, generate_latest
    >>> from chatstate import StateService
    >>> from chatstate.integrations.prometheus import PrometheusObserver
    >>> from chatstate.observe import add_observer, remove_observer
    >>> registry = CollectorRegistry()
    >>> metrics = add_observer(PrometheusObserver(registry))
    >>> _ = StateService().update("u", {"a": 1})
    >>> registry.get_sample_value(
    ...     "chatstate_operations_total", {"operation": "update", "outcome": "applied"}
    ... )
    1.0
    >>> remove_observer(metrics)

The metrics (``namespace`` replaces the ``chatstate`` prefix):

- ``chatstate_operations_total{operation,outcome}``: every state operation.
- ``chatstate_operation_duration_seconds{operation}``: a histogram of their durations.
- ``chatstate_operation_errors_total{operation,error}``: operations that raised,
  by error class.
- ``chatstate_retries_total{operation}``: retries of every loop, by loop (``transaction``,
  ``claim``, ``resolve``, ``noscript``, ``migration``, ``redis``; see
  :class:`~chatstate.observe.RetryScheduled`).
- ``chatstate_flow_steps_total{flow,step,outcome}``: messages the router handled.
- ``chatstate_token_refreshes_total{outcome}``: token refreshes.

Every label value comes from a short, fixed set (operation and outcome names,
error classes, the flow and step names in your code): never a user id, a value
or a token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from chatstate.observe import Observer, OperationFinished, RetryScheduled

__all__ = ["DURATION_BUCKETS", "PrometheusObserver"]

DURATION_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
"""Histogram buckets in seconds: from 0.1 ms (the memory backend) up to 10 s (a stuck server)."""


class PrometheusObserver(Observer):
    """Counts and times chatstate's operations in ``prometheus_client`` metrics.

    Args:
        registry: Where the metrics are registered; prometheus_client's default
            ``REGISTRY`` when omitted. A registry holds one observer's metrics:
            a second observer on the same registry raises ``ValueError``.
        namespace: The metrics' name prefix.
        buckets: The duration histogram's buckets, in seconds.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        namespace: str = "chatstate",
        *,
        buckets: Sequence[float] = DURATION_BUCKETS,
    ) -> None:
        registry = REGISTRY if registry is None else registry
        self.operations = Counter(
            "operations",
            "State operations, by operation and outcome.",
            ["operation", "outcome"],
            namespace=namespace,
            registry=registry,
        )
        self.duration = Histogram(
            "operation_duration_seconds",
            "How long state operations take, in seconds.",
            ["operation"],
            namespace=namespace,
            registry=registry,
            buckets=tuple(buckets),
        )
        self.errors = Counter(
            "operation_errors",
            "State operations that raised, by error class.",
            ["operation", "error"],
            namespace=namespace,
            registry=registry,
        )
        self.retries = Counter(
            "retries",
            "Retries of every loop, by loop (transaction, claim, resolve, noscript, ...).",
            ["operation"],
            namespace=namespace,
            registry=registry,
        )
        self.flow_steps = Counter(
            "flow_steps",
            "Messages the flow router handled, by flow, step and outcome.",
            ["flow", "step", "outcome"],
            namespace=namespace,
            registry=registry,
        )
        self.token_refreshes = Counter(
            "token_refreshes",
            "Token refreshes, by outcome.",
            ["outcome"],
            namespace=namespace,
            registry=registry,
        )
        # Label lookups take a lock in prometheus_client; the children are cached.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children.setdefault(key, metric.labels(*labels))
        return child

    def operation_finished(self, event: OperationFinished, token: Any) -> None:  # noqa: ARG002
        """Count the operation, time it and count its error, if any."""
        self._child(self.operations, event.operation, event.outcome).inc()
        self._child(self.duration, event.operation).observe(event.duration)
        if event.error is not None:
            self._child(self.errors, event.operation, event.error).inc()

    def retry_scheduled(self, event: RetryScheduled) -> None:
        """Count a retry of any loop."""
        self._child(self.retries, event.operation).inc()

    def flow_step(self, flow: str, step: str, outcome: str) -> None:
        """Count a flow step."""
        self._child(self.flow_steps, flow, step, outcome).inc()

    def token_refresh(self, outcome: str) -> None:
        """Count a token refresh."""
        self._child(self.token_refreshes, outcome).inc()
