"""redis-py's ``Retry``, driven by a :class:`~chatstate._retry.RetryPolicy`.

The one body of the pair: ``tools/unasync.py`` writes ``PolicyRetry`` (for
redis-py's sync client) from it. What they share without I/O (the backoff, the
nesting guard, which errors never retry) is in ``chatstate.state.redis._retry``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, Self

import redis.asyncio.retry as redis_retry

from chatstate._retry import REDIS_CLIENT, Retrying, RetryPolicy
from chatstate.state.redis._retry import RETRYING, PolicyBackoff, begin, retries, retryable

__all__ = ["AsyncPolicyRetry"]


class AsyncPolicyRetry(redis_retry.Retry):
    """redis-py's ``Retry`` with a chatstate policy (``REDIS_CLIENT`` by default)."""

    def __init__(self, policy: RetryPolicy = REDIS_CLIENT, **kwargs: Any) -> None:
        super().__init__(PolicyBackoff(policy), retries(policy), **kwargs)
        self.policy = policy

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return copy.copy(self)

    async def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        """Call ``do`` until it succeeds or the policy gives up (then raise its last error)."""
        if RETRYING.get():
            return await do()  # inside another retry loop: that one retries
        token = RETRYING.set(True)
        retrying: Retrying | None = None
        failures = 0
        try:
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
                        retrying = begin(self.policy, self._retries)
                    if not await retrying.aretry(error):
                        raise
        finally:
            RETRYING.reset(token)
