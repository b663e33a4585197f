"""Flows for real bots: the context, effects committed with the step, languages, menus, media."""

from __future__ import annotations

import asyncio
import gettext
import threading
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest

from chatstate import AsyncStateService, StateData, StateService
from chatstate.exceptions import (
    ConfigurationError,
    InvalidFlowDefinition,
    InvalidMessageError,
    InvalidScreenError,
    UsageError,
)
from chatstate.flow import (
    DONE,
    AsyncRouter,
    Context,
    Flow,
    Invalid,
    Location,
    Media,
    Menu,
    MenuItem,
    Message,
    Router,
    Step,
    render_text,
)
from chatstate.observe import Observer, add_observer, remove_observer
from chatstate.testing import AsyncConversation, Conversation

RULES = StateData(preserved=["jwt_token", "language"])


def _token(sub: str = "u") -> str:
    return jwt.encode({"sub": sub, "exp": 4_000_000_000}, "k" * 32, algorithm="HS256")


@dataclass
class Payments:
    """A fake payments API that dedupes by idempotency key, and can fail after charging."""

    charged: dict[str, int] = field(default_factory=dict)
    fail_after_charge: int = 0
    calls: int = 0

    def pay(self, amount: int, key: str) -> str:
        self.calls += 1
        self.charged.setdefault(key, amount)
        if self.fail_after_charge:
            self.fail_after_charge -= 1
            raise TimeoutError("the payments API timed out (after charging)")
        return f"receipt-{key}"


@dataclass
class Deps:
    payments: Payments = field(default_factory=Payments)
    balance: int = 50
    pins: dict[str, str] = field(default_factory=lambda: {"ana": "1234"})
    seen: list[str] = field(default_factory=list)


def _amount(answer: str, ctx: Context[Deps]) -> int:
    if not answer.isdigit():
        raise Invalid("A number, please.")
    if int(answer) > ctx.deps.balance:
        raise Invalid(f"You have only {ctx.deps.balance}.")
    return int(answer)


def _pin_ok(answer: str, ctx: Context[Deps]) -> str | None:
    ctx.deps.seen.append(f"pin:{ctx.user_id}:{ctx.step}:{ctx.data.get('amount')}")
    return None if ctx.deps.pins.get(ctx.user_id) == answer else "Wrong PIN."


def _confirm(data: dict[str, Any], ctx: Context[Deps]) -> str:
    return ctx.t("Pay {amount}?", amount=data["amount"])


def _route(data: dict[str, Any], ctx: Context[Deps]) -> str:
    return "pin" if data["amount"] > 10 else "confirm"


class Pay(Flow):
    amount = Step("How much?", clean=_amount, next=_route, targets=["pin", "confirm"])
    pin = Step("Your PIN?", validate=_pin_ok, next="confirm")
    confirm = Step(_confirm, next={"yes": DONE, "no": "amount"})

    def on_complete(self, data: dict[str, Any], ctx: Context[Deps]) -> str:
        receipt = ctx.deps.payments.pay(data["amount"], ctx.idempotency_key)
        ctx.update({"last_receipt": receipt})
        return f"Paid {data['amount']}."


class Login(Flow):
    pin = Step("PIN?")

    def on_complete(self, data: dict[str, Any], ctx: Context[Deps]) -> str:
        if ctx.deps.pins.get(ctx.user_id) != data["pin"]:
            return "Wrong PIN."
        ctx.log_in(_token(ctx.user_id))
        return "Logged in."


class Register(Flow):
    name_ = Step("Your name?", key="name")

    def on_complete(self, data: dict[str, Any], ctx: Context[Deps]) -> None:
        ctx.update({"profile_name": data["name"]})
        ctx.start(Login)


def _whoami(ctx: Context[Deps]) -> str:
    return f"{ctx.user_id} in {ctx.language}, logged in: {ctx.authenticated}"


def _logout(ctx: Context[Deps]) -> str:
    ctx.log_out()
    return "Bye."


MAIN = Menu(
    "Main",
    [
        MenuItem("pay", "Pay", flow=Pay, requires_auth=True),
        MenuItem("whoami", "Who am I", handler=_whoami),
        MenuItem("logout", "Log out", handler=_logout, requires_auth=True),
    ],
)
GUEST = Menu(
    "Welcome",
    [
        MenuItem("register", "Register", flow=Register, guest_only=True),
        MenuItem("login", "Log in", flow=Login, guest_only=True),
        MenuItem("whoami", "Who am I", handler=_whoami),
    ],
)


def _router(service: StateService | None = None, **options: Any) -> Router[Deps]:
    options.setdefault("deps", Deps())
    return Router(service or StateService(rules=RULES), main_menu=MAIN, auth_menu=GUEST, **options)


def _send(router: Router[Any], message: Message) -> list[str]:
    return [render_text(s) for s in router.handle(message)]


def _logged_in(router: Router[Deps], user: str = "ana") -> Conversation:
    chat = Conversation(router, user)
    chat.send("login")
    assert chat.send("1234") == ["Logged in."]
    return chat


# -- the context in every callable ---------------------------------------------------------


def test_every_callable_gets_the_context_and_the_bots_dependencies() -> None:
    """Cleaners, validators, branches, prompts, hooks and handlers see user, data, deps."""
    router = _router()
    chat = _logged_in(router)
    assert chat.send("pay") == ["How much?"]
    assert chat.send("90") == ["You have only 50.", "How much?"]  # the cleaner saw deps
    assert chat.send("20") == ["Your PIN?"]  # the branch saw the data
    assert chat.send("0000") == ["Wrong PIN.", "Your PIN?"]
    assert chat.send("1234") == ["Pay 20?"]  # the prompt saw the data and translated
    assert router.deps.seen == ["pin:ana:pin:20", "pin:ana:pin:20"]
    assert chat.send("yes") == ["Paid 20."]
    assert chat.state["last_receipt"].startswith("receipt-")
    assert chat.send("whoami") == ["ana in en, logged in: True"]


def test_simple_signatures_still_work() -> None:
    """Builtins and one-argument callables are called with the answer or data alone."""

    class Simple(Flow):
        n = Step(lambda data: "N?", clean=int, validate=lambda a: None, next="w")
        w = Step("W?", clean=str.upper, next=lambda data: DONE, targets=[DONE])

        def on_complete(self, data: dict[str, Any]) -> str:
            return f"{data['n'] + 1} {data['w']}"

    router = Router(StateService(), main_menu=Menu("M", [MenuItem("s", "S", flow=Simple)]))
    chat = Conversation(router)
    chat.send("s")
    assert chat.send("x") == ["Sorry, that is not a valid answer.", "N?"]
    chat.send("41")
    assert chat.send("abc") == ["42 ABC"]


def test_the_async_router_awaits_async_callables_with_the_context() -> None:
    """Async validators and hooks with the context work on the AsyncRouter."""

    async def check(answer: str, ctx: Context[dict[str, int]]) -> str | None:
        await asyncio.sleep(0)
        return None if len(answer) <= ctx.deps["max"] else "Too long."

    class Word(Flow):
        word = Step("Word?", validate=check)

        async def on_complete(self, data: dict[str, Any], ctx: Context[dict[str, int]]) -> str:
            await asyncio.sleep(0)
            ctx.update({"word": data["word"]})
            return f"Got {data['word']}."

    menu = Menu("M", [MenuItem("word", "Word", flow=Word)])

    async def main() -> None:
        router = AsyncRouter(AsyncStateService(), main_menu=menu, deps={"max": 3})
        chat = AsyncConversation(router)
        await chat.send("word")
        assert await chat.send("abcd") == ["Too long.", "Word?"]
        assert await chat.send("abc") == ["Got abc."]
        assert (await router.service.get("test-user"))["word"] == "abc"

    asyncio.run(main())


# -- effects committed with the step ---------------------------------------------------------


def test_a_failing_hook_writes_nothing_and_its_redelivery_runs_with_the_same_key() -> None:
    """A payment that times out after charging commits nothing; the redelivery pays once.

    The redelivered message runs the hook again with the same idempotency key,
    so the payments API charges the user once.
    """
    deps = Deps()
    deps.payments.fail_after_charge = 1
    router = _router(deps=deps)
    chat = _logged_in(router)
    chat.send("pay")
    chat.send("5")
    before = router.service.snapshot("ana")
    with pytest.raises(TimeoutError):
        chat.send("yes", message_id="wamid.final")
    after = router.service.snapshot("ana")
    assert after.version == before.version  # nothing written: the flow still waits at confirm
    assert after.data["flow"]["step"] == "confirm"
    assert chat.send("yes", message_id="wamid.final") == ["Paid 5."]  # the redelivery
    assert deps.payments.charged == {"wamid.final": 5}
    assert deps.payments.calls == 2
    assert chat.state["last_receipt"] == "receipt-wamid.final"
    assert chat.send("yes", message_id="wamid.final") == []  # a third copy: silent
    assert deps.payments.calls == 2


def test_a_token_staged_by_a_hook_lands_with_the_end_of_the_flow() -> None:
    """A message handled while the log-in hook runs waits, then sees the user logged in."""
    inside, release = threading.Event(), threading.Event()

    class SlowLogin(Flow):
        name = "login"
        pin = Step("PIN?")

        def on_complete(self, data: dict[str, Any], ctx: Context[Deps]) -> str:
            ctx.log_in(_token())
            inside.set()
            release.wait(10)
            return "Logged in."

    guest = Menu("Welcome", [MenuItem("login", "Log in", flow=SlowLogin, guest_only=True)])
    router = Router(StateService(rules=RULES), main_menu=MAIN, auth_menu=guest, deps=Deps())
    router.handle(Message("bo", "login", message_id="m1"))
    results: dict[str, list[str]] = {}

    def first() -> None:
        results["pin"] = [
            render_text(s) for s in router.handle(Message("bo", "1", message_id="m2"))
        ]

    def second() -> None:
        replies = router.handle(Message("bo", "whoami", message_id="m3"))
        results["who"] = [render_text(s) for s in replies]

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    release.set()
    t1.join()
    t2.join()
    assert results["pin"] == ["Logged in."]
    assert results["who"] == ["bo in en, logged in: True"]


def test_a_hook_can_start_the_next_flow_in_the_same_write() -> None:
    """ctx.start() begins another flow after the hook: its prompt follows the replies."""
    router = _router()
    chat = Conversation(router, "ana")
    chat.send("register")
    assert chat.send("Ana") == ["PIN?"]  # Register ended, Login started, one write
    assert chat.state["profile_name"] == "Ana"
    assert chat.state["flow"]["name"] == "login"
    assert chat.send("1234") == ["Logged in."]
    assert chat.send("logout") == ["Bye."]
    assert "jwt_token" not in chat.state


def test_a_context_refuses_the_routers_own_field_and_unknown_flows() -> None:
    """ctx.update of the flow field and ctx.start of an unregistered flow are usage errors."""

    class Stray(Flow):
        x = Step("X?")

    class Meddle(Flow):
        x = Step("X?")

        def on_complete(self, data: dict[str, Any], ctx: Context[Any]) -> None:
            if data["x"] == "field":
                ctx.update({"flow": {"name": "other"}})
            else:
                ctx.start(Stray)

    router = Router(StateService(), main_menu=Menu("M", [MenuItem("m", "M", flow=Meddle)]))
    chat = Conversation(router)
    chat.send("m")
    with pytest.raises(UsageError, match="router's own"):
        chat.send("field")
    with pytest.raises(UsageError, match="does not know the flow 'stray'"):
        chat.send("flow")
    assert chat.state["flow"]["step"] == "x"  # nothing was written by either


# -- languages -------------------------------------------------------------------------------

SPANISH = {
    "Main": "Principal",
    "Welcome": "Bienvenido",
    "Pay": "Pagar",
    "Who am I": "Quién soy",
    "Log out": "Salir",
    "Register": "Registrarse",
    "Log in": "Entrar",
    "How much?": "¿Cuánto?",
    "Pay {amount}?": "¿Pagar {amount}?",
    "PIN?": "¿PIN?",
    "Cancelled.": "Cancelado.",
    "Please answer one of: {choices}.": "Responde una de: {choices}.",
    "Please log in first.": "Primero inicia sesión.",
    "Please send text.": "Envía texto, por favor.",
    "Sorry, that is not a valid answer.": "Lo siento, esa respuesta no vale.",
}


def test_built_in_texts_prompts_and_menus_follow_the_users_language() -> None:
    """A stored language picks the catalogue; untranslated texts fall back to the source."""
    router = _router(translations={"es": SPANISH})
    router.service.set_preserved("ana", "language", "es")
    chat = Conversation(router, "ana")
    assert chat.send("hi") == ["Bienvenido\n[Registrarse]\n[Entrar]\n[Quién soy]"]
    assert chat.send("pagar") == ["Primero inicia sesión.", chat.texts[1]]  # a translated title
    chat.send("entrar")
    assert chat.send("1234") == ["Logged in."]  # the hook's own text: not a catalogue entry
    assert chat.send("pay") == ["¿Cuánto?"]
    chat.send("5")
    assert chat.send("maybe") == ["Responde una de: yes, no.", "¿Pagar 5?"]
    assert chat.send("cancel") == ["Cancelado."]
    assert chat.send("whoami") == ["ana in es, logged in: True"]


def test_gettext_catalogues_and_switching_language_mid_message() -> None:
    """A gettext object is a catalogue; ctx.set_language applies to this message's replies."""

    class Spanish(gettext.NullTranslations):
        def gettext(self, message: str) -> str:
            return SPANISH.get(message, message)

    def to_spanish(ctx: Context[Any]) -> list[str]:
        ctx.set_language("es")
        return [ctx.t("Cancelled.")]

    menu = Menu("Main", [MenuItem("es", "Español", handler=to_spanish)])
    router = Router(StateService(rules=RULES), main_menu=menu, translations={"es": Spanish()})
    chat = Conversation(router)
    assert chat.send("es") == ["Cancelado."]
    assert chat.state["language"] == "es"  # preserved under RULES
    assert chat.send("hi") == ["Principal\n[Español]"]

    def to_klingon(ctx: Context[Any]) -> None:
        ctx.set_language("tlh")

    bad = Router(StateService(), main_menu=Menu("M", [MenuItem("k", "K", handler=to_klingon)]))
    with pytest.raises(UsageError, match="no translations for language 'tlh'"):
        Conversation(bad).send("k")


def test_a_translation_over_whatsapps_limits_fails_when_the_router_is_built() -> None:
    """Every menu is built in every language at construction."""
    long = {"Pay": "Un título de botón demasiado largo"}
    with pytest.raises(InvalidScreenError, match="in language 'es'"):
        _router(translations={"es": long})


def test_a_translation_function_gets_text_and_language() -> None:
    """Translations may be a function (text, language) -> text."""
    router = Router(
        StateService(),  # language is a plain field here, not a preserved one
        main_menu=MAIN,
        auth_menu=GUEST,
        translations=lambda text, language: f"{text} [{language}]",
    )
    router.service.update("zoe", {"language": "fr"})
    chat = Conversation(router, "zoe")
    assert chat.send("hi")[0].startswith("Welcome [fr]")


# -- menus, media and messages ----------------------------------------------------------------


def test_guest_only_items_are_hidden_and_refused_for_logged_in_users() -> None:
    """A logged-in user typing 'register' gets the main menu, not the registration again."""
    router = _router()
    chat = _logged_in(router)
    home = chat.send("hi")
    assert chat.send("register") == home
    assert "flow" not in chat.state
    assert "Register" not in "".join(Conversation(router, "ana").send("hi"))


def test_a_step_accepts_a_photo_or_a_location_and_a_text_step_asks_for_text() -> None:
    """Media arrive as typed payloads; a wrong kind re-prompts without using an attempt."""

    class Report(Flow):
        photo = Step("Send a photo.", accepts=["image"], next="where")
        where = Step("Where?", accepts=["location", "text"], next="note")
        note = Step("A note?", max_attempts=1)

    router = Router(StateService(), main_menu=Menu("M", [MenuItem("r", "Report", flow=Report)]))
    chat = Conversation(router)
    chat.send("r")
    assert chat.send("a text") == ["Please send a photo.", "Send a photo."]
    image = Media("media-1", "image/jpeg", caption="my cat")
    assert _send(router, Message(chat.user_id, media=image)) == ["Where?"]
    place = Location(40.4, -3.7, name="Sol")
    assert _send(router, Message(chat.user_id, location=place)) == ["A note?"]
    assert chat.state["flow"]["data"] == {
        "photo": {"id": "media-1", "mime_type": "image/jpeg", "caption": "my cat"},
        "where": {"latitude": 40.4, "longitude": -3.7, "name": "Sol"},
    }
    sticker = Message(chat.user_id, media=Media("s"), kind="sticker")
    assert _send(router, sticker) == ["Please send text.", "A note?"]  # max_attempts=1
    assert chat.state["flow"]["step"] == "note"  # a wrong kind is not an attempt


def test_status_reports_and_reactions_change_nothing() -> None:
    """Delivery reports are not user messages; a reaction outside a flow is ignored."""
    from chatstate.flow import Reaction, Status

    router = _router()
    status = Message("ana", message_id="s1", status=Status("wamid.1", "read"))
    assert router.handle(status) == []
    assert router.service.snapshot("ana").version == 0  # not even a claim was recorded
    reaction = Message("ana", message_id="r1", reaction=Reaction("wamid.1", "👍"))
    assert router.handle(reaction) == []
    media = Message("ana", message_id="p1", media=Media("x", "image/png"))
    assert render_text(router.handle(media)[0]).startswith("Welcome")  # outside a flow: the menu


def test_a_message_must_match_its_kind() -> None:
    """A media kind without media, or an unknown kind, is a typed error."""
    with pytest.raises(InvalidMessageError, match="needs media="):
        Message("u", kind="image")
    with pytest.raises(InvalidMessageError, match="unknown message kind 'gif'"):
        Message("u", kind="gif")
    assert Message("u", media=Media("m", "video/mp4")).kind == "video"
    assert Message("u", "hi").kind == "text"
    assert Message("u", reply_id="x").kind == "reply"
    assert Message("u", "a").idempotency_key != Message("u", "b").idempotency_key
    assert Message("u", "a", message_id="w").idempotency_key == "w"


# -- mistakes caught at construction ------------------------------------------------------------


def test_router_construction_catches_mistakes() -> None:
    """The wrong service twin, a misspelt option, a wrong menu: errors when built."""
    with pytest.raises(UsageError, match="Router takes a StateService"):
        Router(AsyncStateService(), main_menu=MAIN)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="AsyncRouter takes an AsyncStateService"):
        AsyncRouter(StateService(), main_menu=MAIN)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="greting"):
        Router(StateService(), main_menu=MAIN, greting=["yo"])  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match="greetings takes a collection"):
        Router(StateService(), main_menu=MAIN, greetings="hi")
    with pytest.raises(ConfigurationError, match="flows= takes Flow subclasses"):
        Router(StateService(), main_menu=MAIN, flows=[object])  # type: ignore[list-item]
    with pytest.raises(InvalidScreenError, match="WhatsApp allows 10"):
        Menu("M", [MenuItem(str(i), f"Item {i}", handler=_whoami) for i in range(11)])
    with pytest.raises(InvalidScreenError, match="allows 20"):
        Menu("M", [MenuItem("x", "A title far too long for a button", handler=_whoami)])


def test_flow_definitions_catch_mistakes_at_import() -> None:
    """A reserved step name, a reused Step, an on_too_many typo are errors when declared."""
    with pytest.raises(InvalidFlowDefinition, match="a step is named 'name'"):

        class Named(Flow):
            name = Step("Name?")  # type: ignore[assignment]

    shared = Step("Shared?")

    class One(Flow):
        a = shared

    with pytest.raises(InvalidFlowDefinition, match=r"same Step object as One\.a"):

        class Two(Flow):
            b = shared

    class Three(Flow):
        a = shared.copy()

    assert Three.steps["a"].name == "a"
    assert One.steps["a"] is shared
    with pytest.raises(InvalidFlowDefinition, match="on_too_many='cancle'"):
        Step("X?", on_too_many="cancle")  # type: ignore[arg-type]
    with pytest.raises(InvalidFlowDefinition, match="accepts"):
        Step("X?", accepts=["photo"])
    with pytest.raises(InvalidFlowDefinition, match="must be callable"):
        Step("X?", validate="not a function")  # type: ignore[arg-type]


def test_the_token_field_comes_from_the_service_rules() -> None:
    """A custom token field in StateData makes a logged-in user logged in for the router."""
    rules = StateData(preserved=["auth_token"], token_field="auth_token")
    router = Router(StateService(rules=rules), main_menu=MAIN, auth_menu=GUEST, deps=Deps())
    chat = _logged_in(router)
    assert chat.state["auth_token"]
    assert chat.send("pay") == ["How much?"]  # not "Please log in first."


# -- observers -----------------------------------------------------------------------------------


def test_observers_see_each_flow_step() -> None:
    """The router tells observers what each message did in a flow."""
    seen: list[tuple[str, str, str]] = []

    class Steps(Observer):
        def flow_step(self, flow: str, step: str, outcome: str) -> None:
            seen.append((flow, step, outcome))

    observer = add_observer(Steps())
    try:
        router = _router()
        chat = _logged_in(router)
        chat.send("pay")
        chat.send("x")
        chat.send("back")
        chat.send("cancel")
    finally:
        remove_observer(observer)
    assert seen == [
        ("login", "pin", "started"),
        ("login", "pin", "completed"),
        ("pay", "amount", "started"),
        ("pay", "amount", "invalid"),
        ("pay", "amount", "back"),
        ("pay", "amount", "cancelled"),
    ]


def test_the_contexts_state_is_read_only_and_its_repr_hides_secrets() -> None:
    """ctx.state reads the stored document, refuses changes, and its repr hides the token."""
    seen: list[Any] = []

    def show(ctx: Context[None]) -> str:
        seen.append((repr(ctx.state), ctx.state["pin"], dict(ctx.state), "pin" in ctx.state))
        with pytest.raises(TypeError):
            ctx.state["pin"] = "x"  # type: ignore[index]
        return "ok"

    rules = StateData(preserved=["jwt_token"], secret=["pin"])
    svc = StateService(rules=rules)
    svc.set_preserved("u", "jwt_token", "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl")
    svc.update("u", {"pin": "4321", "name": "Ana"})
    router = Router(svc, main_menu=Menu("M", [MenuItem("show", "Show", handler=show)]))
    assert Conversation(router, user_id="u").send("show") == ["ok"]
    shown, pin, whole, has = seen[0]
    assert "eyJ" not in shown
    assert "4321" not in shown
    assert "Ana" in shown
    assert (pin, has) == ("4321", True)
    assert whole["jwt_token"].startswith("eyJ")


def test_ctx_now_is_the_time_the_step_stores_its_deadlines_against() -> None:
    """ctx.now: the message's timestamp, else the router's clock, read once per message."""
    ticks = iter(range(1000, 2000, 10))
    seen: list[float] = []

    def prompt(data: dict[str, Any], ctx: Context[None]) -> str:
        seen.append(ctx.now)
        return "Your name?"

    class Ask(Flow):
        who = Step(prompt)

    service = StateService()
    router = Router(
        service,
        main_menu=Menu("Menu", [MenuItem("ask", "Ask", flow=Ask)]),
        clock=lambda: float(next(ticks)),  # a clock that moves on every reading
    )
    router.handle(Message("u", text="ask", message_id="m1"))
    assert seen == [service.get("u")["flow"]["at"]]
    router.handle(Message("v", text="ask", message_id="m2", timestamp=5.0))
    assert seen[-1] == 5.0 == service.get("v")["flow"]["at"]
