"""Flows, the router, screens, the conversation harness and the Mermaid export."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatstate import (
    AsyncMemoryBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate.exceptions import InvalidFlowDefinition, InvalidScreenError, UsageError
from chatstate.flow import (
    DONE,
    AsyncRouter,
    Button,
    Buttons,
    Flow,
    Invalid,
    ListScreen,
    Menu,
    MenuItem,
    Message,
    Router,
    Row,
    Section,
    Step,
    Text,
    parse_webhook,
    render_text,
    render_whatsapp,
)
from chatstate.testing import AsyncConversation, Conversation

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

RULES = StateData(preserved=["jwt_token"])


def _age(answer: str) -> int:
    if not answer.isdigit():
        raise Invalid("Please send a number.")
    return int(answer)


class Signup(Flow):
    """Name, age, then a branch on age, then a confirmation."""

    timeout = timedelta(minutes=5)
    full_name = Step("Your name?", key="name", next="age")
    age = Step(
        "Your age?",
        clean=_age,
        next=lambda d: "guardian" if d["age"] < 18 else "confirm",
        targets=("guardian", "confirm"),
        max_attempts=2,
    )
    guardian = Step("A guardian's name?", next="confirm")
    confirm = Step(
        lambda d: Buttons(f"Sign up {d['name']}?", [Button("yes", "Yes"), Button("no", "No")]),
        next={"yes": DONE, "no": "full_name"},
    )

    def on_complete(self, data: dict[str, Any]) -> str:
        return f"Signed up {data['name']} ({data['age']})."

    def on_cancel(self, data: dict[str, Any]) -> str:
        return "Sign-up cancelled."


MENU = Menu(
    "Main menu",
    [
        MenuItem("signup", "Sign up", flow=Signup),
        MenuItem("help", "Help", handler=lambda turn: "Ask me anything."),
    ],
)


def chat(service: StateService | None = None, user: str = "u1") -> Conversation:
    return Conversation(Router(service or StateService(rules=RULES), main_menu=MENU), user)


# -- definition checks ---------------------------------------------------------------


def test_definition_errors_are_raised_when_the_class_is_made() -> None:
    """Unknown targets, unreachable steps, duplicate keys and missing steps fail at import."""
    with pytest.raises(InvalidFlowDefinition, match="unknown step 'nowhere'"):

        class UnknownTarget(Flow):
            a = Step("?", next="nowhere")

    with pytest.raises(InvalidFlowDefinition, match="unreachable steps: b"):

        class Unreachable(Flow):
            a = Step("?")
            b = Step("?")

    with pytest.raises(InvalidFlowDefinition, match="both store 'x'"):

        class DuplicateKeys(Flow):
            a = Step("?", key="x", next="b")
            b = Step("?", key="x")

    with pytest.raises(InvalidFlowDefinition, match="no steps"):

        class Empty(Flow):
            pass

    with pytest.raises(InvalidFlowDefinition, match="first step 'zzz'"):

        class BadFirst(Flow):
            first = "zzz"
            a = Step("?")

    with pytest.raises(InvalidFlowDefinition, match="declare its targets"):

        class Undeclared(Flow):
            a = Step("?", next=lambda d: DONE)

    with pytest.raises(InvalidFlowDefinition, match="never ends"):

        class Loop(Flow):
            a = Step("?", next="b")
            b = Step("?", next="a")

    class Base(Flow, abstract=True):
        """Abstract flows are not checked."""

    assert Signup.name == "signup"
    assert Signup.first == "full_name"


# -- the router ------------------------------------------------------------------------


def test_a_whole_flow_with_validation_and_branching() -> None:
    """The flow asks, re-prompts on bad input, branches on data and completes."""
    c = chat()
    c.send("hi")
    c.assert_reply_contains("Main menu")
    assert c.send("signup") == ["Your name?"]
    c.send("Ana")
    assert c.send("old") == ["Please send a number.", "Your age?"]
    assert c.send("12") == ["A guardian's name?"]
    c.send("Eva")
    c.assert_reply_contains("Sign up Ana?")
    assert c.send(reply_id="yes") == ["Signed up Ana (12)."]
    assert "flow" not in c.state


def test_back_cancel_restart_and_preserved_fields() -> None:
    """Back forgets the last answer; restart starts over; cancel clears the flow, not the token."""
    c = chat()
    c.router.service.set_preserved(c.user_id, "jwt_token", "tok")
    c.send("signup")
    c.send("Ana")
    assert c.send("back") == ["Your name?"]
    assert c.state["flow"]["data"] == {}
    c.send("Bo")
    c.send("restart")
    assert c.state["flow"]["step"] == "full_name"
    c.send("Cy")
    assert c.send("cancel") == ["Sign-up cancelled."]
    assert c.state == {"jwt_token": "tok"}


def test_clean_raising_value_error_reprompts() -> None:
    """clean=int re-prompts with invalid_message on non-numbers instead of crashing."""

    class Count(Flow):
        n = Step("How many?", clean=int, invalid_message="A whole number, please.")

        def on_complete(self, data: dict[str, Any]) -> str:
            return f"{data['n'] * 2}"

    c = Conversation(
        Router(StateService(), main_menu=Menu("M", [MenuItem("c", "Count", flow=Count)]))
    )
    c.send("c")
    assert c.send("two") == ["A whole number, please.", "How many?"]
    assert c.send("2") == ["4"]


def test_too_many_invalid_answers_cancel() -> None:
    """After max_attempts invalid answers the flow ends with the configured outcome."""
    c = chat()
    c.send("signup")
    c.send("Ana")
    c.send("x")
    assert c.send("y") == ["Please send a number.", "Sign-up cancelled."]
    assert "flow" not in c.state


def test_menu_handler_and_default_menu() -> None:
    """A handler item replies; unknown text shows the default menu."""
    c = chat()
    assert c.send("help") == ["Ask me anything."]
    c.send("what?")
    c.assert_reply_contains("Main menu")


def test_auth_menu_and_requires_auth() -> None:
    """A greeting shows the auth menu until a token is stored; protected items ask to log in."""

    class Secret(Flow):
        requires_auth = True
        a = Step("Secret?")

    main = Menu("Main", [MenuItem("secret", "Secret", flow=Secret)])
    auth = Menu("Please log in", [MenuItem("help", "Help", handler=lambda t: "help")])
    svc = StateService(rules=RULES)
    c = Conversation(Router(svc, main_menu=main, auth_menu=auth))
    c.send("hi")
    c.assert_reply_contains("Please log in")
    c.send("secret")
    c.assert_reply_contains("Please log in first.")
    svc.set_preserved(c.user_id, "jwt_token", "t")
    c.send("hi")
    c.assert_reply_contains("Main")
    assert c.send("secret") == ["Secret?"]


def test_idle_flows_expire() -> None:
    """A flow idle for longer than its timeout is cleared and the user told."""
    svc = StateService(rules=RULES)
    router = Router(svc, main_menu=MENU)
    router.handle(Message("u", text="signup", message_id="1", timestamp=1000.0))
    replies = router.handle(Message("u", text="Ana", message_id="2", timestamp=1000.0 + 301))
    assert "timed out" in render_text(replies[0])
    assert "flow" not in svc.get("u")


def test_flows_resume_after_a_restart() -> None:
    """A new service and router over the same store continue at the right step."""
    store = MemoryBackend()
    first = chat(StateService(store, RULES))
    first.send("signup")
    first.send("Ana")
    again = chat(StateService(store, RULES))
    again.send("30")
    again.assert_reply_contains("Sign up Ana?")
    assert again.state["flow"]["data"] == {"name": "Ana", "age": 30}


def test_redelivered_messages_do_not_advance_twice() -> None:
    """The same message id handled twice changes nothing the second time."""
    c = chat()
    c.send("signup")
    assert c.send("Ana", message_id="wamid.1") == ["Your age?"]
    assert c.send("Ana", message_id="wamid.1") == []
    assert c.state["flow"]["step"] == "age"


def test_concurrent_messages_never_advance_the_same_step_twice() -> None:
    """Two answers at once: one answers 'age', the other is evaluated at the next step."""
    svc = StateService(rules=RULES)
    router = Router(svc, main_menu=MENU)
    router.handle(Message("u", text="signup", message_id="m0"))
    router.handle(Message("u", text="Ana", message_id="m1"))
    barrier = threading.Barrier(2)
    results: list[list[str]] = []

    def send(text: str, mid: str) -> None:
        barrier.wait()
        results.append(
            [render_text(s) for s in router.handle(Message("u", text=text, message_id=mid))]
        )

    threads = [threading.Thread(target=send, args=(t, m)) for t, m in (("40", "a"), ("41", "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flow = svc.get("u")["flow"]
    # One answer took the age step; the other was evaluated against the confirm step.
    assert flow["step"] == "confirm"
    assert flow["data"]["age"] in (40, 41)
    assert flow["history"] == ["full_name", "age"]
    assert sorted(len(r) for r in results) == [1, 2]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "hi",
                "signup",
                "Ana",
                "12",
                "x",
                "back",
                "cancel",
                "restart",
                "yes",
                "no",
                "help",
                "Eva",
            ]
        ),
        max_size=15,
    )
)
def test_the_token_survives_any_conversation(messages: list[str]) -> None:
    """Property: whatever the user sends (cancels included), the preserved token stays."""
    c = chat()
    c.router.service.set_preserved(c.user_id, "jwt_token", "tok-123")
    for text in messages:
        c.send(text)
        assert c.state["jwt_token"] == "tok-123"


# -- async --------------------------------------------------------------------------------


def test_async_router_with_async_validators_and_hooks() -> None:
    """Async validators, prompts and hooks work on the AsyncRouter; the sync one refuses them."""

    async def check(answer: str) -> str | None:
        await asyncio.sleep(0)
        return None if answer.isalpha() else "Letters only."

    async def prompt(data: dict[str, Any]) -> str:
        return "Word?"

    class Word(Flow):
        word = Step(prompt, validate=check)

        async def on_complete(self, data: dict[str, Any]) -> str:
            await asyncio.sleep(0)
            return f"Got {data['word']}."

    menu = Menu("M", [MenuItem("word", "Word", flow=Word)])

    async def main() -> None:
        c = AsyncConversation(AsyncRouter(AsyncStateService(AsyncMemoryBackend()), main_menu=menu))
        assert await c.send("word") == ["Word?"]
        assert await c.send("123") == ["Letters only.", "Word?"]
        assert await c.send("abc") == ["Got abc."]

    asyncio.run(main())
    with pytest.raises(UsageError, match=r"AsyncRouter.*Word\.word\.prompt, Word\.word\.validate"):
        Router(StateService(), main_menu=menu)  # refused when built, not at the first message


# -- screens ------------------------------------------------------------------------------


def test_whatsapp_limits_are_checked_when_screens_are_built() -> None:
    """Too many buttons or rows, long titles and duplicate ids raise InvalidScreenError."""
    with pytest.raises(InvalidScreenError, match="1 to 3"):
        Buttons("b", [Button(str(i), str(i)) for i in range(4)])
    with pytest.raises(InvalidScreenError, match="allows 20"):
        Button("x", "a title that is too long")
    with pytest.raises(InvalidScreenError, match="twice"):
        Buttons("b", [Button("x", "A"), Button("x", "B")])
    rows = [Row(f"r{i}", f"Row {i}") for i in range(6)]
    with pytest.raises(InvalidScreenError, match=r"1[12] rows"):
        ListScreen(
            "b", "Pick", [Section(rows, "A"), Section([Row(f"s{i}", "x") for i in range(6)], "B")]
        )
    with pytest.raises(InvalidScreenError, match="title"):
        ListScreen("b", "Pick", [Section(rows[:2]), Section(rows[2:4])])
    with pytest.raises(InvalidScreenError, match="allows 72"):
        Row("r", "t", "d" * 73)
    with pytest.raises(InvalidScreenError, match="4096"):
        Text("x" * 4097)


def test_renderers() -> None:
    """Screens render to plain text and to Cloud API payloads."""
    buttons = Buttons("Send?", [Button("yes", "Yes"), Button("no", "No")], footer="f")
    payload = render_whatsapp(buttons, "34600")
    assert payload["type"] == "interactive"
    assert payload["interactive"]["type"] == "button"
    assert payload["interactive"]["action"]["buttons"][0] == {
        "type": "reply",
        "reply": {"id": "yes", "title": "Yes"},
    }
    listing = ListScreen("Pick", "Options", [Section([Row("a", "A", "first")], "S")])
    lp = render_whatsapp(listing, "34600")["interactive"]
    assert lp["type"] == "list"
    assert lp["action"] == {
        "button": "Options",
        "sections": [{"title": "S", "rows": [{"id": "a", "title": "A", "description": "first"}]}],
    }
    assert render_whatsapp(Text("hi"), "1")["text"]["body"] == "hi"
    assert render_text(listing) == "Pick\n-- S --\n* A: first"
    big = Menu("M", [MenuItem(f"i{i}", f"Item {i}", handler=lambda t: None) for i in range(5)])
    assert isinstance(big.screen(), ListScreen)


def test_parse_webhook() -> None:
    """Text, button replies and list replies become messages; statuses are skipped."""
    payload = {
        "entry": [
            {
                "changes": [
                    {
                        "value": {
                            "messages": [
                                {
                                    "from": "346",
                                    "id": "wamid.1",
                                    "timestamp": "1700000000",
                                    "type": "text",
                                    "text": {"body": "hi"},
                                },
                                {
                                    "from": "346",
                                    "id": "wamid.2",
                                    "type": "interactive",
                                    "interactive": {
                                        "type": "button_reply",
                                        "button_reply": {"id": "yes", "title": "Yes"},
                                    },
                                },
                                {
                                    "from": "346",
                                    "id": "wamid.3",
                                    "type": "interactive",
                                    "interactive": {
                                        "type": "list_reply",
                                        "list_reply": {"id": "r1", "title": "Row"},
                                    },
                                },
                                {"from": "346", "id": "wamid.4", "type": "image"},
                            ],
                            "statuses": [{"id": "wamid.0", "status": "read"}],
                        }
                    }
                ]
            }
        ]
    }
    messages = parse_webhook(payload)
    assert [(m.kind, m.text, m.reply_id, m.message_id) for m in messages] == [
        ("text", "hi", None, "wamid.1"),
        ("reply", "Yes", "yes", "wamid.2"),
        ("reply", "Row", "r1", "wamid.3"),
        ("unsupported", None, None, "wamid.4"),  # an image without its media object
        ("status", None, None, "status:wamid.0:read"),
    ]
    assert messages[0].timestamp == 1700000000.0


# -- Mermaid -------------------------------------------------------------------------------


def test_mermaid_export_and_cli() -> None:
    """The graph names every step and branch; the CLI prints the same diagram."""
    text = Signup.mermaid()
    assert text.startswith("flowchart TD")
    for edge in (
        "full_name --> age",
        "age --> guardian",
        "confirm -- yes --> done",
        "confirm -- no --> full_name",
    ):
        assert edge in text
    out = subprocess.run(
        [sys.executable, "-m", "chatstate", "mermaid", "credit_bot:Transfer"],
        capture_output=True,
        text=True,
        check=True,
        cwd=EXAMPLES,
    )
    assert "confirm -- yes --> done" in out.stdout


# -- the demo bot, on memory and on Redis ---------------------------------------------------


def _credit_conversation(service: StateService) -> Conversation:
    from credit_bot import build_router, seeded_bank

    c = Conversation(build_router(service, seeded_bank()), "+34600000000")
    c.send("hi")
    c.assert_reply_contains("Register")
    for text in ("register", "Ana", "4321", "login", "4321"):
        c.send(text)
    c.assert_reply_contains("logged in")
    c.send("balance")
    c.assert_reply_contains("100 credits")
    for text in ("transfer", "30", "+34611111111"):
        c.send(text)
    c.assert_reply_contains("Send 30 credits")
    c.send(reply_id="yes")
    c.assert_reply_contains("Your balance: 70")
    assert service.get(c.user_id)["profile"] == {"name": "Ana"}
    return c


def test_credit_bot_on_memory() -> None:
    """The demo bot's whole story through the conversation harness."""
    from credit_bot import RULES as BOT_RULES

    _credit_conversation(StateService(MemoryBackend(), BOT_RULES))


@pytest.mark.redis
def test_credit_bot_on_redis(redis_url: str, namespace: str) -> None:
    """The same flows run unchanged on the Redis backend."""
    from credit_bot import RULES as BOT_RULES

    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), BOT_RULES)
    c = _credit_conversation(svc)
    c.send("transfer")
    assert c.send("5", message_id="dup") == ["Who should receive them? (a phone number)"]
    assert c.send("5", message_id="dup") == []
    svc.close()


def test_demo_script_runs() -> None:
    """examples/demo.py (what `make demo` runs) finishes and shows the transfer."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")], capture_output=True, text=True, check=True
    )
    assert "Sent 30 credits to +34611111111. Your balance: 70." in out.stdout
    assert "eyJ" not in out.stdout


def test_demo_interactive_mode() -> None:
    """--interactive reads the user's lines from standard input."""
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py"), "--interactive"],
        input="hi\nregister\nAna\n\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Welcome to Credit Exchange." in out.stdout
    assert "Choose a 4-digit PIN." in out.stdout
