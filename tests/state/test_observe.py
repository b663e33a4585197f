"""The observer hook: what it reports, what it costs unused, and logs that hold no secret."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import jwt
import pytest

from chatstate import (
    AsyncMemoryBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate import observe as observe_module
from chatstate.auth import get_valid_token
from chatstate.exceptions import BackendUnavailable, PreservedFieldError, UsageError
from chatstate.observe import (
    LoggingObserver,
    Observer,
    OperationFinished,
    OperationStarted,
    RetryScheduled,
    add_observer,
    notify_flow_step,
    observers,
    remove_observer,
)
from conftest import register_secret


class Recorder(Observer):
    """Keeps every event it is told about."""

    def __init__(self) -> None:
        self.started: list[OperationStarted] = []
        self.finished: list[OperationFinished] = []
        self.retries: list[tuple[str, int]] = []
        self.steps: list[tuple[str, str, str]] = []
        self.refreshes: list[str] = []
        self._lock = threading.Lock()

    def operation_started(self, event: OperationStarted) -> Any:
        with self._lock:
            self.started.append(event)
        return event

    def operation_finished(self, event: OperationFinished, token: Any) -> None:
        assert isinstance(token, OperationStarted)
        assert token.operation == event.operation
        with self._lock:
            self.finished.append(event)

    def retry_scheduled(self, event: RetryScheduled) -> None:
        self.retries.append((event.operation, event.attempt))

    def flow_step(self, flow: str, step: str, outcome: str) -> None:
        self.steps.append((flow, step, outcome))

    def token_refresh(self, outcome: str) -> None:
        self.refreshes.append(outcome)

    def outcomes(self) -> list[tuple[str, str]]:
        return [(e.operation, e.outcome) for e in self.finished]


@pytest.fixture
def recorder() -> Any:
    rec = add_observer(Recorder())
    yield rec
    remove_observer(rec)


def test_every_operation_is_reported_with_its_outcome(recorder: Recorder) -> None:
    """Reads, writes, duplicates, conflicts, claims and deletes each report their outcome."""
    svc = StateService(rules=StateData(preserved=["p"]))
    svc.get("u")
    svc.update("u", {"a": 1}, op_id="m1")
    svc.update("u", {"a": 1}, op_id="m1")
    svc.update_once("u", {"a": 2}, op_id=None, if_version=0)
    svc.assign("u", {"b": 2})
    svc.increment("u", "n")
    svc.set_preserved("u", "p", 1)
    svc.reset("u")
    with svc.claim("u", "m2") as claim:
        claim.update({"c": 3})
    svc.claim("u", "m2")
    svc.claim("u", "m3").release()
    svc.delete("u")
    assert recorder.outcomes() == [
        ("get", "read"),
        ("update", "applied"),
        ("update", "duplicate"),
        ("update", "conflict"),
        ("assign", "applied"),
        ("increment", "applied"),
        ("set_preserved", "applied"),
        ("reset", "applied"),
        ("claim", "claimed"),
        ("commit", "applied"),
        ("claim", "duplicate"),
        ("claim", "claimed"),
        ("release", "released"),
        ("delete", "applied"),
    ]
    assert all(e.backend == "memory" and e.error is None for e in recorder.finished)
    assert all(e.duration >= 0 for e in recorder.finished)


def test_a_failed_operation_reports_its_error_class(recorder: Recorder) -> None:
    """An operation that raises is reported as outcome error with the exception's class name."""
    svc = StateService(rules=StateData(preserved=["p"]))
    with pytest.raises(PreservedFieldError):
        svc.update("u", {"p": 1})
    (event,) = recorder.finished
    assert (event.operation, event.outcome, event.error) == (
        "update",
        "error",
        "PreservedFieldError",
    )


def test_a_transaction_reports_its_attempts_and_retries(recorder: Recorder) -> None:
    """A transaction that lost one race reports two attempts, one retry and outcome applied."""
    svc = StateService()
    raced = []

    def bump(doc: dict[str, Any]) -> dict[str, Any]:
        if not raced:
            raced.append(1)
            svc.update("u", {"other": 1})  # another writer wins the first round
        return {**doc, "n": doc.get("n", 0) + 1}

    assert svc.transaction("u", bump) == {"other": 1, "n": 1}
    assert recorder.retries == [("transaction", 1)]
    transaction = next(e for e in recorder.finished if e.operation == "transaction")
    assert (transaction.outcome, transaction.attempts) == ("applied", 2)
    inner = next(e for e in recorder.finished if e.operation == "update")
    assert inner.attempts == 1


def test_async_operations_are_reported_per_task(recorder: Recorder) -> None:
    """Concurrent asyncio tasks each report their own operation, paired with its own token."""

    async def main() -> None:
        svc = AsyncStateService(AsyncMemoryBackend())
        await asyncio.gather(*(svc.update(f"u{i}", {"i": i}) for i in range(20)))
        await svc.aclose()

    asyncio.run(main())
    assert recorder.outcomes() == [("update", "applied")] * 20


def test_threads_report_their_own_operations(recorder: Recorder) -> None:
    """Operations in many threads are each reported once, with their own token."""
    svc = StateService(MemoryBackend())
    threads = [
        threading.Thread(target=lambda i=i: [svc.update(f"u{i}", {"n": n}) for n in range(10)])
        for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(recorder.finished) == 80
    assert {e.outcome for e in recorder.finished} == {"applied"}


def test_flow_steps_and_token_refreshes_reach_observers(recorder: Recorder) -> None:
    """A token refresh and a flow step notification reach every observer."""
    token = register_secret(jwt.encode({"exp": int(time.time()) - 5}, "k" * 40, algorithm="HS256"))
    fresh = register_secret(
        jwt.encode({"exp": int(time.time()) + 600}, "k" * 40, algorithm="HS256")
    )
    user = StateService(rules=StateData(preserved=["jwt_token"])).user("u")
    user.state.set_preserved("jwt_token", token)
    assert get_valid_token(user, lambda _old: fresh) == fresh
    notify_flow_step("signup", "ask_name", "answered")
    assert recorder.refreshes == ["refreshed"]
    assert recorder.steps == [("signup", "ask_name", "answered")]


def test_an_observer_that_raises_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """A broken observer never breaks a write; its error is logged under chatstate.observe."""

    class Broken(Observer):
        def operation_started(self, event: OperationStarted) -> Any:
            raise RuntimeError("observer bug")

        def operation_finished(self, event: OperationFinished, token: Any) -> None:
            raise RuntimeError("observer bug")

    broken = add_observer(Broken())
    try:
        assert StateService().update("u", {"a": 1}) == {"a": 1}
    finally:
        remove_observer(broken)
    assert [r.name for r in caplog.records].count("chatstate.observe") == 2


def test_only_observers_can_be_added() -> None:
    """add_observer refuses anything that is not an Observer; remove_observer is idempotent."""
    with pytest.raises(UsageError):
        add_observer(print)  # type: ignore[type-var]
    obs = add_observer(Observer())
    assert obs in observers()
    remove_observer(obs)
    remove_observer(obs)
    assert obs not in observers()


def test_an_unused_hook_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no observer registered no Watch is made: the cost is the one truth test."""
    assert observers() == ()

    def explode(*_args: Any) -> None:
        raise AssertionError("a Watch was made with no observer registered")

    monkeypatch.setattr(observe_module, "Watch", explode)
    svc = StateService()
    svc.update("u", {"a": 1})
    assert svc.get("u") == {"a": 1}


# -- logging --------------------------------------------------------------------------


@pytest.fixture
def logging_observer() -> Any:
    obs = add_observer(LoggingObserver())
    yield obs
    remove_observer(obs)


def test_logging_observer_writes_structured_records(
    logging_observer: LoggingObserver, caplog: pytest.LogCaptureFixture
) -> None:
    """Each operation is one record on chatstate.operations with its fields in extra."""
    svc = StateService()
    svc.update("someone", {"a": 1})
    (record,) = [r for r in caplog.records if r.name == "chatstate.operations"]
    assert record.levelno == logging.DEBUG
    assert record.operation == "update"  # type: ignore[attr-defined]
    assert record.outcome == "applied"  # type: ignore[attr-defined]
    assert record.backend == "memory"  # type: ignore[attr-defined]
    assert record.error is None  # type: ignore[attr-defined]
    assert isinstance(record.duration_ms, float)  # type: ignore[attr-defined]
    assert "someone" not in record.getMessage()


def test_logged_errors_name_the_class_and_hold_no_secret(
    logging_observer: LoggingObserver, caplog: pytest.LogCaptureFixture
) -> None:
    """A failure is logged at WARNING with the error class; no token or state value appears."""
    token = register_secret(jwt.encode({"exp": int(time.time()) + 60}, "k" * 40, algorithm="HS256"))
    svc = StateService(rules=StateData(preserved=["jwt_token"]))
    svc.set_preserved("u", "jwt_token", token)
    with pytest.raises(PreservedFieldError):
        svc.update("u", {"jwt_token": token})
    failed = [r for r in caplog.records if getattr(r, "outcome", None) == "error"]
    assert [(r.levelno, r.error) for r in failed] == [(logging.WARNING, "PreservedFieldError")]  # type: ignore[attr-defined]


def test_logged_backend_failures_never_show_the_password(
    logging_observer: LoggingObserver, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable server with a password in its URL: the log shows the failure, not it."""
    password = register_secret("s3cret-Passw0rd-in-the-url")
    svc = StateService(
        RedisBackend.from_url(f"redis://:{password}@127.0.0.1:1/0", socket_connect_timeout=0.5)
    )
    with pytest.raises(BackendUnavailable):
        svc.get("u")
    svc.close()
    logged = [r for r in caplog.records if r.name == "chatstate.operations"]
    failed = [r for r in logged if hasattr(r, "error")]
    assert [r.error for r in failed] == ["BackendUnavailable"]  # type: ignore[attr-defined]
    retries = [r for r in logged if not hasattr(r, "error")]
    assert retries, "the reconnects were not logged"
    assert all(r.reason == "ConnectionError" for r in retries)  # type: ignore[attr-defined]
    assert not any(password in r.getMessage() for r in logged)


def test_logging_observer_logs_retries_steps_and_refreshes(
    logging_observer: LoggingObserver, caplog: pytest.LogCaptureFixture
) -> None:
    """Retries, flow steps and token refreshes each get a record with their fields."""
    logging_observer.retry_scheduled(RetryScheduled("transaction", 1, 0.05, 0.0, "conflict"))
    notify_flow_step("signup", "ask_name", "answered")
    logging_observer.token_refresh("reused")
    records = [r for r in caplog.records if r.name == "chatstate.operations"]
    assert [r.getMessage() for r in records] == [
        "chatstate transaction retries after attempt 1 (conflict) in 0.050 s",
        "chatstate flow signup step ask_name answered",
        "chatstate token refresh reused",
    ]
    assert records[1].flow == "signup"  # type: ignore[attr-defined]


def test_a_silent_logger_costs_no_formatting(caplog: pytest.LogCaptureFixture) -> None:
    """With its level disabled, the logging observer emits nothing at all."""
    quiet = logging.getLogger("chatstate.operations.quiet")
    quiet.setLevel(logging.ERROR)
    obs = add_observer(LoggingObserver(logger=quiet))
    try:
        StateService().update("u", {"a": 1})
    finally:
        remove_observer(obs)
    assert not [r for r in caplog.records if r.name == "chatstate.operations.quiet"]


BLOCK_INTEGRATIONS = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prometheus_client", "opentelemetry"):
            raise ImportError(f"{name} is blocked")

sys.meta_path.insert(0, Block())
import chatstate, chatstate.observe, chatstate.integrations
from chatstate import StateService
from chatstate.observe import LoggingObserver, add_observer
add_observer(LoggingObserver())
assert StateService().update("u", {"a": 1}) == {"a": 1}
print(sorted(m for m in sys.modules if m.startswith(("prometheus_client", "chatstate.integrations."))))
"""


def test_chatstate_imports_and_runs_without_the_integrations_packages() -> None:
    """With prometheus_client and opentelemetry unimportable, chatstate imports and works."""
    out = subprocess.run(
        [sys.executable, "-c", BLOCK_INTEGRATIONS], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
