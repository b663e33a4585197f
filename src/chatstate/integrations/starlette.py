"""A state service for Starlette and FastAPI apps: opened at start-up, closed at shutdown.

:func:`chatstate_lifespan` opens the service when the app starts and closes it
when the app stops; :func:`state_service` (or :func:`sync_state_service`)
hands it to an endpoint, as a FastAPI dependency or called with the request::

    app = FastAPI(lifespan=chatstate_lifespan("redis://localhost:6379/0"))

    @app.post("/webhook")
    async def webhook(svc: Annotated[AsyncStateService, Depends(state_service)]) -> dict:
        return await svc.get("alice")

The service travels in the lifespan state (``request.state``), so one process
may serve several apps, each with its own service.

Needs ``pip install 'chatstate[starlette]'`` (FastAPI brings Starlette along).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from typing import Any, TypeAlias

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

from chatstate.exceptions import UsageError
from chatstate.state import AsyncRedisBackend, AsyncStateService, StateService

__all__ = ["STATE_KEY", "chatstate_lifespan", "state_service", "sync_state_service"]

STATE_KEY = "chatstate"
"""The lifespan state entry (``request.state.chatstate``) that holds the service."""

AnyService: TypeAlias = AsyncStateService | StateService
Lifespan: TypeAlias = Callable[[Any], AbstractAsyncContextManager[dict[str, Any]]]


def _opener(
    service: object, namespace: str | None, ttl: float | timedelta | None
) -> tuple[AnyService | None, Callable[[], AnyService]]:
    """The caller's own service (or None), and how the lifespan gets the service it serves."""
    if isinstance(service, AsyncStateService | StateService):
        given: AnyService | None = service
    else:
        given = None
    if (given is not None or callable(service)) and (namespace is not None or ttl is not None):
        raise UsageError("namespace and ttl go with a URL; set them on your service instead")
    if given is not None:
        mine = given
        return given, lambda: mine
    if callable(service):
        return None, service  # it makes a service: checked at start-up
    if service is None:
        return None, lambda: AsyncStateService(ttl=ttl)
    if not isinstance(service, str):
        raise UsageError(
            "chatstate_lifespan takes a URL, a service, a function that makes one, or None; "
            f"not {type(service).__name__}"
        )
    url = service
    options: dict[str, Any] = {} if namespace is None else {"namespace": namespace}
    return None, lambda: AsyncStateService(AsyncRedisBackend.from_url(url, **options), ttl=ttl)


def chatstate_lifespan(
    service: str | AnyService | Callable[[], AnyService] | None = None,
    *,
    namespace: str | None = None,
    ttl: float | timedelta | None = None,
    setup: Callable[[Any], Mapping[str, Any] | Awaitable[Mapping[str, Any]]] | None = None,
) -> Lifespan:
    """A lifespan that opens a state service at start-up and closes it at shutdown.

    Examples:
        >>> import asyncio
        >>> lifespan = chatstate_lifespan()
        >>> async def run_app():
        ...     async with lifespan(None) as state:  # what Starlette does around the app
        ...         return await state[STATE_KEY].update("alice", {"visits": 1})
        >>> asyncio.run(run_app())
        {'visits': 1}

    Args:
        service: A Redis or Valkey URL (an :class:`~chatstate.AsyncStateService`
            over :class:`~chatstate.AsyncRedisBackend` is made from it), a
            callable that makes the service (either twin), a service you
            made (either twin: it stays yours, the lifespan does not close
            it), or ``None`` for an :class:`~chatstate.AsyncStateService` in
            memory.
        namespace: With a URL: the prefix of every Redis key.
        ttl: With a URL or ``None``: forget a user's document this long after
            its last write.
        setup: Called with the open service at start-up (it may be async);
            what it returns is
            added to the lifespan state (``request.state``), for objects
            built on the service (a router, ...).

    Returns:
        What ``Starlette(lifespan=...)`` and ``FastAPI(lifespan=...)`` take.

    Raises:
        UsageError: ``namespace`` or ``ttl`` was given with a callable or a
            service, or ``service`` is none of the above.
    """
    given, open_service = _opener(service, namespace, ttl)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:  # noqa: ARG001 - ASGI hands it
        opened = open_service()
        if not isinstance(opened, AsyncStateService | StateService):
            raise UsageError(f"the service callable returned {type(opened).__name__}")
        try:
            state: dict[str, Any] = {STATE_KEY: opened}
            if setup is not None:
                extra = setup(opened)
                state.update(await extra if inspect.isawaitable(extra) else extra)
            yield state
        finally:
            if opened is given:
                pass  # the caller's service: the caller closes it
            elif isinstance(opened, AsyncStateService):
                await opened.aclose()
            else:
                await run_in_threadpool(opened.close)

    return lifespan


def _opened(connection: HTTPConnection) -> AnyService:
    service = getattr(connection.state, STATE_KEY, None)
    if not isinstance(service, AsyncStateService | StateService):
        raise UsageError("no state service here: give the app lifespan=chatstate_lifespan(...)")
    return service


def state_service(request: HTTPConnection) -> AsyncStateService:
    """The app's :class:`~chatstate.AsyncStateService`: a FastAPI dependency, or call it.

    Raises:
        UsageError: the app has no :func:`chatstate_lifespan`, or its service
            is the sync twin (use :func:`sync_state_service`).
    """
    service = _opened(request)
    if not isinstance(service, AsyncStateService):
        raise UsageError("the app's state service is a StateService: use sync_state_service()")
    return service


def sync_state_service(request: HTTPConnection) -> StateService:
    """The app's :class:`~chatstate.StateService` (the sync twin; call it in a thread pool).

    Raises:
        UsageError: the app has no :func:`chatstate_lifespan`, or its service
            is the async twin (use :func:`state_service`).
    """
    service = _opened(request)
    if not isinstance(service, StateService):
        raise UsageError("the app's state service is an AsyncStateService: use state_service()")
    return service
