"""chatstate's flows and menus behind pywa's WhatsApp webhook.

Keep pywa's client, server and signature check; hand the messages to a
chatstate router::

    from pywa import WhatsApp
    from chatstate.integrations.pywa import ChatstateHandlers

    wa = WhatsApp(phone_id=..., token=..., server=app, verify_token=..., app_secret=...)
    ChatstateHandlers(wa, router)  # text, taps, media, locations, contacts -> router

Each pywa update the handlers take (a :class:`~pywa.types.Message`, a
:class:`~pywa.types.CallbackButton`, a :class:`~pywa.types.CallbackSelection`)
becomes the :class:`~chatstate.flow.Message` that
:func:`~chatstate.flow.parse_webhook` makes of the same notification (the
``wamid`` as ``message_id``, the ``wa_id`` as ``user_id``), and goes through
:meth:`Router.deliver() <chatstate.flow.Router.deliver>`: the step and its
replies are committed together, the replies are sent with pywa's
``send_message`` (reply buttons as :class:`~pywa.types.Button`, lists as a
:class:`~pywa.types.SectionList`), and acknowledged once pywa returned. A
message delivered again (same ``wamid``, in any process) runs nothing and
sends nothing; one whose replies were stored but not sent sends them.

pywa's own server answers Meta's POST with 200 *before* it runs the
handlers, so Meta does not redeliver a notification whose handling died.
Replies committed and not sent (a crash, the Graph API down) are sent by
:meth:`ChatstateHandlers.resend_undelivered`, which :meth:`ChatstateHandlers.resending`
calls every few seconds; a process killed before the commit leaves nothing
written, and nothing to resend: that message goes unanswered (pywa's
acknowledgement, not the router's).

:class:`ChatstateHandlers` is for ``pywa.WhatsApp`` and a
:class:`~chatstate.flow.Router`; :class:`AsyncChatstateHandlers` for
``pywa_async.WhatsApp`` and an :class:`~chatstate.flow.AsyncRouter`.

Needs ``pip install 'chatstate[pywa]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeAlias

from pywa.client import WhatsApp
from pywa.handlers import (
    CallbackButtonHandler,
    CallbackSelectionHandler,
    Handler,
    MessageHandler,
)
from pywa.types.callback import (
    Button,
    CallbackButton,
    CallbackSelection,
    Section,
    SectionList,
    SectionRow,
)
from pywa.types.message import Message as PywaMessage
from pywa.types.sent_update import SentMessage
from pywa_async.client import WhatsApp as AsyncWhatsApp
from pywa_async.types.sent_update import SentMessage as AsyncSentMessage

from chatstate.exceptions import ConfigurationError, UsageError, UserBusyError
from chatstate.flow import (
    AsyncDelivery,
    AsyncRouter,
    Buttons,
    Delivery,
    ListScreen,
    Message,
    Router,
    Screen,
    Text,
    parse_webhook,
)

__all__ = [
    "DEFAULT_BUSY_WAIT",
    "DEFAULT_PRIORITY",
    "AsyncChatstateHandlers",
    "ChatstateHandlers",
    "Update",
    "send_arguments",
    "to_message",
]

log = logging.getLogger("chatstate.integrations.pywa")

DEFAULT_PRIORITY = -100
"""pywa handler priority of the router's handlers: your own pywa handlers (priority 0) go first."""

DEFAULT_BUSY_WAIT = 120.0
"""Seconds a message waits, in all, for the same user's message before it to be handled."""

_RETRY_PAUSE = 0.1  # between two tries of a message whose user is busy

Update: TypeAlias = PywaMessage | CallbackButton[Any] | CallbackSelection[Any]
"""The pywa updates the router takes."""


def to_message(update: Update) -> Message | None:
    """The chatstate message of a pywa update, as :func:`~chatstate.flow.parse_webhook` reads it.

    ``None`` when the update's notification holds no message with its id,
    and for a message in a group chat (the router keeps one person's state
    and answers them directly): nothing for the router.
    """
    for message in parse_webhook(dict(update.raw)):
        if message.message_id == update.id:
            return None if message.raw.get("group_id") else message
    return None


class _Section(Section):
    """A list section that leaves out an empty title, as the Cloud API wants of a lone section."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        section: dict[str, Any] = Section.to_dict(self)
        if not section["title"]:
            del section["title"]
        return section


def send_arguments(screen: Screen | str) -> dict[str, Any]:
    """The keyword arguments of pywa's ``send_message`` (without ``to``) that send ``screen``.

    A str is sent as a :class:`~chatstate.flow.Text`.

    A screen is checked against WhatsApp's limits when it is built (three
    buttons, ten rows across at most ten sections, the title lengths), so
    what this returns is within them.

    Examples:
        >>> from chatstate.flow import Button, Buttons
        >>> args = send_arguments(Buttons("Sure?", [Button("yes", "Yes"), Button("no", "No")]))
        >>> args["text"], [(b.title, b.callback_data) for b in args["buttons"]]
        ('Sure?', [('Yes', 'yes'), ('No', 'no')])
    """
    if isinstance(screen, str):
        screen = Text(screen)
    if isinstance(screen, Text):
        return {"text": screen.body, "preview_url": False}
    if not isinstance(screen, Buttons | ListScreen):
        raise TypeError(
            f"a screen is a str, Text, Buttons or ListScreen, not {type(screen).__name__}"
        )
    args: dict[str, Any] = {"text": screen.body, "header": screen.header, "footer": screen.footer}
    if isinstance(screen, Buttons):
        args["buttons"] = [Button(title=b.title, callback_data=b.id) for b in screen.buttons]
    else:
        sections = [
            _Section(
                title=section.title or "",
                rows=[
                    SectionRow(r.title, callback_data=r.id, description=r.description)
                    for r in section.rows
                ],
            )
            for section in screen.sections
        ]
        args["buttons"] = SectionList(button_title=screen.button, sections=sections)
    return args


def _check_twin(wa: object, router: object, *, asynchronous: bool) -> None:
    """Refuse a client and a router of the wrong twin, naming the right class."""
    if isinstance(wa, AsyncWhatsApp) is asynchronous and isinstance(router, AsyncRouter) is (
        asynchronous
    ):
        if not isinstance(wa, WhatsApp):
            raise UsageError(f"wa must be a pywa WhatsApp client, not {type(wa).__name__}")
        if asynchronous or isinstance(router, Router):
            return
    if asynchronous:
        raise UsageError(
            "AsyncChatstateHandlers runs an AsyncRouter on pywa_async.WhatsApp; for "
            "pywa.WhatsApp and a Router use ChatstateHandlers"
        )
    raise UsageError(
        "ChatstateHandlers runs a Router on pywa.WhatsApp; for pywa_async.WhatsApp "
        "and an AsyncRouter use AsyncChatstateHandlers"
    )


def _check_busy_wait(busy_wait: object) -> float:
    if (
        isinstance(busy_wait, bool)
        or not isinstance(busy_wait, int | float)
        or not 0 <= busy_wait <= 86_400
    ):
        raise ConfigurationError(f"busy_wait must be seconds from 0 to 86400, not {busy_wait!r}")
    return float(busy_wait)


def _check_resending(router: Router[Any] | AsyncRouter[Any], every: object) -> float:
    if isinstance(every, bool) or not isinstance(every, int | float) or not 0 < every <= 3600:
        raise ConfigurationError(f"every must be seconds above 0, at most 3600, not {every!r}")
    if router.resend_after_ms is None:
        raise UsageError("resending() needs a router with resend_after (it was built without)")
    return float(every)


def _busy(message: Message, deadline: float, exc: UserBusyError) -> None:
    """After a try that found the user busy: re-raise once ``deadline`` passed, else log."""
    if time.monotonic() >= deadline:
        log.error(
            "message %r of %r not handled: the user's earlier message was still being "
            "handled after busy_wait",
            message.message_id,
            message.user_id,
        )
        raise exc
    log.info(
        "message %r of %r waits for the user's earlier one", message.message_id, message.user_id
    )


def _handlers(callback: Any, priority: int) -> tuple[Handler[Any], ...]:
    return (
        MessageHandler(callback, priority=priority),
        CallbackButtonHandler(callback, priority=priority),
        CallbackSelectionHandler(callback, priority=priority),
    )


class ChatstateHandlers:
    """pywa handlers that run a :class:`~chatstate.flow.Router` (sync pywa).

    Creating it adds three handlers to ``wa`` (messages, button taps, list
    selections) at ``priority``; :meth:`remove` takes them away. pywa calls
    one handler per update (unless the client has ``continue_handling``): a
    handler of yours with a higher priority whose filters match takes the
    update instead of the router.

    A message whose user is still claimed by an earlier message (its
    replies being sent to a slow Graph API) is tried again until
    ``busy_wait`` has passed: pywa has answered Meta already, so a message
    given up on is not delivered again.

    Args:
        wa: A ``pywa.WhatsApp`` client with a token (replies are sent with it).
        router: The bot.
        priority: The pywa priority of the handlers (see :data:`DEFAULT_PRIORITY`).
        busy_wait: Seconds, in all, that a message waits for the same user's
            earlier message (each try waits up to the router's ``wait``); then
            the :class:`~chatstate.exceptions.UserBusyError` is logged and
            raised to pywa, and the message is not handled.

    Raises:
        UsageError: ``wa`` is a ``pywa_async`` client or ``router`` an
            ``AsyncRouter`` (use :class:`AsyncChatstateHandlers`).
        ConfigurationError: ``busy_wait`` is not 0 to 86,400 seconds.

    Attributes:
        wa: The client.
        router: The bot.
        handlers: The pywa handlers added to ``wa``.
        busy_wait: See the argument.
    """

    def __init__(
        self,
        wa: WhatsApp,
        router: Router[Any],
        *,
        priority: int = DEFAULT_PRIORITY,
        busy_wait: float = DEFAULT_BUSY_WAIT,
    ) -> None:
        _check_twin(wa, router, asynchronous=False)
        self.busy_wait = _check_busy_wait(busy_wait)
        self.wa = wa
        self.router = router
        self.handlers = _handlers(self._on_update, priority)
        wa.add_handlers(*self.handlers)

    def __repr__(self) -> str:
        return f"<ChatstateHandlers wa={self.wa!r} router={self.router!r}>"

    def remove(self) -> None:
        """Take the router's handlers off the client."""
        self.wa.remove_handlers(*self.handlers, silent=True)

    def send(self, to: str, screen: Screen) -> SentMessage:
        """Send one screen to ``to`` through pywa."""
        sent: SentMessage = self.wa.send_message(to, **send_arguments(screen))
        return sent

    def _on_update(self, _wa: WhatsApp, update: Update) -> None:
        message = to_message(update)
        if message is None:
            return
        deadline = time.monotonic() + self.busy_wait
        while True:
            try:
                self.deliver(message)
            except UserBusyError as exc:
                _busy(message, deadline, exc)
                time.sleep(_RETRY_PAUSE)
            else:
                return

    def deliver(self, message: Message) -> Delivery:
        """Handle ``message`` (once) and send its replies; acknowledged once all were sent.

        Returns:
            The delivery, acknowledged.

        Raises:
            Exception: what pywa raised while sending (a ``WhatsAppError``, an
                ``httpx`` error); the replies stay stored for
                :meth:`resend_undelivered`.
        """
        with self.router.deliver(message) as delivery:
            _sends(delivery)
            for screen in delivery.replies:
                self.send(delivery.user_id, screen)
        return delivery

    def resend_undelivered(self, now: float | None = None, *, limit: int = 100) -> int:
        """Send the replies stored longer than the router's ``resend_after`` and never acknowledged.

        A user whose send fails again keeps them for the next call (logged,
        not raised).

        Args:
            now: The time to look from, in Unix seconds (``time.time()`` when ``None``).
            limit: At most this many users in one call.

        Returns:
            How many replies were sent.

        Raises:
            UsageError: the router has no ``resend_after`` or its backend no deadline index.
        """
        sent = 0
        for delivery in self.router.undelivered(now, limit=limit):
            try:
                with delivery:
                    for screen in delivery.replies:
                        self.send(delivery.user_id, screen)
                        sent += 1
            except Exception as exc:  # noqa: BLE001 - one user's failure must not stop the others
                _resend_failed(delivery.user_id, exc)
        return sent

    @contextlib.contextmanager
    def resending(self, every: float = 5.0) -> Iterator[threading.Thread]:
        """Run :meth:`resend_undelivered` every ``every`` seconds in a thread, while in the block.

        Use it in your server's lifespan. The thread stops when the block ends.
        A round that fails (the store out of reach) is logged and the next
        one tries again.

        Raises:
            ConfigurationError: ``every`` is not above 0 and at most 3,600 seconds.
            UsageError: the router has no ``resend_after``.
        """
        every = _check_resending(self.router, every)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.resend_undelivered()
                except Exception:  # the store out of reach: try again next round
                    log.warning("could not look for unsent replies", exc_info=True)

        thread = threading.Thread(target=loop, name="chatstate-pywa-resend", daemon=True)
        thread.start()
        try:
            yield thread
        finally:
            stop.set()
            thread.join(every + 30)


class AsyncChatstateHandlers:
    """The asyncio twin of :class:`ChatstateHandlers`, for ``pywa_async`` and an ``AsyncRouter``.

    Raises:
        UsageError: ``wa`` is not a ``pywa_async`` client or ``router`` not an ``AsyncRouter``.
    """

    def __init__(
        self,
        wa: AsyncWhatsApp,
        router: AsyncRouter[Any],
        *,
        priority: int = DEFAULT_PRIORITY,
        busy_wait: float = DEFAULT_BUSY_WAIT,
    ) -> None:
        _check_twin(wa, router, asynchronous=True)
        self.busy_wait = _check_busy_wait(busy_wait)
        self.wa = wa
        self.router = router
        self.handlers = _handlers(self._on_update, priority)
        wa.add_handlers(*self.handlers)

    def __repr__(self) -> str:
        return f"<AsyncChatstateHandlers wa={self.wa!r} router={self.router!r}>"

    def remove(self) -> None:
        """See :meth:`ChatstateHandlers.remove`."""
        self.wa.remove_handlers(*self.handlers, silent=True)

    async def send(self, to: str, screen: Screen) -> AsyncSentMessage:
        """See :meth:`ChatstateHandlers.send`."""
        sent: AsyncSentMessage = await self.wa.send_message(to, **send_arguments(screen))
        return sent

    async def _on_update(self, _wa: AsyncWhatsApp, update: Update) -> None:
        message = to_message(update)
        if message is None:
            return
        deadline = time.monotonic() + self.busy_wait
        while True:
            try:
                await self.deliver(message)
            except UserBusyError as exc:
                _busy(message, deadline, exc)
                await asyncio.sleep(_RETRY_PAUSE)
            else:
                return

    async def deliver(self, message: Message) -> AsyncDelivery:
        """See :meth:`ChatstateHandlers.deliver`."""
        async with self.router.deliver(message) as delivery:
            _sends(delivery)
            for screen in delivery.replies:
                await self.send(delivery.user_id, screen)
        return delivery

    async def resend_undelivered(self, now: float | None = None, *, limit: int = 100) -> int:
        """See :meth:`ChatstateHandlers.resend_undelivered`."""
        sent = 0
        for delivery in await self.router.undelivered(now, limit=limit):
            try:
                async with delivery:
                    for screen in delivery.replies:
                        await self.send(delivery.user_id, screen)
                        sent += 1
            except Exception as exc:  # noqa: BLE001 - one user's failure must not stop the others
                _resend_failed(delivery.user_id, exc)
        return sent

    @contextlib.asynccontextmanager
    async def resending(self, every: float = 5.0) -> AsyncIterator[asyncio.Task[None]]:
        """Run :meth:`resend_undelivered` every ``every`` seconds in a task, while in the block.

        Raises:
            ConfigurationError: ``every`` is not above 0 and at most 3,600 seconds.
            UsageError: the router has no ``resend_after``.
        """
        every = _check_resending(self.router, every)

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await self.resend_undelivered()
                except Exception:  # the store out of reach: try again next round
                    log.warning("could not look for unsent replies", exc_info=True)

        task = asyncio.create_task(loop(), name="chatstate-pywa-resend")
        try:
            yield task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _sends(delivery: Delivery | AsyncDelivery) -> None:
    if delivery.resent:
        log.info("sending %d stored replies to %r again", len(delivery.replies), delivery.user_id)


def _resend_failed(user_id: str, exc: Exception) -> None:
    # The type only: a Graph API error's text is Meta's, but an httpx error names URLs.
    log.warning(
        "replies to %r still not sent (%s); kept for the next round", user_id, type(exc).__name__
    )
