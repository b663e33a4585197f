"""The retry policy (``chatstate._retry``) and redis-py's Retry driven by it: no real waiting."""

from __future__ import annotations

import asyncio
import copy
import math
import random
from datetime import timedelta
from typing import Any

import attrs
import pytest
import redis
import redis.exceptions as rex
from hypothesis import given
from hypothesis import strategies as st

from chatstate._retry import (
    CLAIM,
    REDIS_CLIENT,
    RESOLVE,
    TRANSACTION,
    RetryPolicy,
    RetryScheduled,
    report_to_observers,
)
from chatstate.exceptions import ConfigurationError
from chatstate.observe import Observer, add_observer, remove_observer
from chatstate.state.redis._async.retry import AsyncPolicyRetry
from chatstate.state.redis._retry import PolicyBackoff
from chatstate.state.redis._sync.retry import PolicyRetry
from fakes import Fake


def run(policy: RetryPolicy, failures: int, *, cost: float = 0.0, fake: Fake | None = None) -> int:
    """A loop as the manager writes one: fails ``failures`` times; returns tries (negative: gave up)."""
    tries = 0
    retrying = None
    while True:
        tries += 1
        if fake is not None:
            fake.now += cost  # the attempt itself takes time
        if tries > failures:
            return tries
        if retrying is None:
            retrying = policy.begin("transaction")
        if not retrying.retry("conflict"):
            assert retrying.attempt == tries
            return -tries


async def arun(policy: RetryPolicy, failures: int) -> int:
    """The asyncio twin of :func:`run`."""
    tries = 0
    retrying = None
    while True:
        tries += 1
        if tries > failures:
            return tries
        if retrying is None:
            retrying = policy.begin("transaction")
        if not await retrying.aretry("conflict"):
            return -tries


# -- attempts ----------------------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2, 3, 8])
def test_attempts_is_the_number_of_tries_and_nothing_sleeps_after_the_last(attempts: int) -> None:
    """A loop that always fails tries exactly ``attempts`` times and sleeps between tries only."""
    fake = Fake()
    assert run(fake.policy(attempts=attempts), failures=100) == -attempts
    assert len(fake.naps) == attempts - 1
    assert len(fake.events) == attempts - 1


def test_a_loop_that_succeeds_stops_retrying() -> None:
    """Success on the third try: three tries, two sleeps, two reports."""
    fake = Fake()
    assert run(fake.policy(attempts=5), failures=2) == 3
    assert len(fake.naps) == 2
    assert [e.attempt for e in fake.events] == [1, 2]


def test_no_failure_means_no_retrying_object_and_no_clock_read() -> None:
    """The hot path: a loop that never fails never reads the clock nor calls the hook."""
    reads: list[int] = []
    policy = RetryPolicy(clock=lambda: reads.append(1) or 0.0, on_retry=None)
    assert run(policy, failures=0) == 1
    assert reads == []


def test_begin_may_override_attempts_for_one_loop() -> None:
    """``begin(attempts=...)`` (a ``transaction(max_attempts=...)``) wins over the policy's."""
    fake = Fake()
    policy = fake.policy(attempts=8)
    retrying = policy.begin("transaction", attempts=2)
    assert retrying.retry("conflict") is True
    assert retrying.retry("conflict") is False
    assert (retrying.attempt, len(fake.naps)) == (2, 1)


# -- budget ------------------------------------------------------------------------


def test_budget_gives_up_rather_than_sleep_past_it() -> None:
    """Delays of 0.3 s in a 1 s budget: three sleeps (0.9 s), then give up, never 1.2 s."""
    fake = Fake()
    policy = fake.policy(
        attempts=None, budget=1.0, initial=0.3, multiplier=1, maximum=0.3, jitter=0
    )
    assert run(policy, failures=100) == -4
    assert fake.naps == [0.3, 0.3, 0.3]
    assert sum(fake.naps) <= 1.0


def test_budget_counts_the_time_the_attempts_take() -> None:
    """Attempts of 0.2 s each and sleeps of 0.1 s: a 1 s budget allows four retries, not ten."""
    fake = Fake()
    policy = fake.policy(
        attempts=None, budget=1.0, initial=0.1, multiplier=1, maximum=0.1, jitter=0
    )
    assert run(policy, failures=100, cost=0.2, fake=fake) == -4
    assert len(fake.naps) == 3


def test_budget_counts_from_the_first_failure() -> None:
    """Time before the first failure is the operation's own, not the retries' budget."""
    fake = Fake()
    fake.now = 1000.0
    policy = fake.policy(
        attempts=None, budget=0.5, initial=0.2, multiplier=1, maximum=0.2, jitter=0
    )
    assert run(policy, failures=100) == -3
    assert fake.naps == [0.2, 0.2]


def test_a_zero_budget_never_sleeps() -> None:
    """``budget=0`` (a claim with ``wait=0``) gives up at the first failure."""
    fake = Fake()
    assert run(fake.policy(attempts=None, budget=0), failures=100) == -1
    assert fake.naps == []


def test_a_zero_budget_never_retries_even_a_zero_delay() -> None:
    """``budget=0`` with a retry-after of 0 (no delay at all) still gives up: no spinning."""
    fake = Fake()
    retrying = fake.policy(attempts=None, budget=0).begin("claim")
    assert retrying.retry("busy", at_most=0) is False
    assert fake.events == []


def test_begin_may_override_the_budget_with_a_timedelta() -> None:
    """``begin(budget=timedelta(...))`` (a claim's ``wait``) wins over the policy's budget."""
    fake = Fake()
    policy = fake.policy(attempts=None, budget=10.0, initial=0.25, multiplier=1, jitter=0)
    retrying = policy.begin("claim", budget=timedelta(milliseconds=500))
    assert [retrying.retry("busy") for _ in range(3)] == [True, True, False]
    assert fake.naps == [0.25, 0.25]


# -- backoff and jitter ----------------------------------------------------------------


def test_backoff_grows_by_the_multiplier_and_caps_at_maximum() -> None:
    """0.1, 0.3, 0.5 (capped), 0.5: without jitter the delays are exact."""
    fake = Fake()
    policy = fake.policy(attempts=5, initial=0.1, multiplier=3, maximum=0.5, jitter=0)
    run(policy, failures=100)
    assert fake.naps == pytest.approx([0.1, 0.3, 0.5, 0.5])


def test_backoff_never_overflows_over_many_retries() -> None:
    """Thousands of retries of a huge multiplier stay at ``maximum`` (no OverflowError)."""
    fake = Fake()
    policy = fake.policy(attempts=5000, initial=1e-6, multiplier=1e6, maximum=1e-3, jitter=0)
    run(policy, failures=10_000)
    assert len(fake.naps) == 4999
    assert max(fake.naps) == 1e-3


@pytest.mark.parametrize(
    ("jitter", "u", "expected"),
    [(1.0, 0.0, 0.4), (1.0, 0.75, 0.1), (0.5, 0.0, 0.4), (0.5, 0.5, 0.3), (0.0, 0.9, 0.4)],
)
def test_jitter_takes_its_share_of_the_delay(jitter: float, u: float, expected: float) -> None:
    """A delay is ``base * (1 - jitter * u)``: full jitter spans [0, base], 0.5 spans [base/2, base]."""
    fake = Fake()
    policy = fake.policy(attempts=2, initial=0.4, maximum=0.4, jitter=jitter, random=lambda: u)
    run(policy, failures=100)
    assert fake.naps == pytest.approx([expected])


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 1.0])
def test_jittered_delays_stay_within_their_bounds(jitter: float) -> None:
    """With a seeded random source, every delay lies in [base * (1 - jitter), base]."""
    fake = Fake()
    seeded = random.Random(14)
    policy = fake.policy(
        attempts=50, initial=0.01, multiplier=2, maximum=0.2, jitter=jitter, random=seeded.random
    )
    run(policy, failures=100)
    base = 0.01
    for nap in fake.naps:
        assert base * (1 - jitter) <= nap <= base
        base = min(0.2, base * 2)


def test_at_most_caps_one_delay() -> None:
    """``retry(at_most=...)`` (a server's retry-after) shortens that delay only."""
    fake = Fake()
    retrying = fake.policy(attempts=3, initial=0.5, maximum=0.5, jitter=0).begin("claim")
    assert retrying.retry("busy", at_most=0.01)
    assert retrying.retry("busy")
    assert not retrying.retry("busy", at_most=0.0)  # the third attempt was the last
    assert fake.naps == [0.01, 0.5]
    assert fake.events[0].delay == 0.01


# -- the hook ----------------------------------------------------------------------


def test_the_hook_hears_of_each_retry_with_its_fields() -> None:
    """One event per retry: loop name, failed attempt, delay, time since the first failure, reason."""
    fake = Fake()
    policy = fake.policy(attempts=3, initial=0.1, multiplier=2, maximum=1, jitter=0)
    run(policy, failures=100)
    assert [(e.operation, e.attempt, e.reason, e.error) for e in fake.events] == [
        ("transaction", 1, "conflict", None),
        ("transaction", 2, "conflict", None),
    ]
    assert [e.delay for e in fake.events] == pytest.approx([0.1, 0.2])
    assert [e.elapsed for e in fake.events] == pytest.approx([0.0, 0.1])


def test_an_error_is_reported_by_its_class_name_and_kept_for_the_hook() -> None:
    """``retry(error)``: the event's reason is the class name (never the message), error the object."""
    fake = Fake()
    error = rex.ConnectionError("lost the connection to chatstate:{ana}")
    fake.policy(attempts=2).begin("resolve").retry(error)
    (event,) = fake.events
    assert (event.operation, event.reason, event.error) == ("resolve", "ConnectionError", error)


def test_report_tells_the_hook_of_an_immediate_retry() -> None:
    """``policy.report`` (NOSCRIPT, then EVAL) is one event with no delay; no sleep."""
    fake = Fake()
    error = rex.NoScriptError("NOSCRIPT No matching script")
    fake.policy().report("noscript", error)
    assert fake.events == [RetryScheduled("noscript", 1, 0.0, 0.0, "NoScriptError", error)]
    assert fake.naps == []
    RetryPolicy(on_retry=None).report("noscript", "NoScriptError")  # and no hook: nothing


def test_a_hook_that_raises_is_logged_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken hook never breaks a retry: logged once per call, the sleeps happen anyway."""
    fake = Fake()

    def broken(event: RetryScheduled) -> None:
        raise RuntimeError("boom")

    assert run(fake.policy(attempts=3, on_retry=broken), failures=100) == -3
    fake.policy(on_retry=broken).report("noscript", "NoScriptError")
    assert len(fake.naps) == 2
    raised = [r for r in caplog.records if "retry hook raised" in r.getMessage()]
    assert len(raised) == 3


def test_no_hook_reports_nothing() -> None:
    """``on_retry=None`` retries quietly."""
    fake = Fake()
    run(fake.policy(attempts=3, on_retry=None), failures=100)
    assert (len(fake.naps), fake.events) == (2, [])


def test_the_default_hook_tells_chatstate_observers() -> None:
    """By default every retry reaches ``Observer.retry_scheduled`` (operation, attempt)."""

    class Seen(Observer):
        def __init__(self) -> None:
            self.retries: list[tuple[str, int]] = []

        def retry_scheduled(self, event: RetryScheduled) -> None:
            self.retries.append((event.operation, event.attempt))

    assert RetryPolicy().on_retry is report_to_observers
    seen = add_observer(Seen())
    try:
        fake = Fake()
        policy = RetryPolicy(attempts=3, clock=fake.clock, sleep=fake.sleep)
        run(policy, failures=100)
    finally:
        remove_observer(seen)
    assert seen.retries == [("transaction", 1), ("transaction", 2)]


# -- validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"attempts": 0}, "attempts=...) must be a whole number of at least 1"),
        ({"attempts": -1}, "got -1"),
        ({"attempts": True}, "got True"),
        ({"attempts": 2.0}, "got 2.0"),
        ({"attempts": "3"}, "got '3'"),
        ({"attempts": None}, "needs attempts or a budget"),
        ({"budget": -1}, "budget=...) must be seconds of at least 0"),
        ({"budget": math.nan}, "got nan"),
        ({"budget": math.inf}, "got inf"),
        ({"budget": True}, "got True"),
        ({"budget": timedelta(seconds=-1)}, "got -1.0"),
        ({"initial": -0.1}, "initial=...) must be at least 0, got -0.1"),
        ({"attempts": None, "budget": 1, "initial": 0}, "more than 0 when attempts is None"),
        ({"initial": None}, "initial=...) must be a finite number, got None"),
        ({"initial": 2.0, "maximum": 1.0}, "maximum=...) must be at least initial (2.0), got 1.0"),
        ({"multiplier": 0.5}, "multiplier=...) must be at least 1, got 0.5"),
        ({"multiplier": math.inf}, "got inf"),
        ({"jitter": 1.5}, "jitter=...) must be from 0 to 1, got 1.5"),
        ({"jitter": -0.1}, "got -0.1"),
        ({"clock": 0.0}, "clock=...) must be callable, got 0.0"),
        ({"sleep": asyncio.sleep}, "sleep=...) must be a plain function"),
        ({"asleep": lambda s: None}, "asleep=...) must be a coroutine function"),
        ({"on_retry": "log"}, "on_retry=...) must be callable or None, got 'log'"),
    ],
)
def test_an_invalid_policy_is_refused_naming_the_value(options: dict[str, Any], named: str) -> None:
    """Every bad option raises ConfigurationError (a ValueError) whose message names it."""
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**options)
    assert named in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("override", "named"), [({"attempts": 0}, "got 0"), ({"budget": -0.5}, "got -0.5")]
)
def test_begin_checks_its_overrides(override: dict[str, Any], named: str) -> None:
    """``begin(attempts=0)`` or a negative budget is refused as on construction."""
    with pytest.raises(ConfigurationError, match=named):
        RetryPolicy().begin("transaction", **override)


def test_a_policy_is_frozen_and_evolve_checks_again() -> None:
    """Policies are immutable values; ``attrs.evolve`` makes a checked copy."""
    policy = RetryPolicy(budget=timedelta(seconds=2), initial=timedelta(milliseconds=10))
    assert (policy.budget, policy.initial) == (2.0, 0.01)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        policy.attempts = 9  # type: ignore[misc]
    assert attrs.evolve(policy, attempts=9).attempts == 9
    with pytest.raises(ConfigurationError, match="got 0"):
        attrs.evolve(policy, attempts=0)


# -- asyncio -----------------------------------------------------------------------


def test_the_async_twin_retries_alike_with_the_injected_asleep() -> None:
    """``aretry`` tries ``attempts`` times and awaits the fake ``asleep`` (never time.sleep)."""
    fake = Fake()
    policy = fake.policy(attempts=4, initial=0.1, multiplier=2, maximum=1, jitter=0)
    policy = attrs.evolve(policy, sleep=lambda s: pytest.fail("the sync sleep was used"))
    assert asyncio.run(arun(policy, failures=100)) == -4
    assert fake.naps == pytest.approx([0.1, 0.2, 0.4])
    assert len(fake.events) == 3


def test_sync_and_async_twins_make_the_same_decisions() -> None:
    """Same seed, same clock: both twins sleep the same delays and report the same events."""
    results = []
    for twin in ("sync", "async"):
        fake = Fake()
        policy = fake.policy(attempts=None, budget=0.3, random=random.Random(3).random)
        tries = run(policy, 100) if twin == "sync" else asyncio.run(arun(policy, 100))
        results.append((tries, fake.naps, [(e.attempt, e.delay) for e in fake.events]))
    assert results[0] == results[1]


# -- the property ------------------------------------------------------------------


policies = st.fixed_dictionaries(
    {
        "attempts": st.none() | st.integers(1, 30),
        "budget": st.floats(0, 5),
        "initial": st.floats(0, 1),
        "multiplier": st.floats(1, 4),
        "extra": st.floats(0, 3),
        "jitter": st.floats(0, 1),
        "seed": st.integers(0, 2**32),
    }
)


@given(config=policies, cost=st.floats(0, 0.5), failures=st.integers(0, 200))
def test_the_sleeps_never_exceed_the_budget(
    config: dict[str, Any], cost: float, failures: int
) -> None:
    """For any policy: sleeps add up to at most the budget, tries to at most ``attempts``."""
    fake = Fake()
    if config["attempts"] is None and config["initial"] == 0:
        with pytest.raises(ConfigurationError, match="or it spins"):
            RetryPolicy(attempts=None, budget=config["budget"], initial=0)
        return
    maximum = config["initial"] + config.pop("extra")
    seeded = random.Random(config.pop("seed"))
    policy = fake.policy(**config, maximum=maximum, random=seeded.random)
    tries = run(policy, failures, cost=cost, fake=fake)
    assert sum(fake.naps) <= config["budget"] + 1e-9
    assert all(0 <= nap <= maximum for nap in fake.naps)
    if config["attempts"] is not None:
        assert abs(tries) <= config["attempts"]
    assert len(fake.naps) == abs(tries) - 1  # one sleep between tries, none after the last
    assert len(fake.events) == len(fake.naps)


# -- today's loops, reproduced -------------------------------------------------------------


def _bases(policy: RetryPolicy, count: int) -> list[float]:
    """The delays a preset would sleep with its jitter at its widest (u = 0)."""
    fake = Fake()
    policy = attrs.evolve(policy, clock=fake.clock, sleep=fake.sleep, random=lambda: 0.0)
    policy = attrs.evolve(policy, on_retry=None, attempts=count + 1, budget=None)
    run(policy, failures=count + 5)
    return fake.naps


def test_the_presets_reproduce_todays_loops() -> None:
    """TRANSACTION, CLAIM, RESOLVE and REDIS_CLIENT keep the delays and limits of the old loops."""
    assert _bases(TRANSACTION, 8) == pytest.approx([min(0.05, 0.001 * 2**a) for a in range(8)])
    assert (TRANSACTION.attempts, TRANSACTION.jitter) == (8, 1)  # uniform(0, step)
    assert _bases(CLAIM, 8) == pytest.approx([min(0.05, 0.002 * 2**a) for a in range(8)])
    assert (CLAIM.attempts, CLAIM.jitter) == (None, 0.5)  # uniform(step / 2, step)
    assert _bases(RESOLVE, 2) == pytest.approx([min(1.0, 0.05 * 2**a) for a in range(2)])
    assert (RESOLVE.attempts, RESOLVE.jitter) == (3, 0)  # resolve_attempts=2: two re-sends
    # ExponentialWithJitterBackoff(base=0.05, cap=1.0).compute(f) = min(1, random() * 0.05 * 2**f)
    assert _bases(REDIS_CLIENT, 3) == pytest.approx([0.05 * 2**f for f in (1, 2, 3)])
    assert (REDIS_CLIENT.attempts, REDIS_CLIENT.jitter) == (4, 1)  # retries=3


# -- redis-py's Retry ----------------------------------------------------------------


class Flaky:
    """``do`` for call_with_retry: raises the given errors in turn, then answers."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.failed: list[tuple[Exception, int]] = []

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "PONG"

    def fail(self, error: Exception, count: int = 0) -> None:
        self.failed.append((error, count))


def test_policy_retry_retries_connection_errors_per_the_policy() -> None:
    """Two lost connections, then an answer: three calls, ``fail`` per failure, two sleeps."""
    fake = Fake()
    retry = PolicyRetry(fake.policy(attempts=4, jitter=0))
    do = Flaky(rex.ConnectionError("a"), rex.TimeoutError("b"))
    assert retry.call_with_retry(do, do.fail, with_failure_count=True) == "PONG"
    assert do.calls == 3
    assert [count for _, count in do.failed] == [1, 2]
    assert fake.naps == pytest.approx([0.05, 0.1])
    assert [e.operation for e in fake.events] == ["redis", "redis"]


def test_policy_retry_raises_the_last_error_after_its_attempts() -> None:
    """Always failing: ``attempts`` calls, the last error raised, no sleep after it."""
    fake = Fake()
    retry = PolicyRetry(fake.policy(attempts=3))
    assert retry.get_retries() == 2
    do = Flaky(*(rex.ConnectionError(str(n)) for n in range(10)))
    with pytest.raises(rex.ConnectionError, match=r"^2$"):
        retry.call_with_retry(do, do.fail)
    assert (do.calls, len(fake.naps)) == (3, 2)


def test_policy_retry_follows_update_retries() -> None:
    """redis-py's ``update_retries(0)`` means one call, no retry, whatever the policy says."""
    fake = Fake()
    retry = PolicyRetry(fake.policy(attempts=5))
    retry.update_retries(0)
    do = Flaky(rex.ConnectionError("x"), rex.ConnectionError("y"))
    with pytest.raises(rex.ConnectionError):
        retry.call_with_retry(do, do.fail)
    assert (do.calls, fake.naps) == (1, [])


def test_policy_retry_never_retries_refused_credentials() -> None:
    """A refused password is raised at once, even when its class is in supported_errors."""
    fake = Fake()
    retry = PolicyRetry(fake.policy(attempts=5), supported_errors=(rex.ConnectionError,))
    do = Flaky(rex.AuthenticationError("no"))  # an AuthenticationError is a ConnectionError
    with pytest.raises(rex.AuthenticationError):
        retry.call_with_retry(do, do.fail)
    assert (do.calls, fake.naps) == (1, [])


def test_policy_retry_raises_other_errors_at_once() -> None:
    """An error outside supported_errors (an ERR reply) is not retried."""
    fake = Fake()
    do = Flaky(rex.ResponseError("ERR"))
    with pytest.raises(rex.ResponseError):
        PolicyRetry(fake.policy(attempts=5)).call_with_retry(do, do.fail)
    assert (do.calls, fake.naps) == (1, [])


def test_policy_retry_honours_redis_pys_own_predicate() -> None:
    """``is_retryable`` returning False stops at once, as in redis-py."""
    fake = Fake()
    do = Flaky(rex.ConnectionError("x"))
    with pytest.raises(rex.ConnectionError):
        PolicyRetry(fake.policy(attempts=5)).call_with_retry(do, do.fail, lambda e: False)
    assert do.calls == 1


def test_async_policy_retry_awaits_the_policys_asleep() -> None:
    """The asyncio twin retries alike, awaiting ``fail`` and the fake ``asleep``."""
    fake = Fake()
    retry = AsyncPolicyRetry(fake.policy(attempts=3, jitter=0))
    errors = [rex.ConnectionError("a"), rex.ConnectionError("b")]
    failed: list[int] = []

    async def do() -> str:
        if errors:
            raise errors.pop(0)
        return "PONG"

    async def fail(error: Exception, count: int) -> None:
        failed.append(count)

    assert asyncio.run(retry.call_with_retry(do, fail, with_failure_count=True)) == "PONG"
    assert (failed, fake.naps) == ([1, 2], pytest.approx([0.05, 0.1]))


def test_policy_retries_compare_by_policy_and_hash() -> None:
    """Two retries of one policy are equal (redis-py compares and hashes Retry objects)."""
    assert PolicyRetry(RESOLVE) == PolicyRetry(RESOLVE)
    assert hash(PolicyRetry(RESOLVE)) == hash(PolicyRetry(RESOLVE))
    assert PolicyRetry(RESOLVE) != PolicyRetry(TRANSACTION)
    assert PolicyBackoff(REDIS_CLIENT).compute(1) == 0.1
    assert PolicyBackoff(REDIS_CLIENT).compute(10) == 1.0


def test_redis_py_clients_share_the_policy_and_its_hook() -> None:
    """redis-py deep-copies ``retry`` per connection: the copy keeps the very same policy."""
    fake = Fake()
    retry = PolicyRetry(fake.policy(attempts=2))
    clone = copy.deepcopy(retry)
    assert clone is not retry
    assert clone.policy is retry.policy
    assert clone.policy.on_retry == fake.events.append  # not a copy of the list
    client = redis.Redis(port=1, retry=retry)  # builds without connecting
    connection = client.connection_pool.make_connection()
    assert connection.retry.policy is retry.policy
    client.close()
