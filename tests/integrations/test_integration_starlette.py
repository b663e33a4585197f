"""The Starlette/FastAPI lifespan and dependency, served by uvicorn over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Annotated, Any, ClassVar

import pytest
import uvicorn
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import servers
from chatstate import AsyncRedisBackend, AsyncStateService, MemoryBackend, StateService
from chatstate.exceptions import UsageError
from chatstate.integrations.starlette import (
    STATE_KEY,
    chatstate_lifespan,
    state_service,
    sync_state_service,
)


class RecordingService(AsyncStateService):
    """An in-memory service that remembers whether it was closed."""

    instances: ClassVar[list[RecordingService]] = []

    def __init__(self) -> None:
        super().__init__()
        self.closed = False
        RecordingService.instances.append(self)

    async def aclose(self) -> None:
        self.closed = True
        await super().aclose()


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` under uvicorn (lifespan on) on a free port; stop it on exit."""
    port = servers.free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


def _post(url: str) -> Any:
    request = urllib.request.Request(url, b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_starlette_endpoint_gets_the_service_and_it_closes_at_shutdown() -> None:
    """A Starlette endpoint reads and writes through the lifespan's service; shutdown closes it."""
    RecordingService.instances.clear()

    async def visit(request: Request) -> JSONResponse:
        svc = state_service(request)
        return JSONResponse({"visits": await svc.increment("ann", "visits")})

    app = Starlette(
        routes=[Route("/visit", visit, methods=["POST"])],
        lifespan=chatstate_lifespan(RecordingService),
    )
    with serve(app) as base:
        assert [_post(f"{base}/visit")["visits"] for _ in range(3)] == [1, 2, 3]
        (service,) = RecordingService.instances
        assert not service.closed
    assert service.closed


def test_fastapi_dependency_hands_the_service_to_endpoints() -> None:
    """Depends(state_service) gives each FastAPI endpoint the app's one service."""
    RecordingService.instances.clear()
    app = FastAPI(lifespan=chatstate_lifespan(RecordingService))

    @app.post("/cart/{item}")
    async def add(
        item: str, svc: Annotated[AsyncStateService, Depends(state_service)]
    ) -> dict[str, Any]:
        await svc.increment("ann", ("cart", item))
        return await svc.get("ann")

    with serve(app) as base:
        _post(f"{base}/cart/apple")
        assert _post(f"{base}/cart/apple") == {"cart": {"apple": 2}}
        assert _post(f"{base}/cart/pear") == {"cart": {"apple": 2, "pear": 1}}
    assert len(RecordingService.instances) == 1
    assert RecordingService.instances[0].closed


@pytest.mark.redis
def test_url_opens_a_redis_service(redis_url: str, namespace: str) -> None:
    """Given a URL, the lifespan opens a Redis service in the namespace and a setup hook runs."""

    async def setup(svc: AsyncStateService) -> dict[str, Any]:
        await svc.update("boot", {"booted": True})
        return {"greeting": "hello"}

    async def hit(request: Request) -> JSONResponse:
        await state_service(request).update("ann", {"seen": True})
        return JSONResponse({"greeting": request.state.greeting})

    app = Starlette(
        routes=[Route("/", hit, methods=["POST"])],
        lifespan=chatstate_lifespan(redis_url, namespace=namespace, setup=setup),
    )
    with serve(app) as base:
        assert _post(f"{base}/") == {"greeting": "hello"}

    async def read() -> list[Any]:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        docs = [await svc.get("ann"), await svc.get("boot")]
        await svc.aclose()
        return docs

    assert asyncio.run(read()) == [{"seen": True}, {"booted": True}]


def test_sync_twin_and_wrong_twin() -> None:
    """A sync service comes through sync_state_service; asking for the wrong twin fails loudly."""
    sync = StateService(MemoryBackend())
    request = Request({"type": "http", "state": {STATE_KEY: sync}})
    assert sync_state_service(request) is sync
    with pytest.raises(UsageError, match="sync_state_service"):
        state_service(request)
    async_request = Request({"type": "http", "state": {STATE_KEY: AsyncStateService()}})
    with pytest.raises(UsageError, match="use state_service"):
        sync_state_service(async_request)


def test_without_the_lifespan_the_dependency_says_so() -> None:
    """An app without chatstate_lifespan gets a UsageError naming the fix."""
    with pytest.raises(UsageError, match="lifespan=chatstate_lifespan"):
        state_service(Request({"type": "http", "state": {}}))


def test_sync_service_is_closed_at_shutdown() -> None:
    """The lifespan closes a sync service too (in a thread)."""
    closed: list[bool] = []

    class Closing(StateService):
        def close(self) -> None:
            closed.append(True)
            super().close()

    async def main() -> None:
        async with chatstate_lifespan(Closing)(None) as state:
            assert isinstance(state[STATE_KEY], Closing)
            assert not closed

    asyncio.run(main())
    assert closed == [True]


def test_options_that_need_a_url_are_refused_with_a_callable() -> None:
    """namespace= with a callable is a mistake caught when the lifespan is made."""
    with pytest.raises(UsageError, match="URL"):
        chatstate_lifespan(AsyncStateService, namespace="x")


def test_a_service_you_made_is_served_and_left_open() -> None:
    """chatstate_lifespan(service) serves your own service and does not close it at shutdown."""
    from chatstate.integrations.starlette import STATE_KEY, chatstate_lifespan

    mine = AsyncStateService()
    closed: list[bool] = []
    original = mine.aclose

    async def aclose() -> None:
        closed.append(True)
        await original()

    mine.aclose = aclose  # type: ignore[method-assign]

    async def main() -> None:
        async with chatstate_lifespan(mine)(None) as state:
            assert state[STATE_KEY] is mine
            await state[STATE_KEY].update("ana", {"n": 1})
        assert closed == []
        assert await mine.get("ana") == {"n": 1}

    asyncio.run(main())
    with pytest.raises(UsageError, match="URL, a service"):
        chatstate_lifespan(42)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="namespace and ttl"):
        chatstate_lifespan(mine, ttl=5)
