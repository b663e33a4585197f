"""One small hook point for metrics, traces and logs.

Register an :class:`Observer` with :func:`add_observer` and chatstate calls it for
every state operation (``get``, ``update``, ``claim``, ...), every flow step and
every token refresh. With no observer registered, the managers skip all of this
at the cost of one truth test per operation.

:class:`LoggingObserver` logs every operation; ``chatstate.integrations.prometheus``
and ``chatstate.integrations.otel`` are ready-made metrics and traces. Write your
own by subclassing :class:`Observer` and overriding what you need. Events never
carry a user id, a value or a token.

Examples:
    >>> from chatstate import StateService
    >>> from chatstate.observe import Observer, add_observer, remove_observer
    >>> class Count(Observer):
    ...     def __init__(self):
    ...         self.seen = []
    ...     def operation_finished(self, event, token):
    ...         self.seen.append((event.operation, event.outcome))
    >>> count = add_observer(Count())
    >>> _ = StateService().update("u", {"a": 1})
    >>> count.seen
    [('update', 'applied')]
    >>> remove_observer(count)
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Mapping
from time import perf_counter
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import attrs

__all__ = [
    "Describing",
    "LoggingObserver",
    "Observer",
    "OperationFinished",
    "OperationStarted",
    "RetryScheduled",
    "add_observer",
    "observers",
    "remove_observer",
]

log = logging.getLogger("chatstate.observe")

ObserverT = TypeVar("ObserverT", bound="Observer")


@attrs.frozen
class OperationStarted:
    """A state operation is about to reach the backend.

    Attributes:
        operation: ``get``, ``snapshot``, ``update``, ``assign``, ``increment``,
            ``set_preserved``, ``reset``, ``delete``, ``transaction``, ``claim``,
            ``commit`` or ``release``.
        backend: The backend's kind: ``memory``, ``redis`` or the class name.
        attributes: What the backend says of itself (``db.system.name``,
            ``server.address``, ``server.port``), for traces.
    """

    operation: str
    backend: str
    attributes: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class OperationFinished:
    """A state operation ended.

    Attributes:
        operation: As in :class:`OperationStarted`.
        backend: As in :class:`OperationStarted`.
        outcome: ``applied``, ``duplicate``, ``conflict``, ``claimed``, ``busy``,
            ``released``, ``lost`` or ``read`` when it returned; ``error`` when it raised.
        error: The error's class name when it raised.
        duration: Seconds, from start to end.
        attempts: How many attempts it took: a transaction counts each run after
            a lost race, a claim each request after finding the user busy (see
            ``retry_scheduled``); every other operation is 1.
    """

    operation: str
    backend: str
    outcome: str
    error: str | None
    duration: float
    attempts: int = 1


@attrs.frozen
class RetryScheduled:
    """A loop failed an attempt and will try again after ``delay`` seconds.

    Attributes:
        operation: Which loop: ``transaction`` (a lost compare-and-set),
            ``claim`` (another message of the user is being handled),
            ``resolve`` (a write of unknown outcome re-sent with its op id),
            ``noscript`` (a script re-sent whole after SCRIPT FLUSH),
            ``migration`` (a schema migration lost its race to another write) or
            ``redis`` (a command whose connection broke, sent again: redis-py's
            own retries and chatstate's re-sends of reads, deadline and lock commands).
        attempt: The attempt that failed, counted from 1.
        delay: Seconds until the next attempt.
        elapsed: Seconds since the first failure of this loop.
        reason: A short label: ``conflict``, ``busy``, or an error's class name.
            Never a message (messages may name keys).
        error: The exception that failed the attempt, for a policy's own
            ``on_retry`` hook; always ``None`` in what observers receive.
    """

    operation: str
    attempt: int
    delay: float
    elapsed: float
    reason: str
    error: BaseException | None = None


class Observer:
    """Base class of observers: every method does nothing until you override it.

    Methods run on the caller's thread or task and must be quick and must not
    raise (an observer that raises is logged and the operation goes on).
    """

    def operation_started(self, event: OperationStarted) -> Any:  # noqa: ARG002 - for subclasses
        """A state operation starts; return anything, it is handed to ``operation_finished``."""
        return None

    def operation_finished(self, event: OperationFinished, token: Any) -> None:
        """A state operation ended (``token`` is what ``operation_started`` returned)."""

    def flow_step(self, flow: str, step: str, outcome: str) -> None:
        """The router handled a message in a flow.

        ``outcome`` is ``started``, ``answered``, ``invalid``, ``back``,
        ``restarted``, ``cancelled``, ``completed``, ``expired`` or ``reminded``.
        """

    def token_refresh(self, outcome: str) -> None:
        """A token refresh ended: ``refreshed``, ``reused`` (another process had), or ``failed``."""

    def retry_scheduled(self, event: RetryScheduled) -> None:
        """Any retry loop is about to try again (see :class:`RetryScheduled`)."""


_lock = threading.Lock()
_observers: tuple[Observer, ...] = ()


def add_observer(observer: ObserverT) -> ObserverT:
    """Register ``observer`` for every service in this process; returns it."""
    global _observers  # noqa: PLW0603 - the process-wide registry, read without a lock
    candidate: object = observer  # callers may not be type-checked
    if not isinstance(candidate, Observer):
        from chatstate.exceptions import UsageError  # noqa: PLC0415 - avoid an import cycle

        raise UsageError(f"an observer subclasses chatstate.observe.Observer, not {observer!r}")
    with _lock:
        _observers = (*_observers, observer)
    return observer


def remove_observer(observer: Observer) -> None:
    """Unregister ``observer`` (nothing happens if it was not registered)."""
    global _observers  # noqa: PLW0603
    with _lock:
        _observers = tuple(o for o in _observers if o is not observer)


def observers() -> tuple[Observer, ...]:
    """The registered observers, in registration order."""
    return _observers


def _safely(call: Any, *args: Any) -> Any:
    try:
        return call(*args)
    except Exception:  # an observer must never break a write
        log.exception("a chatstate observer raised; ignored")
        return None


def notify_flow_step(flow: str, step: str, outcome: str) -> None:
    """Tell every observer about a flow step."""
    for observer in _observers:
        _safely(observer.flow_step, flow, step, outcome)


def notify_token_refresh(outcome: str) -> None:
    """Tell every observer about a token refresh."""
    for observer in _observers:
        _safely(observer.token_refresh, outcome)


def notify_retry(event: RetryScheduled) -> None:
    """Tell every observer a loop retries.

    The retry counts toward the watched operation's ``attempts`` only when it is
    that operation's own loop: a write re-sent inside a transaction is not
    another run of the transaction.
    """
    watch = _watching.get()
    if watch is not None and watch.operation == event.operation:
        watch.attempts += 1
    for observer in _observers:
        _safely(observer.retry_scheduled, event)


# The operation being watched on this thread or task, so that a retry is counted
# in its ``attempts``. Set and reset by the same ``Watch`` in the same frame.
_watching: contextvars.ContextVar[Watch | None] = contextvars.ContextVar(
    "chatstate_watching", default=None
)

# Operations whose manager method returns no outcome of its own.
_RETURNED: Final = {"transaction": "applied", "release": "released"}


@runtime_checkable
class Describing(Protocol):
    """What a backend adds to name itself to observers (optional, the same on both twins).

    Without it, events name the backend by its class and carry no attributes.
    The memory, SQLite and Redis backends have it.
    """

    kind: str
    """A short name: ``memory``, ``sqlite``, ``redis``."""

    def describe(self) -> dict[str, Any]:
        """Attributes for traces (OpenTelemetry's ``db.*`` and ``server.*``); never secrets."""
        ...


class Watch:
    """One operation's observation: made when observers exist, ended once."""

    __slots__ = ("_backend", "_context", "_start", "_tokens", "attempts", "operation")

    def __init__(self, operation: str, backend: Any) -> None:
        if isinstance(backend, Describing):
            kind, attributes = str(backend.kind), _safely(backend.describe)
        else:
            kind, attributes = type(backend).__name__, None
        event = OperationStarted(operation, kind, attributes or {})
        self.operation = operation
        self._backend = kind
        self.attempts = 1
        self._tokens = [(o, _safely(o.operation_started, event)) for o in _observers]
        self._context = _watching.set(self)
        self._start = perf_counter()

    def end(self, outcome: str, error: BaseException | None = None, attempts: int = 1) -> None:
        """Report the end: an outcome, or the error that ended it."""
        duration = perf_counter() - self._start
        try:  # noqa: SIM105 - cheaper than contextlib.suppress on every observed call
            _watching.reset(self._context)
        except ValueError:  # ended in another context: nothing to undo
            pass
        if outcome == "read":
            outcome = _RETURNED.get(self.operation, outcome)
        event = OperationFinished(
            self.operation,
            self._backend,
            "error" if error is not None else outcome,
            type(error).__name__ if error is not None else None,
            duration,
            max(attempts, self.attempts),
        )
        for observer, token in self._tokens:
            _safely(observer.operation_finished, event, token)


class LoggingObserver(Observer):
    """Logs every operation, flow step, token refresh and retry with structured fields.

    Records go to the ``chatstate.operations`` logger (or ``logger``), one per
    event, with the event's fields in ``extra`` so that a JSON formatter can
    keep them apart: ``operation``, ``backend``, ``outcome``, ``duration_ms``,
    ``attempts`` and ``error`` (a class name, never a message) for operations;
    ``flow``, ``step`` and ``outcome`` for flow steps. No user id, value or
    token is ever logged: the events carry none.

    Args:
        level: The level of ordinary records.
        error_level: The level of operations that raised.
        logger: Where records go; ``logging.getLogger("chatstate.operations")``
            when omitted.

    Examples:
        >>> import logging
        >>> from chatstate import StateService
        >>> from chatstate.observe import LoggingObserver, add_observer, remove_observer
        >>> logger = logging.getLogger("chatstate.operations.example")
        >>> seen = []
        >>> class Keep(logging.Handler):
        ...     def emit(self, record):
        ...         seen.append((record.operation, record.outcome, record.getMessage()[:17]))
        >>> logger.addHandler(Keep())
        >>> logger.setLevel(logging.DEBUG)
        >>> watcher = add_observer(LoggingObserver(logger=logger))
        >>> _ = StateService().update("u", {"a": 1})
        >>> seen
        [('update', 'applied', 'chatstate update ')]
        >>> remove_observer(watcher)
    """

    def __init__(
        self,
        level: int = logging.DEBUG,
        *,
        error_level: int = logging.WARNING,
        logger: logging.Logger | None = None,
    ) -> None:
        self.level = level
        self.error_level = error_level
        self.logger = logger if logger is not None else logging.getLogger("chatstate.operations")

    def operation_finished(self, event: OperationFinished, token: Any) -> None:  # noqa: ARG002
        """Log the operation (at ``error_level`` when it raised)."""
        level = self.error_level if event.error is not None else self.level
        if not self.logger.isEnabledFor(level):
            return
        duration_ms = round(event.duration * 1000, 3)
        self.logger.log(
            level,
            "chatstate %s %s in %.3f ms%s",
            event.operation,
            event.outcome,
            duration_ms,
            f" ({event.error})" if event.error is not None else "",
            extra={
                "operation": event.operation,
                "backend": event.backend,
                "outcome": event.outcome,
                "duration_ms": duration_ms,
                "attempts": event.attempts,
                "error": event.error,
            },
        )

    def flow_step(self, flow: str, step: str, outcome: str) -> None:
        """Log a flow step."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "chatstate flow %s step %s %s",
                flow,
                step,
                outcome,
                extra={"flow": flow, "step": step, "outcome": outcome},
            )

    def token_refresh(self, outcome: str) -> None:
        """Log a token refresh (never the token)."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "chatstate token refresh %s",
                outcome,
                extra={"operation": "token_refresh", "outcome": outcome},
            )

    def retry_scheduled(self, event: RetryScheduled) -> None:
        """Log a retry: the loop, the attempt that failed, why (a label) and the delay."""
        if self.logger.isEnabledFor(self.level):
            self.logger.log(
                self.level,
                "chatstate %s retries after attempt %d (%s) in %.3f s",
                event.operation,
                event.attempt,
                event.reason,
                event.delay,
                extra={
                    "operation": event.operation,
                    "attempts": event.attempt,
                    "reason": event.reason,
                },
            )
