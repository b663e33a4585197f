"""Test doubles shared by the suite: a clock that only moves when told, and a sleeping one.

``FakeClock`` is what a backend (``MemoryBackend(clock=...)``, ``SqliteBackend``) or a
router (``Router(..., clock=...)``) takes as its clock; ``Fake`` adds sleeps that move
it and records them, for the retry tests.
"""

from __future__ import annotations

from typing import Any

from chatstate import RetryPolicy
from chatstate.observe import RetryScheduled

START = 1_900_000_000.0
"""A wall-clock time (2030) the flow tests start at: far from 0, whole seconds."""


class FakeClock:
    """A clock that reads ``now`` (seconds) and moves only when a test moves it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        self.now += seconds


class Fake(FakeClock):
    """A clock that only sleeps move, and a record of every sleep and every hook call."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.naps: list[float] = []
        self.events: list[RetryScheduled] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.naps.append(seconds)
        self.advance(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def policy(self, **options: Any) -> RetryPolicy:
        options.setdefault("on_retry", self.events.append)
        return RetryPolicy(clock=self.clock, sleep=self.sleep, asleep=self.asleep, **options)
