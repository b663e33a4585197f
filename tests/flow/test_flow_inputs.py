"""What a new user gets wrong, caught with a clear error; and id-less messages handled once."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from chatstate import AsyncStateService, StateService
from chatstate.exceptions import ConfigurationError, InvalidMessageError, UsageError
from chatstate.flow import AsyncRouter, Flow, Menu, MenuItem, Message, Router, Step, render_text


class Two(Flow):
    timeout = timedelta(minutes=1)
    first_answer = Step("A?", next="second_answer")
    second_answer = Step("B?")


def _router(keys: list[str] | None = None) -> Router:
    def buy(ctx: Any) -> str:
        if keys is not None:
            keys.append(ctx.idempotency_key)
        return "bought"

    items = [MenuItem("buy", "Buy", handler=buy), MenuItem("go", "Go", flow=Two)]
    return Router(StateService(), main_menu=Menu("M", items))


def test_a_message_without_an_id_is_never_taken_for_a_redelivery() -> None:
    """Without a message id nothing is deduplicated: a PIN typed twice is answered twice."""
    keys: list[str] = []
    router = _router(keys)
    assert router.handle(Message("u", "buy", timestamp=1_700_000_000.0))
    assert router.handle(Message("u", "buy", timestamp=1_700_000_000.0))  # a legitimate repeat
    assert router.handle(Message("u", "buy"))
    assert router.handle(Message("u", "buy"))
    assert len(keys) == 4
    assert len(set(keys)) == 4, "two purchases must not share an idempotency key"
    message = Message("u", "1234")
    assert message.idempotency_key == message.idempotency_key  # stable for one message
    assert "1234" not in message.idempotency_key


def test_bad_message_fields_are_refused_when_built() -> None:
    for kwargs, match in [
        ({"text": 5}, "text must be a str"),
        ({"text": "x", "timestamp": "x"}, "Unix seconds"),
        ({"text": "x", "timestamp": float("nan")}, "Unix seconds"),
        ({"text": "x", "timestamp": 1_700_000_000_000}, "milliseconds"),
        ({"text": "x", "timestamp": True}, "Unix seconds"),
        ({"text": "x", "message_id": ""}, "message_id"),
        ({"text": "x", "message_id": 7}, "message_id must be a str"),
    ]:
        with pytest.raises(InvalidMessageError, match=match):
            Message("u", **kwargs)
    with pytest.raises(InvalidMessageError, match="user_id"):
        Message(5)  # type: ignore[arg-type]


def test_a_corrupt_stored_time_does_not_break_the_next_message() -> None:
    router = _router()
    service = router.service
    router.handle(Message("u", "go", message_id="m1", timestamp=1_700_000_000.0))
    service.update("u", {"flow": {"at": "x"}})
    replies = router.handle(Message("u", "1", message_id="m2", timestamp=1_700_000_010.0))
    assert [render_text(s) for s in replies] == ["B?"]


def test_run_due_checks_its_arguments_before_looping() -> None:
    router = AsyncRouter(AsyncStateService(), main_menu=Menu("M", [MenuItem("go", "Go", flow=Two)]))

    async def send(user_id: str, replies: list[Any]) -> None:
        pass

    async def main() -> None:
        for kwargs in (
            {"limit": 0},
            {"limit": -1},
            {"limit": "x"},
            {"interval": "x"},
            {"interval": None},
            {"interval": float("inf")},
        ):
            with pytest.raises(UsageError):
                await asyncio.wait_for(router.run_due(send, **kwargs), 5)
        with pytest.raises(UsageError, match="send"):
            await router.run_due("not callable")  # type: ignore[arg-type]

    asyncio.run(main())


def test_run_due_sleeps_after_a_failing_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that fails every round does not make the loop spin (it waits interval)."""
    router = AsyncRouter(AsyncStateService(), main_menu=Menu("M", [MenuItem("go", "Go", flow=Two)]))
    rounds: list[float] = []

    async def failing_due(*args: Any, **kwargs: Any) -> Any:
        rounds.append(0)
        raise RuntimeError("the store is down")

    real_sleep = asyncio.sleep
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) >= 3:
            raise asyncio.CancelledError
        await real_sleep(0)

    monkeypatch.setattr(router.service.manager.backend, "due", failing_due)  # the index read
    monkeypatch.setattr(asyncio, "sleep", sleep)

    async def send(user_id: str, replies: list[Any]) -> None:
        pass

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(router.run_due(send, interval=2.5))
    assert naps == [2.5, 2.5, 2.5]
    assert len(rounds) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": 5}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "?", "key": 5}, "key"),
        ({"prompt": "?", "key": ""}, "key"),
        ({"prompt": "?", "invalid_message": 5}, "invalid_message"),
        ({"prompt": "?", "wrong_kind_message": 5}, "wrong_kind_message"),
        ({"prompt": "?", "max_attempts": True}, "max_attempts"),
        ({"prompt": "?", "max_attempts": 0}, "max_attempts"),
        ({"prompt": "?", "targets": 5}, "targets"),
        ({"prompt": "?", "targets": "ab"}, "targets"),
        ({"prompt": "?", "accepts": 5}, "accepts"),
        ({"prompt": "?", "next": 5}, "next"),
    ],
)
def test_wrong_step_arguments_fail_when_the_step_is_made(
    kwargs: dict[str, Any], match: str
) -> None:
    from chatstate.exceptions import InvalidFlowDefinition

    with pytest.raises(InvalidFlowDefinition, match=match):
        Step(**kwargs)


def test_wrong_flow_attributes_fail_when_the_class_is_made() -> None:
    from chatstate.exceptions import InvalidFlowDefinition

    for attrs_, match in [
        ({"cancel_words": "cancel"}, "set of words"),
        ({"requires_auth": "yes"}, "requires_auth"),
        ({"name": 5}, "name"),
        ({"name": ""}, "name"),
    ]:
        with pytest.raises(InvalidFlowDefinition, match=match):
            type("Bad", (Flow,), {"answer": Step("?"), **attrs_})


def test_command_words_are_matched_whatever_their_case() -> None:
    class Shout(Flow):
        cancel_words = frozenset({"Cancel", " STOP "})
        answer = Step("?")

    assert Shout.cancel_words == {"cancel", "stop"}
    router = Router(StateService(), main_menu=Menu("M", [MenuItem("go", "Go", flow=Shout)]))
    router.handle(Message("u", "go", message_id="1"))
    replies = router.handle(Message("u", "CANCEL", message_id="2"))
    assert render_text(replies[0]) == "Cancelled."


def test_router_and_menu_arguments_are_checked() -> None:
    from chatstate.exceptions import InvalidScreenError

    svc = StateService()
    menu = Menu("M", [MenuItem("go", "Go", flow=Two)])
    with pytest.raises(ConfigurationError, match="greetings"):
        Router(svc, main_menu=menu, greetings=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="flows="):
        Router(svc, main_menu=menu, flows=Two)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="MenuItem"):
        Menu("M", MenuItem("go", "Go", flow=Two))  # type: ignore[arg-type]
    with pytest.raises(InvalidScreenError, match="case"):
        Menu("M", [MenuItem("a", "Same", flow=Two), MenuItem("b", "same", flow=Two)])


def test_conversations_refuse_the_wrong_twin_and_another_user() -> None:
    from chatstate.testing import AsyncConversation, Conversation

    menu = Menu("M", [MenuItem("go", "Go", flow=Two)])
    sync, asyn = (
        Router(StateService(), main_menu=menu),
        AsyncRouter(AsyncStateService(), main_menu=menu),
    )
    with pytest.raises(UsageError, match="AsyncConversation"):
        Conversation(asyn)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="Conversation for a Router"):
        AsyncConversation(sync)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="'ana'"):
        Conversation(sync, "ana").send_message(Message("bob", "hi"))


@pytest.mark.parametrize(
    "kwargs",
    [{"max_connections": 0}, {"max_connections": "x"}, {"pool_timeout": -1}, {"cluster": "yes"}],
)
def test_from_url_checks_the_connection_options(kwargs: dict[str, Any]) -> None:
    from chatstate import AsyncRedisBackend, RedisBackend
    from chatstate.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError):
        RedisBackend.from_url("redis://127.0.0.1:1/0", **kwargs)
    with pytest.raises(ConfigurationError):
        AsyncRedisBackend.from_url("redis://127.0.0.1:1/0", **kwargs)
