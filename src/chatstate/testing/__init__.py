"""Test helpers for chatstate users: conversations with a router, and the backend contract.

:class:`Conversation` and :class:`AsyncConversation` talk to a router as one
user and need nothing but chatstate. :class:`BackendContract`, the suite any
backend (ours or yours) proves itself with, needs ``pytest`` and is imported
from here on first use::

    from chatstate.testing import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture(autouse=True)
        def _store(self):
            self.store = make_empty_store()  # one empty store per test
            yield
            self.store.drop()

        def make_backend(self):
            return MyBackend(self.store)

        def make_async_backend(self):
            return MyAsyncBackend(self.store)  # or None if there is no async twin

Within one test every backend the two factories return must share that test's
store: some tests write through a second backend to play a concurrent client.
Every contract test runs twice: through :class:`~chatstate.StateService` over
the sync backend and through :class:`~chatstate.AsyncStateService` over the
async one.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from chatstate.exceptions import UsageError
from chatstate.flow import AsyncRouter, Message, Router, Screen, render_text
from chatstate.state import AsyncStateService, SyncServiceAsAsync
from chatstate.typing import JSONObject

if TYPE_CHECKING:
    from chatstate.testing._contract import EDGE_VALUES, BackendContract

__all__ = [
    "EDGE_VALUES",
    "AsyncConversation",
    "BackendContract",
    "Conversation",
    "ServiceTwin",
    "SyncServiceAsAsync",
]

ServiceTwin = SyncServiceAsAsync | AsyncStateService
"""What a contract test receives: either twin behind one awaitable interface."""


def __getattr__(name: str) -> Any:
    """Import the pytest-based contract suite only when it is asked for."""
    if name in {"BackendContract", "EDGE_VALUES"}:
        from chatstate.testing import _contract  # noqa: PLC0415 - needs pytest, so on demand

        return getattr(_contract, name)
    raise AttributeError(f"module 'chatstate.testing' has no attribute {name!r}")


class _ConversationBase:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.replies: list[Screen] = []
        self._count = 0
        self._prefix = f"test-{uuid.uuid4().hex[:12]}"

    def _message(self, text: str | None, reply_id: str | None, message_id: str | None) -> Message:
        self._count += 1
        return Message(
            self.user_id,
            text=text,
            reply_id=reply_id,
            message_id=message_id if message_id is not None else f"{self._prefix}-{self._count}",
        )

    def _check_user(self, message: Message) -> None:
        if not isinstance(message, Message) or message.user_id != self.user_id:  # type: ignore[redundant-expr]  # callers may be untyped
            raise UsageError(
                f"this conversation is with {self.user_id!r}: send a Message of that user"
            )

    @property
    def texts(self) -> list[str]:
        """The last replies rendered as plain text."""
        return [render_text(s) for s in self.replies]

    @property
    def last_text(self) -> str:
        """All of the last replies as one plain text (empty if there were none)."""
        return "\n".join(self.texts)

    def assert_reply_contains(self, fragment: str) -> None:
        """Fail unless ``fragment`` appears in the last replies."""
        assert fragment in self.last_text, f"{fragment!r} not in the replies:\n{self.last_text}"


class Conversation(_ConversationBase):
    """Talk to a :class:`~chatstate.flow.Router` as one user, in a test.

    Examples:
        >>> from chatstate import StateService
        >>> from chatstate.flow import DONE, Flow, Menu, MenuItem, Router, Step
        >>> class Greet(Flow):
        ...     name_ = Step("Your name?", key="name")
        ...     def on_complete(self, data):
        ...         return f"Hello {data['name']}!"
        >>> menu = Menu("Hi!", [MenuItem("greet", "Greet", flow=Greet)])
        >>> router = Router(StateService(), main_menu=menu)
        >>> chat = Conversation(router)
        >>> chat.send("greet")
        ['Your name?']
        >>> chat.send("Ana")
        ['Hello Ana!']
    """

    def __init__(self, router: Router, user_id: str = "test-user") -> None:
        if not isinstance(router, Router):
            raise UsageError(
                f"Conversation takes a Router, not {type(router).__name__}; "
                "use AsyncConversation for an AsyncRouter"
            )
        super().__init__(user_id)
        self.router = router

    def send(
        self, text: str | None = None, *, reply_id: str | None = None, message_id: str | None = None
    ) -> list[str]:
        """Send a message (text or a tapped reply id); return the replies as plain text.

        Each message gets a fresh message id unless you pass one (pass the same
        one twice to play a webhook redelivery).
        """
        return self.send_message(self._message(text, reply_id, message_id))

    def send_message(self, message: Message) -> list[str]:
        """Send any :class:`~chatstate.flow.Message` (a photo, a location); return the replies."""
        self._check_user(message)
        self.replies = self.router.handle(message)
        return self.texts

    @property
    def state(self) -> JSONObject:
        """The user's stored state document, read now."""
        return self.get_state()

    def get_state(self) -> JSONObject:
        """The user's stored state document, read now (what :attr:`state` returns)."""
        return self.router.service.get(self.user_id)


class AsyncConversation(_ConversationBase):
    """The asyncio twin of :class:`Conversation`, for an :class:`~chatstate.flow.AsyncRouter`."""

    def __init__(self, router: AsyncRouter, user_id: str = "test-user") -> None:
        if not isinstance(router, AsyncRouter):
            raise UsageError(
                f"AsyncConversation takes an AsyncRouter, not {type(router).__name__}; "
                "use Conversation for a Router"
            )
        super().__init__(user_id)
        self.router = router
        self._state: JSONObject = {}

    async def send(
        self, text: str | None = None, *, reply_id: str | None = None, message_id: str | None = None
    ) -> list[str]:
        """See :meth:`Conversation.send`."""
        return await self.send_message(self._message(text, reply_id, message_id))

    async def send_message(self, message: Message) -> list[str]:
        """See :meth:`Conversation.send_message`."""
        self._check_user(message)
        self.replies = await self.router.handle(message)
        self._state = await self.router.service.get(self.user_id)
        return self.texts

    @property
    def state(self) -> JSONObject:
        """The user's stored state document as it was read after the last message.

        A property, as on :class:`Conversation`; ``await get_state()`` reads it
        again now (after a write made outside the conversation).
        """
        return self._state

    async def get_state(self) -> JSONObject:
        """Read the user's stored state document now (and keep it as :attr:`state`)."""
        self._state = await self.router.service.get(self.user_id)
        return self._state
