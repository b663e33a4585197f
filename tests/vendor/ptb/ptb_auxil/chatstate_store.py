"""The store the vendored tests' persistence lives in (chatstate's addition, not from PTB).

Each test gets a namespace of its own on a throwaway Redis started by the suite
(``tests/servers.py``). The test double ``TrackingPersistence`` is a
``ChatstatePersistence`` over a service of this store; what the tests read as
"the persisted data" is loaded by a new ``ChatstatePersistence`` over a new
connection, on a thread and event loop of its own: what another process would
find in the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Awaitable, Callable
from typing import Any

from chatstate import AsyncRedisBackend, AsyncStateService
from chatstate.integrations.telegram import ChatstatePersistence


class Store:
    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.namespace = namespace
        self.services: list[AsyncStateService] = []

    def _new_service(self) -> AsyncStateService:
        return AsyncStateService(AsyncRedisBackend.from_url(self.url, namespace=self.namespace))

    def service(self) -> AsyncStateService:
        """A service for a test's persistence (closed when the test ends)."""
        service = self._new_service()
        self.services.append(service)
        return service

    async def aclose(self) -> None:
        while self.services:
            await self.services.pop().aclose()

    def fresh(self, work: Callable[[ChatstatePersistence], Awaitable[Any]]) -> Any:
        """``await work(persistence)`` with a new persistence over the store, as another process."""

        async def main() -> Any:
            service = self._new_service()
            try:
                return await work(ChatstatePersistence(service))
            finally:
                await service.aclose()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, main()).result()


STORE: Store | None = None


def current() -> Store:
    """The store of the running test (set by the autouse fixture in ``conftest.py``)."""
    assert STORE is not None, "no store: the vendored PTB tests run under their conftest.py"
    return STORE
