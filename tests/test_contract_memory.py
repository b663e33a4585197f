"""The backend contract suite run on the in-memory backend, with a fake clock."""

import pytest

from chatstate import AsyncMemoryBackend, MemoryBackend
from chatstate.testing import BackendContract


class FakeClock:
    """A monotonic clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TestMemoryBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryBackend(clock=self.clock)

    def make_backend(self) -> MemoryBackend:
        return self.store

    def make_async_backend(self) -> AsyncMemoryBackend:
        return AsyncMemoryBackend(self.store)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
