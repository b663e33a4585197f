"""Deliveries: a message's replies, kept in the store until the caller says they were sent.

:meth:`AsyncRouter.deliver` handles a message and commits its step together
with its replies, in one atomic write; the user stays claimed (renewed by the
heartbeat) until the delivery is acknowledged, which drops the stored replies
and lets the user's next message in. A process that dies after the commit and
before the acknowledgement leaves the replies stored: the redelivered message
(or, for a platform that never redelivers, :meth:`AsyncRouter.undelivered`)
returns them again, and runs nothing.

The one window left: a process that dies after the platform accepted a reply
and before the acknowledgement was stored sends that reply again on the
redelivery. Nothing else is sent twice.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from chatstate._twins import run_sync
from chatstate.exceptions import ClaimLostError, UsageError
from chatstate.flow._screens import Screen

if TYPE_CHECKING:
    from chatstate.flow._message import Message
    from chatstate.flow._router import AsyncRouter, Router, _Opened

__all__ = ["AsyncDelivery", "Delivery"]

log = logging.getLogger("chatstate.flow")


class _DeliveryBase:
    """What both twins share: the message, the replies, the state of the delivery."""

    def __init__(
        self, user_id: str, message: Message | None, opened: _Opened | None, keys: list[str]
    ) -> None:
        self.user_id = user_id
        self.message = message
        self._opened = opened
        self._keys = keys  # a sweep's outbox entries (no message)
        self._done = False
        self._acked = False
        self._abandoned = False

    def _check_ack(self) -> bool:
        """True when there is something to acknowledge; refuses a delivery in the wrong state."""
        if self._opened is None:
            raise UsageError("the delivery has not started: use it as a context manager")
        if self._abandoned:
            raise UsageError(
                "this delivery was abandoned: its replies stay stored for the redelivery "
                "(acknowledge without abandoning, once they were sent)"
            )
        return not self._done

    @property
    def replies(self) -> list[Screen]:
        """The replies to send, in order; ``[]`` when there is nothing to send.

        Raises:
            UsageError: the delivery has not started (use it in a ``with`` block).
        """
        if self._opened is None:
            raise UsageError("the delivery has not started: use it as a context manager")
        return self._opened.replies

    @property
    def resent(self) -> bool:
        """True when these replies were stored by an earlier handling that was not acknowledged.

        The message did not run again; a crash of that handling may have sent
        some of them already.
        """
        return self._opened is not None and self._opened.resent

    @property
    def acknowledged(self) -> bool:
        """True once :meth:`ack` stored that the replies were sent (or there were none)."""
        return self._acked

    def __repr__(self) -> str:
        state = "open" if self._opened is not None and not self._done else "done"
        count = len(self._opened.replies) if self._opened is not None else "?"
        return f"<{type(self).__name__} user_id={self.user_id!r} replies={count} {state}>"


class AsyncDelivery(_DeliveryBase):
    """One message's replies and their acknowledgement; see :meth:`AsyncRouter.deliver`.

    Use it as an asynchronous context manager: entering handles the message
    (once: a redelivery runs nothing), the block sends :attr:`replies`, and
    leaving the block normally acknowledges them. An exception in the block
    leaves them stored and unacknowledged (the user is let go at once): the
    redelivered message, or :meth:`AsyncRouter.undelivered`, returns them again.

    Attributes:
        user_id: Whose replies these are.
        message: The message handled (``None`` for a delivery that
            :meth:`AsyncRouter.undelivered` found).
    """

    def __init__(
        self,
        router: AsyncRouter[Any],
        user_id: str,
        message: Message | None,
        opened: _Opened | None = None,
        *,
        keys: list[str] | None = None,
    ) -> None:
        super().__init__(user_id, message, opened, keys or [])
        self._router = router

    async def start(self) -> Self:
        """Handle the message (or claim the swept user), once; entering the block calls it."""
        if self._opened is None:
            service = self._router.service
            if self.message is None:
                self._opened = await self._router.stored_with(service, self.user_id, self._keys)
            else:
                self._opened = await self._router.open_with(service, self.message)
        return self

    async def ack(self) -> None:
        """Store that the replies were sent: they are dropped and the user is let go.

        Call it once the platform accepted every reply (for a webhook that
        answers in its HTTP response: after the response was sent).
        Acknowledging twice does nothing.

        Raises:
            UsageError: the delivery has not started, or was abandoned.
        """
        if not self._check_ack():
            return
        self._done = self._acked = True
        assert self._opened is not None
        await _settle(self._opened, ack=True)

    async def abandon(self) -> None:
        """Let the user go and keep the replies stored: they were not (all) sent.

        The redelivered message (or :meth:`AsyncRouter.undelivered`) returns
        them again. Abandoning after an acknowledgement does nothing.
        """
        if self._done or self._opened is None:
            return
        self._done = self._abandoned = True
        await _settle(self._opened, ack=False)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            if not self._abandoned:
                await self.ack()
            return
        try:
            await self.abandon()
        except Exception:  # the claim lapses on its own; the block's error matters more
            log.warning(
                "could not let go of user %r after a failed send", self.user_id, exc_info=True
            )


class Delivery(_DeliveryBase):
    """The sync twin of :class:`AsyncDelivery`; see :meth:`Router.deliver`."""

    def __init__(
        self,
        router: Router[Any],
        user_id: str,
        message: Message | None,
        opened: _Opened | None = None,
        *,
        keys: list[str] | None = None,
    ) -> None:
        super().__init__(user_id, message, opened, keys or [])
        self._router = router

    def start(self) -> Self:
        """See :meth:`AsyncDelivery.start`."""
        if self._opened is None:
            state = self._router._state  # noqa: SLF001 - the router's own async face
            if self.message is None:
                self._opened = run_sync(self._router.stored_with(state, self.user_id, self._keys))
            else:
                self._opened = run_sync(self._router.open_with(state, self.message))
        return self

    def ack(self) -> None:
        """See :meth:`AsyncDelivery.ack`."""
        if not self._check_ack():
            return
        self._done = self._acked = True
        assert self._opened is not None
        run_sync(_settle(self._opened, ack=True))

    def abandon(self) -> None:
        """See :meth:`AsyncDelivery.abandon`."""
        if self._done or self._opened is None:
            return
        self._done = self._abandoned = True
        run_sync(_settle(self._opened, ack=False))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            if not self._abandoned:
                self.ack()
            return
        try:
            self.abandon()
        except Exception:  # the claim lapses on its own; the block's error matters more
            log.warning(
                "could not let go of user %r after a failed send", self.user_id, exc_info=True
            )


async def _settle(opened: _Opened, *, ack: bool) -> None:
    """Acknowledge (drop the stored replies, let go) or abandon (let go) an opened delivery."""
    claim = opened.claim
    if claim is None:
        return
    opened.claim = None
    if not ack:
        await claim.release()
        return
    claim.update({opened.field: dict.fromkeys(opened.keys)})
    try:
        await claim.commit()
    except ClaimLostError:
        # The lease lapsed (the store was out of reach longer than a lease): another
        # process may be sending these replies again. Nothing else to do.
        log.warning("user %r was taken over before the acknowledgement", opened.user_id)
