"""The backend contract suite run on the in-memory backend."""

import pytest

from chatstate import AsyncMemoryBackend, MemoryBackend
from chatstate.testing import BackendContract


class TestMemoryBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = MemoryBackend()

    def make_backend(self) -> MemoryBackend:
        return self.store

    def make_async_backend(self) -> AsyncMemoryBackend:
        return AsyncMemoryBackend(self.store)
