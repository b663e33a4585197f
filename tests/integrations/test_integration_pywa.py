"""chatstate's router behind pywa's own webhook, fed signed notifications over real HTTP (issue 23).

Every test serves a pywa ``WhatsApp`` (sync) or ``pywa_async.WhatsApp`` client's
Starlette app with uvicorn on loopback, POSTs Cloud API notifications signed
with the app secret, and reads what pywa sent from a fake Graph API (a real
HTTP server, :class:`pywa_support.FakeGraphApi`). ``examples/pywa_bot.py`` is
the credit bot; the crash tests run it as a process and kill it with ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pywa_async
from pywa import WhatsApp
from pywa.handlers import RawUpdateHandler
from pywa_support import (
    PHONE_ID,
    SECRET,
    TOKEN,
    VERIFY,
    FakeGraphApi,
    Handled,
    button_message,
    contacts_message,
    image_message,
    list_message,
    location_message,
    notification,
    post,
    readable,
    sign,
    text_message,
)
from starlette.applications import Starlette
from test_integration_starlette import serve  # uvicorn on loopback, lifespan on

import servers
from chatstate import AsyncStateService, MemoryBackend, SqliteBackend, StateService
from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.flow import (
    AsyncRouter,
    Button,
    Buttons,
    Flow,
    ListScreen,
    Menu,
    MenuItem,
    Router,
    Row,
    Section,
    Step,
    Text,
    parse_webhook,
    render_whatsapp,
)
from chatstate.integrations.pywa import (
    AsyncChatstateHandlers,
    ChatstateHandlers,
    send_arguments,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

from credit_bot import RULES, build_router, seeded_bank  # noqa: E402 - examples/ is no package
from pywa_bot import build_app  # noqa: E402

ANA = "34600000001"


@pytest.fixture
def graph() -> Iterator[FakeGraphApi]:
    with FakeGraphApi() as api:
        yield api


def _environ(graph: FakeGraphApi, **extra: str) -> dict[str, str]:
    return {
        "WHATSAPP_PHONE_ID": PHONE_ID,
        "WHATSAPP_TOKEN": TOKEN,
        "WHATSAPP_VERIFY_TOKEN": VERIFY,
        "WHATSAPP_APP_SECRET": SECRET,
        "GRAPH_API_URL": graph.url,
        **extra,
    }


class Bot:
    """A served pywa app: its webhook URL, its handlers, and a count of handled notifications."""

    def __init__(self, url: str, handlers: Any, handled: Handled) -> None:
        self.url, self.handlers, self.handled = url, handlers, handled
        self.posted = 0

    def post(self, body: bytes, signature: str | None = None, *, wait: bool = True) -> int:
        """POST a notification; wait until pywa finished handling it (when accepted)."""
        status = post(self.url, body, signature)
        if status == 200 and wait:
            self.posted += 1
            self.handled.wait_for(self.posted)
        return status


@pytest.fixture
def credit_bot(graph: FakeGraphApi) -> Iterator[Bot]:
    """examples/pywa_bot.py's app (in memory), served, its sends going to ``graph``."""
    app, handlers = build_app(_environ(graph))
    handled = Handled()
    handlers.wa.add_handlers(RawUpdateHandler(handled))
    with serve(app) as base:
        yield Bot(f"{base}/webhook", handlers, handled)


def _say(bot: Bot, wamid: str, message: dict[str, Any], sender: str = ANA) -> int:
    return bot.post(notification(wamid, sender, message))


CONVERSATION: list[dict[str, Any]] = [
    text_message("hi"),
    button_message("register", "Register"),
    text_message("Ana"),
    text_message("1234"),
    button_message("login", "Log in"),
    text_message("1234"),
    button_message("transfer", "Transfer"),
    text_message("25"),
    text_message("+34611111111"),
    button_message("yes", "Send"),
    button_message("balance", "Balance"),
]


def _conversation(
    bot: Bot, graph: FakeGraphApi, reference: Router[Any], messages: list[Any]
) -> list[Any]:
    """Post ``messages`` through pywa; check pywa sent what ``reference`` renders for them."""
    for i, message in enumerate(messages):
        assert _say(bot, f"wamid.{i}", message) == 200
    expected = []
    for i, body in enumerate(messages):
        (message,) = parse_webhook(json.loads(notification(f"ref.{i}", ANA, body)))
        expected += [render_whatsapp(s, ANA) for s in reference.handle(message)]
    sent = graph.wait_for(len(expected), ANA)
    time.sleep(0.1)  # a send too many would land by now
    sent = graph.sent(ANA)
    assert len(sent) == len(expected), [readable(s) for s in sent]
    assert all(_same(s, e) for s, e in zip(sent, expected, strict=True)), [
        readable(s) for s in sent
    ]
    return sent


def _same(sent: dict[str, Any], rendered: dict[str, Any]) -> bool:
    """Pywa's payload says what render_whatsapp's says (to, type, text or interactive)."""
    if (sent["to"], sent["type"]) != (rendered["to"], rendered["type"]):
        return False
    if sent["type"] == "text":
        return bool(sent["text"]["body"] == rendered["text"]["body"])
    return bool(sent["interactive"] == rendered["interactive"])


def test_the_credit_bot_conversation_through_pywas_webhook(
    credit_bot: Bot, graph: FakeGraphApi
) -> None:
    """Register, log in, transfer with a confirmation, balance: pywa sends what the router renders."""
    reference = build_router(StateService(MemoryBackend(), RULES), seeded_bank())
    sent = _conversation(credit_bot, graph, reference, CONVERSATION)
    assert [readable(s) for s in sent][-3:] == [
        "Send 25 credits to +34611111111? [Send, Change amount]",
        "Sent 25 credits to +34611111111. Your balance: 75.",
        "Your balance: 75 credits.",
    ]
    assert {r["path"].split("/", 2)[2] for r in graph.requests} == {f"{PHONE_ID}/messages"}
    assert {r["auth"] for r in graph.requests} == {f"Bearer {TOKEN}"}
    assert credit_bot.handlers.router.service.get(ANA)["profile"] == {"name": "Ana"}


def test_a_redelivered_wamid_is_answered_once(credit_bot: Bot, graph: FakeGraphApi) -> None:
    """The same wamid again, in a body pywa has not seen (so its own cache lets it through): no reply."""
    first = notification("wamid.1", ANA, text_message("hi"), at=1_700_000_000)
    assert credit_bot.post(first) == 200
    assert credit_bot.post(first, wait=False) == 200
    again = notification("wamid.1", ANA, text_message("hi"), at=1_700_000_005)
    assert again != first
    assert credit_bot.post(again) == 200
    assert _say(credit_bot, "wamid.2", button_message("register", "Register")) == 200
    sent = graph.wait_for(2, ANA)
    time.sleep(0.2)  # a late duplicate send would land by now
    assert [readable(s) for s in graph.sent(ANA)] == [
        "Welcome to Credit Exchange. [Register, Log in]",
        "What is your name?",
    ]
    assert sent == graph.sent(ANA)


def test_a_group_message_is_left_alone(credit_bot: Bot, graph: FakeGraphApi) -> None:
    """A message in a group chat reaches pywa but not the router: no state, no reply."""
    assert _say(credit_bot, "wamid.g", {**text_message("hi"), "group_id": "G.1"}) == 200
    assert credit_bot.handlers.router.service.get(ANA) == {}
    assert _say(credit_bot, "wamid.1", text_message("hi")) == 200
    assert [readable(s) for s in graph.wait_for(1, ANA)] == [MENU_SENT]


@pytest.mark.parametrize(
    ("signature", "status"),
    [
        ("", 401),
        ("sha256=", 403),
        (sign(b"another body"), 403),
        (sign(b"x", secret="wrong"), 403),
        ("sha1=abc", 403),
    ],
    ids=["unsigned", "no-digest", "other-body", "wrong-secret", "sha1"],
)
def test_a_wrongly_signed_notification_is_refused_by_pywa(
    credit_bot: Bot, graph: FakeGraphApi, signature: str, status: int
) -> None:
    """Pywa's signature check refuses it: nothing handled, stored or sent; signed, it runs."""
    body = notification("wamid.9", ANA, button_message("register", "Register"))
    assert credit_bot.post(body, signature, wait=False) == status
    assert credit_bot.handled.count == 0
    assert credit_bot.handlers.router.service.get(ANA) == {}
    assert credit_bot.post(body) == 200
    assert [readable(s) for s in graph.wait_for(1, ANA)] == ["What is your name?"]


class Report(Flow):
    """Media, a location and a contact card, one step each."""

    photo = Step("Send a photo of the damage.", accepts=["image"], next="place")
    place = Step("Where is it? Share the location.", accepts=["location"], next="witness")
    witness = Step("Share a witness's contact.", accepts=["contacts"])

    def on_complete(self, data: dict[str, Any]) -> str:
        photo, place, (witness,) = data["photo"], data["place"], data["witness"]
        return (
            f"Filed: photo {photo['id']} ({photo.get('caption')}), at {place['name']} "
            f"({place['latitude']}, {place['longitude']}), witness {witness['name']} "
            f"{witness['phones'][0]}."
        )


def _sizes(_data: dict[str, Any]) -> ListScreen:
    """Ten rows in two sections: a list at WhatsApp's limits."""
    small = [Row(f"s{i}", f"Size {i}", f"about {10 * i} cm") for i in range(1, 6)]
    large = [Row(f"l{i}", f"Size {i}") for i in range(6, 11)]
    return ListScreen(
        "Pick a size.",
        "Sizes",
        [Section(small, "Small"), Section(large, "Large")],
        footer="10 sizes",
    )


class Order(Flow):
    """A list step, then buttons with a header."""

    size = Step(_sizes, next="confirm")
    confirm = Step(
        lambda data: Buttons(
            f"Order size {data['size']}?",
            [Button("yes", "Order"), Button("no", "Cancel")],
            header="Your order",
        )
    )

    def on_complete(self, data: dict[str, Any]) -> str:
        return f"Ordered size {data['size']}." if data["confirm"] == "yes" else "Not ordered."


MENU = Menu(
    "What do you need?",
    [
        MenuItem("report", "Report damage", flow=Report),
        MenuItem("order", "Order", flow=Order),
        MenuItem("hours", "Opening hours", handler=lambda _ctx: "9 to 5."),
        MenuItem("help", "Help", handler=lambda _ctx: "Ask us anything."),
    ],
)

SHOWCASE: list[dict[str, Any]] = [
    text_message("hi"),
    list_message("order", "Order"),
    list_message("l7", "Size 7"),
    button_message("yes", "Order"),
    list_message("report", "Report damage"),
    image_message("media.77", "the door"),
    location_message(40.4168, -3.7038, "Sol"),
    contacts_message("Bo", "34622222222"),
]


@contextlib.contextmanager
def _served(kind: str, graph: FakeGraphApi, **router_options: Any) -> Iterator[Bot]:
    """MENU's bot on pywa (``kind`` "sync") or pywa_async ("async"), served, resending every 0.2 s."""
    handlers: Any = None

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if kind == "sync":
            with handlers.resending(every=0.2):
                yield
        else:
            async with handlers.resending(every=0.2):
                yield

    app = Starlette(lifespan=lifespan)
    options: dict[str, Any] = {
        "phone_id": PHONE_ID,
        "token": TOKEN,
        "server": app,
        "webhook_endpoint": "/webhook",
        "verify_token": VERIFY,
        "app_secret": SECRET,
    }
    # Our own session, pointed at the fake Graph API once pywa set its base URL (as the example).
    session: Any = httpx.Client() if kind == "sync" else httpx.AsyncClient()
    options["session"] = session
    if kind == "sync":
        wa = WhatsApp(**options)
        router = Router(StateService(), main_menu=MENU, **router_options)
        handlers = ChatstateHandlers(wa, router)
    else:
        wa = pywa_async.WhatsApp(**options)
        async_router = AsyncRouter(AsyncStateService(), main_menu=MENU, **router_options)
        handlers = AsyncChatstateHandlers(wa, async_router)
    session.base_url = graph.url + session.base_url.path
    handled = Handled()
    wa.add_handlers(RawUpdateHandler(handled))
    with serve(app) as base:
        yield Bot(f"{base}/webhook", handlers, handled)


@pytest.fixture(params=["sync", "async"])
def showcase(request: pytest.FixtureRequest, graph: FakeGraphApi) -> Iterator[Bot]:
    """A bot of lists, buttons, media, a location and contacts, on pywa or pywa_async."""
    with _served(request.param, graph) as bot:
        yield bot


def test_lists_buttons_media_location_and_contacts_through_pywa(
    showcase: Bot, graph: FakeGraphApi
) -> None:
    """Each kind of message reaches the flow; lists and buttons go out as the router renders them."""
    sent = _conversation(showcase, graph, Router(StateService(), main_menu=MENU), SHOWCASE)
    menu, sizes, confirm = sent[0]["interactive"], sent[1]["interactive"], sent[2]["interactive"]
    assert menu["type"] == "list"
    assert "title" not in menu["action"]["sections"][0]  # a lone section goes untitled
    assert [s["title"] for s in sizes["action"]["sections"]] == ["Small", "Large"]
    assert sum(len(s["rows"]) for s in sizes["action"]["sections"]) == 10
    assert sizes["action"]["sections"][0]["rows"][0] == {
        "id": "s1",
        "title": "Size 1",
        "description": "about 10 cm",
    }
    assert (sizes["action"]["button"], sizes["footer"]) == ("Sizes", {"text": "10 sizes"})
    assert confirm["header"] == {"type": "text", "text": "Your order"}
    assert [readable(s) for s in sent][3:] == [
        "Ordered size l7.",
        "Send a photo of the damage.",
        "Where is it? Share the location.",
        "Share a witness's contact.",
        "Filed: photo media.77 (the door), at Sol (40.4168, -3.7038), witness Bo 34622222222.",
    ]


def test_the_graph_api_down_keeps_the_replies_and_the_resend_sends_them(
    credit_bot: Bot, graph: FakeGraphApi, caplog: pytest.LogCaptureFixture
) -> None:
    """A send that fails leaves the reply stored; resend_undelivered sends it once; no secret logged."""
    caplog.set_level(logging.DEBUG)
    graph.fail = 1
    assert _say(credit_bot, "wamid.1", text_message("hi")) == 200
    assert graph.sent() == []
    handlers = credit_bot.handlers
    assert handlers.resend_undelivered() == 0  # not yet: resend_after is 30 s
    assert handlers.resend_undelivered(now=time.time() + 60) == 1
    assert handlers.resend_undelivered(now=time.time() + 120) == 0
    assert [readable(s) for s in graph.sent(ANA)] == [
        "Welcome to Credit Exchange. [Register, Log in]"
    ]
    text = caplog.text + repr(handlers) + str(handlers) + repr(handlers.wa)
    assert "Error occurred while" in caplog.text  # pywa logged the failed send
    assert TOKEN not in text
    assert SECRET not in text


def test_the_wrong_twin_is_refused(graph: FakeGraphApi) -> None:
    """Pywa with an AsyncRouter, pywa_async with a Router: UsageError naming the other class."""
    sync_wa = WhatsApp(phone_id=PHONE_ID, token=TOKEN)
    async_wa = pywa_async.WhatsApp(phone_id=PHONE_ID, token=TOKEN)
    router = Router(StateService(), main_menu=MENU)
    async_router = AsyncRouter(AsyncStateService(), main_menu=MENU)
    with pytest.raises(UsageError, match="AsyncChatstateHandlers"):
        ChatstateHandlers(async_wa, router)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="AsyncChatstateHandlers"):
        ChatstateHandlers(sync_wa, async_router)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="use ChatstateHandlers"):
        AsyncChatstateHandlers(sync_wa, async_router)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="use ChatstateHandlers"):
        AsyncChatstateHandlers(async_wa, router)  # type: ignore[arg-type]
    assert sync_wa._handlers == {} or all(not v for v in sync_wa._handlers.values())


def test_send_arguments_keep_every_field_of_the_screen() -> None:
    """Text without a preview, buttons with their ids, a list with titles, rows and descriptions."""
    assert send_arguments(Text("hi")) == {"text": "hi", "preview_url": False}
    buttons = send_arguments(Buttons("Sure?", [Button("y", "Yes")], header="H", footer="F"))
    assert (buttons["header"], buttons["footer"]) == ("H", "F")
    assert [b.to_dict() for b in buttons["buttons"]] == [
        {"type": "reply", "reply": {"id": "y", "title": "Yes"}}
    ]
    listed = send_arguments(_sizes({}))["buttons"].to_dict()
    rendered = render_whatsapp(_sizes({}), ANA)["interactive"]["action"]
    assert {**listed, "sections": list(listed["sections"])} == {
        **rendered,
        "sections": [{**s, "rows": tuple(s["rows"])} for s in rendered["sections"]],
    }


MENU_SENT = "Welcome to Credit Exchange. [Register, Log in]"


@contextlib.contextmanager
def _bot_process(
    environ: dict[str, str], log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """examples/pywa_bot.py as its own process; yields it and its webhook URL once it answers."""
    port = servers.free_port()
    env = {**os.environ, **environ, "PORT": str(port)}
    with log.open("ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "pywa_bot.py")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    url = f"http://127.0.0.1:{port}/webhook"
    challenge = f"{url}?hub.mode=subscribe&hub.verify_token={VERIFY}&hub.challenge=up"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(challenge, timeout=5) as response:
                    assert response.read() == b"up"
                    break
            except OSError:
                assert time.monotonic() < deadline, "the bot did not start"
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


def _stored(path: Path) -> dict[str, Any]:
    service = StateService(SqliteBackend(path), RULES)
    try:
        return service.get(ANA)
    finally:
        service.close()


def _killed_while_sending(graph: FakeGraphApi, environ: dict[str, str], log: Path) -> bytes:
    """A process shows the menu, then commits the "register" tap and is killed while sending.

    Returns the tap's notification. The Graph API never accepted that reply.
    """
    tap = notification("wamid.2", ANA, button_message("register", "Register"))
    with _bot_process(environ, log) as (proc, url):
        assert post(url, notification("wamid.1", ANA, text_message("hi"))) == 200
        graph.wait_for(1, ANA)
        graph.hold = True
        assert post(url, tap) == 200  # pywa answers Meta before it handles
        assert graph.held.wait(30)  # committed; the reply is on its way
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    graph.release.set()
    assert [readable(s) for s in graph.sent(ANA)] == [MENU_SENT]
    return tap


def test_a_bot_killed_between_commit_and_send_answers_the_redelivery(
    graph: FakeGraphApi, tmp_path: Path
) -> None:
    """Killed (-9) with the reply in flight: kept; a new process sends it on the redelivery, once."""
    db = tmp_path / "state.db"
    environ = _environ(graph, CHATSTATE_SQLITE=str(db))
    tap = _killed_while_sending(graph, environ, tmp_path / "bot.log")
    stored = _stored(db)
    assert stored["flow"]["name"] == "register"
    assert [list(e) for e in stored["outbox"].values()] != []  # the reply, kept
    with _bot_process(environ, tmp_path / "bot.log") as (_proc, url):
        assert post(url, tap) == 200  # Meta delivers it again
        graph.wait_for(2, ANA)
        assert post(url, notification("wamid.3", ANA, text_message("Ana"))) == 200
        sent = graph.wait_for(3, ANA)
    assert [readable(s) for s in sent] == [
        MENU_SENT,
        "What is your name?",
        "Choose a 4-digit PIN.",  # "Ana" answered the name: the tap did not run twice
    ]
    assert _stored(db)["outbox"] == {}


def test_a_killed_bots_stored_replies_are_sent_without_a_redelivery(
    graph: FakeGraphApi, tmp_path: Path
) -> None:
    """Killed with the reply in flight, never redelivered: the next process's resend sends it."""
    db = tmp_path / "state.db"
    environ = _environ(graph, CHATSTATE_SQLITE=str(db), CHATSTATE_RESEND_AFTER="1")
    _killed_while_sending(graph, environ, tmp_path / "bot.log")
    started = time.monotonic()
    with _bot_process(environ, tmp_path / "bot.log") as (_proc, url):
        graph.wait_for(2, ANA)  # nothing posted: the resend found it
        took = time.monotonic() - started
        assert post(url, notification("wamid.3", ANA, text_message("Ana"))) == 200
        sent = graph.wait_for(3, ANA)
    assert [readable(s) for s in sent] == [MENU_SENT, "What is your name?", "Choose a 4-digit PIN."]
    assert _stored(db)["outbox"] == {}
    assert took < 20  # the dead process's claim lapses within its 5 s lease


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_resending_in_the_lifespan_sends_what_a_failed_send_left(
    graph: FakeGraphApi, kind: str
) -> None:
    """The Graph API fails once: resending() sends the stored reply after resend_after, once."""
    with _served(kind, graph, resend_after=0.5) as bot:
        graph.fail = 1
        started = time.monotonic()
        assert _say(bot, "wamid.1", text_message("hi")) == 200
        assert graph.sent() == []
        sent = graph.wait_for(1, ANA, timeout=10)
        took = time.monotonic() - started
        time.sleep(1)  # another round or two: nothing more
        assert graph.sent(ANA) == sent
        assert _say(bot, "wamid.2", list_message("hours", "Opening hours")) == 200
        assert [readable(s) for s in graph.wait_for(2, ANA)] == [
            "What do you need? [Report damage, Order, Opening hours, Help]",
            "9 to 5.",
        ]
    assert took < 5  # resend_after 0.5 s, rounds of 0.2 s


class _Gate:
    """A Graph API whose first send waits until released; every send recorded."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.first_started = threading.Event()
        self.release = threading.Event()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.sent:
            self.first_started.set()
            assert self.release.wait(60), "the test never released the first send"
        self.sent.append(json.loads(request.content))
        return httpx.Response(
            200, json={"contacts": [{"input": "1", "wa_id": "1"}], "messages": [{"id": "w"}]}
        )


def test_a_message_waits_for_the_users_slow_earlier_one_instead_of_being_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first reply's send is held past the router's wait: the second message is retried.

    pywa has answered Meta already, so a message given up on would be lost for good.
    """
    gate = _Gate()
    wa = WhatsApp(
        phone_id=PHONE_ID, token=TOKEN, session=httpx.Client(transport=httpx.MockTransport(gate))
    )
    handlers = ChatstateHandlers(wa, Router(StateService(), main_menu=MENU, wait=0.2))
    retried = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waits for the user's earlier one" in record.getMessage():
                retried.set()

    seen = Seen()
    logging.getLogger("chatstate.integrations.pywa").addHandler(seen)
    caplog.set_level(logging.INFO, "chatstate.integrations.pywa")
    try:
        first = threading.Thread(
            target=wa.webhook_update_handler,
            args=(notification("wamid.a", ANA, text_message("hi")),),
        )
        first.start()
        assert gate.first_started.wait(30)
        second = threading.Thread(
            target=wa.webhook_update_handler,
            args=(notification("wamid.b", ANA, text_message("hello")),),
        )
        second.start()
        assert retried.wait(30), "the second message was not retried"
        gate.release.set()
        first.join(30)
        second.join(30)
    finally:
        logging.getLogger("chatstate.integrations.pywa").removeHandler(seen)
        gate.release.set()
    assert len(gate.sent) == 2  # both messages answered, the first before the second
    assert handlers.router.service.get(ANA) != {}


def test_busy_wait_gives_up_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """busy_wait=0: one try; the message is logged as not handled and UserBusyError raised."""
    gate = _Gate()
    wa = WhatsApp(
        phone_id=PHONE_ID, token=TOKEN, session=httpx.Client(transport=httpx.MockTransport(gate))
    )
    ChatstateHandlers(wa, Router(StateService(), main_menu=MENU, wait=0.1), busy_wait=0)
    first = threading.Thread(
        target=wa.webhook_update_handler, args=(notification("wamid.a", ANA, text_message("hi")),)
    )
    first.start()
    try:
        assert gate.first_started.wait(30)
        caplog.set_level(logging.INFO, "chatstate.integrations.pywa")
        wa.webhook_update_handler(notification("wamid.b", ANA, text_message("hello")))
    finally:
        gate.release.set()
        first.join(30)
    assert "not handled: the user's earlier message was still being handled" in caplog.text
    assert len(gate.sent) == 1  # the second message was given up on


def test_bad_busy_wait_and_resending_options_are_refused() -> None:
    """busy_wait out of range, resending(every<=0), resending without resend_after: refused."""
    wa = WhatsApp(phone_id=PHONE_ID, token=TOKEN)
    router = Router(StateService(), main_menu=MENU)
    for bad in (-1, True, "5", 10**6):
        with pytest.raises(ConfigurationError, match="busy_wait"):
            ChatstateHandlers(wa, router, busy_wait=bad)  # type: ignore[arg-type]
    handlers = ChatstateHandlers(wa, router)
    for every in (0, -1, True):
        with pytest.raises(ConfigurationError, match="every"), handlers.resending(every=every):
            pass
    bare = ChatstateHandlers(wa, Router(StateService(), main_menu=MENU, resend_after=None))
    with pytest.raises(UsageError, match="resend_after"), bare.resending():
        pass

    async def main() -> None:
        async_wa = pywa_async.WhatsApp(phone_id=PHONE_ID, token=TOKEN)
        plain = AsyncRouter(AsyncStateService(), main_menu=MENU, resend_after=None)
        ours = AsyncChatstateHandlers(async_wa, plain)
        with pytest.raises(UsageError, match="resend_after"):
            async with ours.resending():
                pass
        with pytest.raises(ConfigurationError, match="every"):
            async with ours.resending(every=0):
                pass

    asyncio.run(main())


def test_send_arguments_take_a_str_and_refuse_what_is_no_screen() -> None:
    """A str is a Text; anything else that is no screen is a TypeError naming its type."""
    assert send_arguments("hi") == send_arguments(Text("hi"))
    with pytest.raises(TypeError, match="not int"):
        send_arguments(5)  # type: ignore[arg-type]
