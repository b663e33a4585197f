"""The backend contract suite run on the in-memory backend, with a fake clock."""

import pytest

from chatstate import AsyncMemoryBackend, MemoryBackend, StateService
from chatstate.exceptions import ConfigurationError
from chatstate.state import Listing, Outcome, Snapshot, Write
from chatstate.testing import BackendContract
from fakes import FakeClock


class TestMemoryBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.clock = FakeClock(1000.0)
        self.store = MemoryBackend(clock=self.clock)

    def make_backend(self) -> MemoryBackend:
        return self.store

    def make_async_backend(self) -> AsyncMemoryBackend:
        return AsyncMemoryBackend(self.store)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds


class _LoadAndApplyOnly:
    """A backend of one's own with the three required methods and no capability."""

    def __init__(self) -> None:
        self.store = MemoryBackend()

    def load(self, user_id: str) -> Snapshot | None:
        return self.store.load(user_id)

    def apply(self, user_id: str, write: Write) -> Outcome:
        return self.store.apply(user_id, write)

    def close(self) -> None:
        pass


def test_users_over_a_backend_that_cannot_list_says_so() -> None:
    svc = StateService(_LoadAndApplyOnly())
    svc.update("ann", {"a": 1})
    assert not isinstance(svc.manager.backend, Listing)
    with pytest.raises(ConfigurationError, match="cannot list its users"):
        list(svc.users())
