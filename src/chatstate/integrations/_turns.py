"""One user's updates in one process, first in, first out, then the user's claim.

The aiogram isolation and python-telegram-bot's ``ChatstateApplication`` both
hold a user with a chatstate claim. A claim that is busy is retried with jitter,
so several updates of one user waiting in one process would take it in any
order: a user's answers from one ``getUpdates`` batch ran out of order. Each
update first waits its turn on an asyncio lock of the user's, which is first in,
first out, as aiogram's ``SimpleEventIsolation`` is; then it claims the user.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from chatstate._locks import AsyncKeyedLocks
from chatstate.exceptions import LockTimeoutError, UserBusyError
from chatstate.state import AsyncClaim, AsyncStateService

__all__ = ["claim_in_turn"]


@contextlib.asynccontextmanager
async def claim_in_turn(
    turns: AsyncKeyedLocks,
    service: AsyncStateService,
    doc: str,
    op_id: str | None,
    *,
    purpose: str,
    lease: float,
    wait: float,
    busy: str,
) -> AsyncIterator[AsyncClaim]:
    """Wait for this process's earlier updates of ``doc``, claim it, and hold the turn.

    ``wait`` bounds the whole wait, the turn's and the claim's.

    Raises:
        LockTimeoutError: with the message ``busy``: the wait ran past ``wait``.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with contextlib.AsyncExitStack() as turn:
        try:
            await turn.enter_async_context(turns.hold(doc, wait, "user"))
        except LockTimeoutError:
            raise LockTimeoutError(busy) from None
        try:
            claim = await service.claim(
                doc, op_id, purpose=purpose, lease=lease, wait=max(deadline - loop.time(), 0.0)
            )
        except UserBusyError as exc:
            raise LockTimeoutError(busy) from exc
        yield claim
