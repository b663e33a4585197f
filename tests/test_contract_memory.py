"""The backend contract suite run on the in-memory backend."""

from collections.abc import Iterator

import pytest

from chatstate import AsyncMemoryBackend, MemoryBackend
from chatstate.testing import BackendContract


class TestMemoryBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> Iterator[None]:
        self.store = MemoryBackend()
        yield

    def make_backend(self) -> MemoryBackend:
        return self.store

    def make_async_backend(self) -> AsyncMemoryBackend:
        return AsyncMemoryBackend(self.store)
