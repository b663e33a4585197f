"""redis-py's ``Retry``, driven by a :class:`~chatstate._retry.RetryPolicy`.

redis-py retries what chatstate leaves to it (connecting, ``ping``, the sync
Cluster's routing) with its own loop, backoff and ``time.sleep``; chatstate's
own commands are retried under the same policy by ``AsyncRedisIO._send``. ``PolicyRetry`` and
``AsyncPolicyRetry`` (one body in ``_async/retry.py``, the sync twin
generated) keep
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

This module holds what the twins share and no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeVar

import redis.exceptions as rex
from redis.backoff import AbstractBackoff

from chatstate._retry import Retrying, RetryPolicy

__all__ = ["RETRYING", "PolicyBackoff", "begin", "retries", "retryable"]

T = TypeVar("T")

RETRYING: ContextVar[bool] = ContextVar("chatstate_redis_retrying", default=False)
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


def retries(policy: RetryPolicy) -> int:
    """redis-py's count: retries after the first try; -1 for no limit."""
    return -1 if policy.attempts is None else policy.attempts - 1


def begin(policy: RetryPolicy, retries: int) -> Retrying:
    """Start retrying; redis-py's ``update_retries()`` overrides the policy's attempts."""
    return policy.begin("redis", attempts=None if retries < 0 else retries + 1)
