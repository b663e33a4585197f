"""A small credit-exchange bot: register, log in, see a balance, transfer with confirmation.

The bank is a fake in-process API that issues real JWTs (PyJWT, HS256); the bot
keeps each user's token in preserved state with :mod:`chatstate.auth`.
``build_router`` wires everything over any :class:`~chatstate.StateService`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from chatstate import CachedUser, StateData, StateService
from chatstate.auth import get_valid_token
from chatstate.flow import (
    DONE,
    Button,
    Buttons,
    Context,
    Flow,
    Invalid,
    Menu,
    MenuItem,
    Router,
    Step,
    Text,
    whatsapp_user_id,
)

RULES = StateData(preserved=["jwt_token", "profile"])
SECRET = "demo-bank-signing-key-0123456789abcdef"  # noqa: S105 - a demo key


class BankError(Exception):
    """The fake bank refused a request."""


@dataclass
class Bank:
    """A fake banking API: accounts by phone number, JWT sessions, transfers."""

    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    token_lifetime: int = 900

    def register(self, phone: str, name: str, pin: str) -> None:
        if phone in self.accounts:
            raise BankError("already registered")
        self.accounts[phone] = {"name": name, "pin": pin, "balance": 100}

    def login(self, phone: str, pin: str) -> str:
        account = self.accounts.get(phone)
        if account is None or account["pin"] != pin:
            raise BankError("wrong phone or PIN")
        now = int(time.time())
        claims = {"sub": phone, "iat": now, "exp": now + self.token_lifetime}
        return jwt.encode(claims, SECRET, algorithm="HS256")

    def _who(self, token: str) -> str:
        try:
            return str(jwt.decode(token, SECRET, algorithms=["HS256"])["sub"])
        except jwt.PyJWTError as exc:
            raise BankError("session expired") from exc

    def balance(self, token: str) -> int:
        return int(self.accounts[self._who(token)]["balance"])

    def transfer(self, token: str, to: str, amount: int, *, key: str) -> int:
        """Move credits once per idempotency ``key`` (a repeated key repeats the answer)."""
        if key in self.done:
            return self.done[key]
        sender = self.accounts[self._who(token)]
        if to not in self.accounts:
            raise BankError("unknown recipient")
        if amount > sender["balance"]:
            raise BankError("not enough credits")
        sender["balance"] -= amount
        self.accounts[to]["balance"] += amount
        self.done[key] = int(sender["balance"])
        return self.done[key]


@dataclass
class Services:
    """What the bot's callables reach as ``ctx.deps``."""

    bank: Bank
    state: StateService


Ctx = Context[Services]


def _pin(answer: str) -> str:
    if not (answer.isdigit() and len(answer) == 4):
        raise Invalid("A PIN is 4 digits.")
    return answer


def _amount(answer: str, ctx: Ctx) -> int:
    if not answer.isdigit() or int(answer) <= 0:
        raise Invalid("Please send a whole number of credits, like 25.")
    balance = ctx.deps.bank.balance(str(ctx.state.get("jwt_token")))
    if int(answer) > balance:
        raise Invalid(f"You have {balance} credits; send at most that.")
    return int(answer)


def _phone(answer: str) -> str:
    # As WhatsApp names its users (the wa_id: digits, no "+"), so a transfer reaches the
    # account of the person who writes from that number.
    try:
        return whatsapp_user_id(answer)
    except ValueError:
        raise Invalid("Please send a phone number like +34611111111.") from None


class Register(Flow):
    """Open an account."""

    full_name = Step("What is your name?", key="name", next="pin")
    pin = Step("Choose a 4-digit PIN.", clean=_pin)

    def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        try:
            ctx.deps.bank.register(ctx.user_id, data["name"], data["pin"])
        except BankError as exc:
            return f"Could not register: {exc}."
        ctx.set_preserved("profile", {"name": data["name"]})  # written with the flow's end
        return f"Welcome, {data['name']}! You have 100 credits. Reply 'login' to log in."


def _check_pin(answer: str, ctx: Ctx) -> str:
    """Checked upstream as it is typed: a wrong PIN is asked again."""
    try:
        token = ctx.deps.bank.login(ctx.user_id, _pin(answer))
    except BankError:
        raise Invalid("Wrong PIN, try again.") from None
    return token


class Login(Flow):
    """Log in with the PIN; the bank's JWT goes into preserved state with the flow's end."""

    pin = Step("Your PIN, please.", clean=_check_pin, key="token")

    def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        ctx.log_in(data.pop("token"))  # the token never lands in the flow's data
        return "You are logged in."


def _confirm(data: dict[str, Any]) -> Buttons:
    return Buttons(
        f"Send {data['amount']} credits to +{data['to']}?",
        [Button("yes", "Send"), Button("no", "Change amount")],
    )


class Transfer(Flow):
    """Send credits, with a confirmation step."""

    requires_auth = True
    amount = Step("How many credits?", clean=_amount, next="to")
    to = Step("Who should receive them? (a phone number)", clean=_phone, next="confirm")
    confirm = Step(_confirm, next={"yes": DONE, "no": "amount"})

    def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        user = CachedUser(ctx.user_id, ctx.deps.state)

        def relogin(_old: str | None) -> str:
            raise BankError("please log in again")

        try:
            token = get_valid_token(user, relogin)
            left = ctx.deps.bank.transfer(
                token, data["to"], data["amount"], key=ctx.idempotency_key
            )
        except BankError as exc:
            return f"Transfer failed: {exc}."
        return f"Sent {data['amount']} credits to +{data['to']}. Your balance: {left}."


def _balance(ctx: Ctx) -> str:
    try:
        return f"Your balance: {ctx.deps.bank.balance(str(ctx.state.get('jwt_token')))} credits."
    except BankError as exc:
        return f"Could not read your balance: {exc}."


def _logout(ctx: Ctx) -> str:
    ctx.log_out()
    return "Logged out. Say hi to start again."


def build_router(service: StateService, bank: Bank | None = None) -> Router[Services]:
    """The bot's router over ``service`` (whose rules must preserve jwt_token)."""
    auth_menu = Menu(
        "Welcome to Credit Exchange.",
        [
            MenuItem("register", "Register", flow=Register, guest_only=True),
            MenuItem("login", "Log in", flow=Login, guest_only=True),
        ],
    )
    main_menu = Menu(
        "What would you like to do?",
        [
            MenuItem("balance", "Balance", handler=_balance, requires_auth=True),
            MenuItem("transfer", "Transfer", flow=Transfer),
            MenuItem("logout", "Log out", handler=_logout, requires_auth=True),
        ],
    )
    services = Services(bank if bank is not None else Bank(), service)
    return Router(service, main_menu=main_menu, auth_menu=auth_menu, deps=services)


def seeded_bank() -> Bank:
    """A bank where Bob (+34 611 11 11 11, WhatsApp user ``34611111111``) has an account."""
    bank = Bank()
    bank.register("34611111111", "Bob", "1111")
    return bank


__all__ = [
    "RULES",
    "Bank",
    "Login",
    "Register",
    "Services",
    "Text",
    "Transfer",
    "build_router",
    "seeded_bank",
]
