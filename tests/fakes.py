"""Test doubles shared by the retry tests: a clock that only sleeps move."""

from __future__ import annotations

from typing import Any

from chatstate import RetryPolicy
from chatstate.observe import RetryScheduled


class Fake:
    """A clock that only sleeps move, and a record of every sleep and every hook call."""

    def __init__(self) -> None:
        self.now = 0.0
        self.naps: list[float] = []
        self.events: list[RetryScheduled] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def policy(self, **options: Any) -> RetryPolicy:
        options.setdefault("on_retry", self.events.append)
        return RetryPolicy(clock=self.clock, sleep=self.sleep, asleep=self.asleep, **options)
