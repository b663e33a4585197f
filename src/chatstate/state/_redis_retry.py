"""redis-py's ``Retry``, driven by a :class:`~chatstate._retry.RetryPolicy`.

redis-py retries the commands chatstate leaves to it (locks, ``ping``, Cluster
routing) with its own loop, backoff and ``time.sleep``. These subclasses keep
redis-py's contract (``call_with_retry``, ``get_retries``, ``fail`` called once
per failure, so that it reconnects) but take the delays, the budget, the sleeps
and the hook from a policy, and never retry a refused password.

redis-py deep-copies its ``retry`` into every connection: these copy themselves
shallowly, so that every connection shares the one (immutable) policy and its
hook, never a copy of the hook's owner.

redis-py nests its retries: a command's ``call_with_retry`` connects through the
connection's own ``call_with_retry``, so a policy of 4 attempts would make 16
connection attempts. Only the outermost loop retries here (a context variable
marks it); an inner one runs its call once and lets the error reach the outer.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Self, TypeVar

import redis.exceptions as rex
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import AbstractBackoff
from redis.retry import Retry

from chatstate._retry import REDIS_CLIENT, Retrying, RetryPolicy

__all__ = ["AsyncPolicyRetry", "PolicyBackoff", "PolicyRetry"]

T = TypeVar("T")

_RETRYING: ContextVar[bool] = ContextVar("chatstate_redis_retrying", default=False)
"""True inside a policy's retry loop: a nested loop then tries once."""


def retryable(error: Exception, inner: Callable[[Exception], bool] | None) -> bool:
    """False for refused credentials (they stay refused), else what redis-py's predicate says."""
    if isinstance(error, rex.AuthenticationError | rex.AuthorizationError):
        return False
    return inner(error) if inner is not None else True


class PolicyBackoff(AbstractBackoff):
    """The policy's delays without jitter, for redis-py code that asks a backoff directly."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    def compute(self, failures: int) -> float:
        """The delay before retry ``failures`` (before jitter)."""
        policy = self.policy
        base = policy.initial
        for _ in range(max(0, failures - 1)):
            base = min(policy.maximum, base * policy.multiplier)
            if base >= policy.maximum:
                break
        return float(base)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PolicyBackoff) and other.policy == self.policy

    def __hash__(self) -> int:
        return hash(self.policy)


def _retries(policy: RetryPolicy) -> int:
    """redis-py's count: retries after the first try; -1 for no limit."""
    return -1 if policy.attempts is None else policy.attempts - 1


def _begin(policy: RetryPolicy, retries: int) -> Retrying:
    """Start retrying; redis-py's ``update_retries()`` overrides the policy's attempts."""
    return policy.begin("redis", attempts=None if retries < 0 else retries + 1)


class PolicyRetry(Retry):
    """redis-py's ``Retry`` with a chatstate policy (``REDIS_CLIENT`` by default)."""

    def __init__(self, policy: RetryPolicy = REDIS_CLIENT, **kwargs: Any) -> None:
        super().__init__(PolicyBackoff(policy), _retries(policy), **kwargs)
        self.policy = policy

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return copy.copy(self)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        """Call ``do`` until it succeeds or the policy gives up (then raise its last error)."""
        if _RETRYING.get():
            return do()  # inside another retry loop: that one retries
        token = _RETRYING.set(True)
        try:
            return self._loop(do, fail, is_retryable, with_failure_count)
        finally:
            _RETRYING.reset(token)

    def _loop(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None,
        with_failure_count: bool,
    ) -> T:
        retrying: Retrying | None = None
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if not retryable(error, is_retryable):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if retrying is None:
                    retrying = _begin(self.policy, self._retries)
                if not retrying.retry(error):
                    raise


class AsyncPolicyRetry(AsyncRetry):
    """The asyncio twin of :class:`PolicyRetry`."""

    def __init__(self, policy: RetryPolicy = REDIS_CLIENT, **kwargs: Any) -> None:
        super().__init__(PolicyBackoff(policy), _retries(policy), **kwargs)
        self.policy = policy

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return copy.copy(self)

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        """The asyncio twin of :meth:`PolicyRetry.call_with_retry`."""
        if _RETRYING.get():
            return await do()  # inside another retry loop: that one retries
        token = _RETRYING.set(True)
        try:
            return await self._loop(do, fail, is_retryable, with_failure_count)
        finally:
            _RETRYING.reset(token)

    async def _loop(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None,
        with_failure_count: bool,
    ) -> T:
        retrying: Retrying | None = None
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if not retryable(error, is_retryable):
                    raise
                failures += 1
                if with_failure_count:
                    await fail(error, failures)
                else:
                    await fail(error)
                if retrying is None:
                    retrying = _begin(self.policy, self._retries)
                if not await retrying.aretry(error):
                    raise
