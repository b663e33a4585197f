"""One retry policy for every loop that tries again: pure, no I/O.

A :class:`RetryPolicy` says how often (``attempts``), for how long (``budget``)
and how far apart (``initial``, ``multiplier``, ``maximum``, ``jitter``) a loop
tries again, with the clock, the sleeps, the random source and the hook that
reports each retry injected. It is checked when it is built. A loop asks it for
a :class:`Retrying` on its *first* failure only, so an operation that succeeds at
once pays nothing (no allocation, no clock read)::

    retrying = None
    while True:
        outcome = backend.apply(uid, write)
        if outcome.status != "conflict":
            return outcome.snapshot
        if retrying is None:
            retrying = policy.begin("transaction")
        if not retrying.retry("conflict"):  # sleeps, or says "give up" without sleeping
            raise ConflictError(..., attempts=retrying.attempt)

``await retrying.aretry(reason)`` is the asyncio twin; both share
:meth:`Retrying.next_delay`, which decides and reports but never sleeps.

The delay before retry ``n`` (1 for the first) is ``base_n * (1 - jitter * u)``
with ``u`` uniform in [0, 1) and ``base_n = min(maximum, initial * multiplier **
(n - 1))``: ``jitter=1`` is "full jitter" (uniform in [0, base]), ``0.5`` is
"equal jitter" (uniform in [base/2, base]) and ``0`` none. A caller may cap one
delay further (``at_most``, e.g. a server's retry-after). The policy gives up
when ``attempts`` tries were made, or when sleeping the next delay would end
past ``budget`` seconds after the first failure: it never sleeps after its last
attempt, and the sleeps of one loop never add up to more than ``budget``.

Why not stamina: it retries on exceptions, while two of our loops retry on a
*result* (a ``conflict`` or ``busy`` outcome) and would have to raise to
themselves; its hooks (``set_on_retry_hooks``) and its testing mode
(``set_testing``) are process-global, where we want a clock and sleeps injected
per policy (and observers that are already ours); it brings tenacity along and
builds its retrying machinery on every call, a cost the hot path (a flow step is
about 50 us, nearly all of them without any retry) should not pay; and it cannot
take a per-retry ceiling such as a claim's ``retry_after``. Its defaults and
shape (attempts and a time budget, exponential backoff with jitter, a hook per
scheduled retry, tests that never sleep) are the model here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final

import attrs

from chatstate import observe as _observe
from chatstate.exceptions import ConfigurationError
from chatstate.observe import RetryScheduled

log = logging.getLogger("chatstate.observe")

__all__ = [
    "CLAIM",
    "REDIS_CLIENT",
    "RESOLVE",
    "TRANSACTION",
    "RetryPolicy",
    "RetryScheduled",
    "Retrying",
    "report_to_observers",
]


def report_to_observers(event: RetryScheduled) -> None:
    """The default hook: tell chatstate's observers (:mod:`chatstate.observe`), never the error."""
    if _observe.observers():
        _observe.notify_retry(attrs.evolve(event, error=None) if event.error is not None else event)


# Defaults looked up when called, so that a test patching ``time.sleep`` or
# ``time.monotonic`` (as the manager's tests do) still reaches every policy.
def _monotonic() -> float:
    return time.monotonic()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _seconds(value: Any) -> Any:
    """Accept a timedelta where seconds are expected (anything else is checked later)."""
    return value.total_seconds() if isinstance(value, timedelta) else value


def _bad(name: str, must: str, value: Any) -> ConfigurationError:
    return ConfigurationError(f"RetryPolicy({name}=...) must be {must}, got {value!r}")


def _check_attempts(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise _bad(name, "a whole number of at least 1 (or None with a budget)", value)


def _check_budget(name: str, value: Any) -> None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise _bad(name, "seconds of at least 0 or a timedelta (or None)", value)


def _number(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(attribute.name, "a finite number", value)


def _callable(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not callable(value):
        raise _bad(attribute.name, "callable", value)
    if attribute.name != "asleep" and inspect.iscoroutinefunction(value):
        raise _bad(attribute.name, "a plain function, not a coroutine function", value)
    if attribute.name == "asleep" and not inspect.iscoroutinefunction(value):
        raise _bad(attribute.name, "a coroutine function (async def)", value)


@attrs.frozen
class RetryPolicy:
    """How a loop tries again; checked when it is built.

    Args:
        attempts: Tries in all, the first included (``1``: never retry);
            ``None`` for no limit but ``budget``.
        budget: Seconds (or a timedelta) a loop may spend retrying, counted
            from its first failure; ``None`` for no limit but ``attempts``.
        initial: Seconds before the first retry (before jitter).
        multiplier: Each delay is this times the one before (at least 1).
        maximum: The longest delay (before jitter); at least ``initial``.
        jitter: The part of each delay that is random, from 0 (none) to 1
            (uniform between 0 and the delay); see the module docstring.
        clock: Monotonic seconds (``time.monotonic``).
        sleep: Sleeps in the sync twin (``time.sleep``).
        asleep: Sleeps in the asyncio twin (``asyncio.sleep``); ``async def``.
        random: Uniform floats in [0, 1) for the jitter (``random.random``).
        on_retry: Called with a :class:`RetryScheduled` before each sleep;
            ``None`` reports nothing. By default chatstate's observers hear of it.
            Like an observer, it must be quick; if it raises, the error is
            logged (``chatstate.observe``) and the loop goes on.

    Raises:
        ConfigurationError: a value is out of range, naming it.
    """

    attempts: int | None = attrs.field(default=3, kw_only=True)
    budget: float | None = attrs.field(default=None, converter=_seconds, kw_only=True)
    initial: float = attrs.field(default=0.05, converter=_seconds, validator=_number, kw_only=True)
    multiplier: float = attrs.field(default=2.0, validator=_number, kw_only=True)
    maximum: float = attrs.field(default=1.0, converter=_seconds, validator=_number, kw_only=True)
    jitter: float = attrs.field(default=1.0, validator=_number, kw_only=True)
    clock: Callable[[], float] = attrs.field(default=_monotonic, validator=_callable, kw_only=True)
    sleep: Callable[[float], object] = attrs.field(
        default=_sleep, validator=_callable, kw_only=True
    )
    asleep: Callable[[float], Awaitable[object]] = attrs.field(
        default=_asleep, validator=_callable, kw_only=True
    )
    random: Callable[[], float] = attrs.field(
        default=random.random, validator=_callable, kw_only=True
    )
    on_retry: Callable[[RetryScheduled], object] | None = attrs.field(
        default=report_to_observers, kw_only=True
    )

    def __attrs_post_init__(self) -> None:
        _check_attempts("attempts", self.attempts)
        _check_budget("budget", self.budget)
        if self.attempts is None and self.budget is None:
            raise ConfigurationError(
                "RetryPolicy needs attempts or a budget (or both), got neither: it would never stop"
            )
        if self.initial < 0:
            raise _bad("initial", "at least 0", self.initial)
        if self.attempts is None and self.initial <= 0:
            raise _bad("initial", "more than 0 when attempts is None (or it spins)", self.initial)
        if self.multiplier < 1:
            raise _bad("multiplier", "at least 1", self.multiplier)
        if self.maximum < self.initial:
            raise _bad("maximum", f"at least initial ({self.initial!r})", self.maximum)
        if not 0 <= self.jitter <= 1:
            raise _bad("jitter", "from 0 to 1", self.jitter)
        if self.on_retry is not None and not callable(self.on_retry):
            raise _bad("on_retry", "callable or None", self.on_retry)

    def begin(
        self, operation: str, *, attempts: int | None = None, budget: float | None = None
    ) -> Retrying:
        """Start retrying after a first failure; call it only once something failed.

        Args:
            operation: The loop's name, for the hook (``transaction``, ...).
            attempts: This loop's limit instead of the policy's (say a
                ``transaction(max_attempts=...)``); ``None`` keeps the policy's.
            budget: This loop's budget instead of the policy's (say a claim's
                ``wait``); ``None`` keeps the policy's.

        Raises:
            ConfigurationError: ``attempts`` or ``budget`` is out of range.
        """
        if attempts is not None:
            _check_attempts("attempts", attempts)
        if budget is not None:
            budget = _seconds(budget)
            _check_budget("budget", budget)
        return Retrying(
            self,
            operation,
            self.attempts if attempts is None else attempts,
            self.budget if budget is None else budget,
        )

    def report(self, operation: str, reason: str | BaseException) -> None:
        """Report a retry the loop makes at once, with no decision to take (NOSCRIPT's EVAL)."""
        if self.on_retry is not None:
            _call(self.on_retry, _event(operation, 1, 0.0, 0.0, reason))


def _call(hook: Callable[[RetryScheduled], object], event: RetryScheduled) -> None:
    try:
        hook(event)
    except Exception:  # a hook, like an observer, must never break a write
        log.exception("a chatstate retry hook raised; ignored")


def _event(
    operation: str, attempt: int, delay: float, elapsed: float, reason: str | BaseException
) -> RetryScheduled:
    if isinstance(reason, BaseException):
        return RetryScheduled(operation, attempt, delay, elapsed, type(reason).__name__, reason)
    return RetryScheduled(operation, attempt, delay, elapsed, str(reason))


class Retrying:
    """One loop's retries after its first failure (made by :meth:`RetryPolicy.begin`).

    Attributes:
        attempt: Attempts made so far (after giving up: all of them).
        elapsed: Seconds since the first failure, when last asked.
    """

    __slots__ = (
        "_base",
        "_budget",
        "_limit",
        "_policy",
        "_started",
        "attempt",
        "elapsed",
        "operation",
    )

    def __init__(
        self, policy: RetryPolicy, operation: str, attempts: int | None, budget: float | None
    ) -> None:
        self._policy = policy
        self.operation = operation
        self._limit = attempts
        self._budget = budget
        self._base = policy.initial
        self._started = policy.clock()
        self.attempt = 0
        self.elapsed = 0.0

    def next_delay(
        self, reason: str | BaseException, *, at_most: float | None = None
    ) -> float | None:
        """Count a failed attempt; return the delay before the next, or ``None`` to give up.

        Reports the retry to the policy's hook when there is one; never sleeps.

        Args:
            reason: Why the attempt failed: a label (``"conflict"``) or the error.
            at_most: A ceiling for this delay (a server's retry-after, in seconds).
        """
        policy = self._policy
        self.attempt += 1
        self.elapsed = policy.clock() - self._started
        if self._limit is not None and self.attempt >= self._limit:
            return None
        base = self._base
        self._base = min(policy.maximum, base * policy.multiplier)
        delay = base * (1.0 - policy.jitter * policy.random())
        if at_most is not None and at_most < delay:
            delay = max(0.0, at_most)
        if self._budget is not None and (self._budget <= 0 or self.elapsed + delay > self._budget):
            return None
        if policy.on_retry is not None:
            _call(
                policy.on_retry, _event(self.operation, self.attempt, delay, self.elapsed, reason)
            )
        return delay

    def retry(self, reason: str | BaseException, *, at_most: float | None = None) -> bool:
        """Sleep before the next attempt and return True, or return False at once to give up."""
        delay = self.next_delay(reason, at_most=at_most)
        if delay is None:
            return False
        self._policy.sleep(delay)
        return True

    async def aretry(self, reason: str | BaseException, *, at_most: float | None = None) -> bool:
        """The asyncio twin of :meth:`retry`."""
        delay = self.next_delay(reason, at_most=at_most)
        if delay is None:
            return False
        await self._policy.asleep(delay)
        return True


# Today's four loops, reproduced exactly (their sleeps, limits and jitter), so
# that wiring them to a policy changes no behaviour; each now reports its retries.
TRANSACTION: Final = RetryPolicy(attempts=8, initial=0.001, multiplier=2, maximum=0.05, jitter=1)
"""``transaction``: 8 tries, full jitter up to 1, 2, 4 ... 50 ms (was ``backoff``)."""

CLAIM: Final = RetryPolicy(
    attempts=None, budget=10.0, initial=0.002, multiplier=2, maximum=0.05, jitter=0.5
)
"""A busy ``claim``: equal jitter, 2 ... 50 ms, as long as ``wait`` (was ``busy_delay``)."""

RESOLVE: Final = RetryPolicy(attempts=3, initial=0.05, multiplier=2, maximum=1.0, jitter=0)
"""Re-sending a write of unknown outcome: 2 re-sends, 50 then 100 ms (was ``_resolve_delay``)."""

REDIS_CLIENT: Final = RetryPolicy(attempts=4, initial=0.1, multiplier=2, maximum=1.0, jitter=1)
"""redis-py's own retries: 3 retries, full jitter up to 0.1, 0.2, 0.4 s (was ``_Retry``)."""
