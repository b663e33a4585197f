"""What the observer hook costs: memory-backend updates with and without observers.

    python benchmarks/bench_observe.py [--updates 20000] [--rounds 7]

Cases, interleaved round by round so the machine's noise falls on all alike,
each reported as its best round (microseconds per update):

- without the hook: the managers' methods with the ``observed`` decorator taken off;
- no observer: the hook as shipped, nothing registered (one truth test);
- a do-nothing observer: an ``Observer`` subclass that overrides nothing;
- LoggingObserver, its logger's level above DEBUG (the records are never made);
- PrometheusObserver on a fresh registry;
- OTelObserver with the SDK's tracer and meter providers and no exporter.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from chatstate import StateService
from chatstate.observe import LoggingObserver, Observer, add_observer, remove_observer
from chatstate.state import StateManager


@contextlib.contextmanager
def unhooked() -> Iterator[None]:
    """The manager's methods without the observed decorator, as before the hook existed."""
    saved = {name: StateManager.__dict__[name] for name in ("apply", "load")}
    try:
        for name, method in saved.items():
            setattr(StateManager, name, method.__wrapped__)
        yield
    finally:
        for name, method in saved.items():
            setattr(StateManager, name, method)


@contextlib.contextmanager
def observing(observer: Observer | None) -> Iterator[None]:
    if observer is None:
        yield
        return
    add_observer(observer)
    try:
        yield
    finally:
        remove_observer(observer)


def prometheus() -> Observer:
    from prometheus_client import CollectorRegistry

    from chatstate.integrations.prometheus import PrometheusObserver

    return PrometheusObserver(CollectorRegistry())


def otel() -> Observer:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    from chatstate.integrations.otel import OTelObserver

    return OTelObserver(tracer_provider=TracerProvider(), meter_provider=MeterProvider())


def quiet_logging() -> Observer:
    logger = logging.getLogger("chatstate.operations.bench")
    logger.setLevel(logging.INFO)
    return LoggingObserver(logger=logger)


def run(updates: int) -> float:
    """Seconds per update for ``updates`` small patches on a fresh memory service."""
    svc = StateService()
    patch = {"step": "menu", "n": 1}
    update = svc.update
    start = time.perf_counter()
    for i in range(updates):
        update("u", patch if i % 2 else {"step": "ask"})
    return (time.perf_counter() - start) / updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("without the hook", unhooked),
        ("no observer", lambda: observing(None)),
        ("do-nothing observer", lambda: observing(Observer())),
        ("LoggingObserver, level off", lambda: observing(quiet_logging())),
    ]
    for name, make in (("PrometheusObserver", prometheus), ("OTelObserver (SDK)", otel)):
        try:
            make()
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
            continue
        cases.append((name, lambda make=make: observing(make())))

    best = {name: float("inf") for name, _ in cases}
    run(args.updates // 10)  # warm up
    for _ in range(args.rounds):
        for name, context in cases:
            with context():
                best[name] = min(best[name], run(args.updates))
    base = best["no observer"]
    print(f"memory backend, {args.updates} updates per round, best of {args.rounds} rounds")
    for name, _ in cases:
        seconds = best[name]
        print(f"  {name:28} {seconds * 1e6:7.2f} us/update  ({seconds / base - 1:+.0%})")


if __name__ == "__main__":
    main()
