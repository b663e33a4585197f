"""The wallet bot under test: register, top up, transfer, balance.

Its state is the user's document: ``account`` (name and PIN, not secret here),
``balance``, and the active flow. Every money movement (a top-up, a transfer)
is a call to a bank, with the message's idempotency key, from the flow's
``on_complete`` hook, before the router's commit; the balance in state is
staged on the context, so it is written with the step or not at all.

``Wallet.fault(point)`` is called at every place a worker may be told to die
(``before_commit``: in the first callable the message runs, after the bank call
when it makes one). The model the checker replays uses the same bot over the
memory backend, with a bank that only records and no faults.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chatstate import AsyncStateService
from chatstate.flow import (
    DONE,
    AsyncRouter,
    Button,
    Buttons,
    Context,
    Flow,
    Invalid,
    Menu,
    MenuItem,
    Step,
)

Bank = Callable[[str, str, str, int, str | None], Awaitable[None]]
"""``bank(key, kind, user, amount, to)``: one money movement; raises when it failed."""


async def _no_fault(point: str) -> None:
    return None


@dataclass
class Wallet:
    """What the bot's callables reach as ``ctx.deps``."""

    bank: Bank
    fault: Callable[[str], Awaitable[None]] = _no_fault


@dataclass
class RecordingBank:
    """The model's bank: records each movement by key (a key seen before is a no-op)."""

    moves: dict[str, tuple[str, str, int, str | None]] = field(default_factory=dict)

    async def __call__(self, key: str, kind: str, user: str, amount: int, to: str | None) -> None:
        self.moves.setdefault(key, (kind, user, amount, to))


Ctx = Context[Wallet]


async def _name(answer: str, ctx: Ctx) -> str:
    await ctx.deps.fault("before_commit")
    if not answer.strip():
        raise Invalid("Please send your name.")
    return answer.strip()


async def _pin(answer: str, ctx: Ctx) -> str:
    await ctx.deps.fault("before_commit")
    if not (answer.isdigit() and len(answer) == 4):
        raise Invalid("A PIN is 4 digits.")
    return answer


async def _topup_amount(answer: str, ctx: Ctx) -> int:
    await ctx.deps.fault("before_commit")
    if not answer.isdigit() or not 1 <= int(answer) <= 1000:
        raise Invalid("Send a whole number from 1 to 1000.")
    return int(answer)


async def _transfer_amount(answer: str, ctx: Ctx) -> int:
    await ctx.deps.fault("before_commit")
    balance = int(ctx.state.get("balance", 0))
    if not answer.isdigit() or int(answer) < 1:
        raise Invalid("Send a whole number of credits.")
    if int(answer) > balance:
        raise Invalid(f"You have {balance} credits.")
    return int(answer)


async def _recipient(answer: str, ctx: Ctx) -> str:
    await ctx.deps.fault("before_commit")
    to = answer.strip().lower()
    if not (to.startswith("u") and to[1:].isdigit()) or to == ctx.user_id:
        raise Invalid("Send another user's id, like u3.")
    return to


async def _yes_no(answer: str, ctx: Ctx) -> str:
    await ctx.deps.fault("before_commit")
    return answer.strip().lower()


def _confirm(data: dict[str, Any]) -> Buttons:
    return Buttons(
        f"Send {data['amount']} to {data['to']}?", [Button("yes", "Send"), Button("no", "Change")]
    )


class Register(Flow):
    """Open an account: a name, then a PIN."""

    full_name = Step("Your name?", clean=_name, key="name", next="pin")
    pin = Step("Choose a 4-digit PIN.", clean=_pin)

    async def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        await ctx.deps.fault("before_commit")
        ctx.update({"account": {"name": data["name"], "pin": data["pin"]}, "balance": 0})
        return f"Welcome, {data['name']}. Your balance: 0."


class TopUp(Flow):
    """Add credits: one bank call, then the balance."""

    amount = Step("How much to add?", clean=_topup_amount)

    async def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        amount = data["amount"]
        await ctx.deps.bank(ctx.idempotency_key, "topup", ctx.user_id, amount, None)
        await ctx.deps.fault("before_commit")
        balance = int(ctx.state.get("balance", 0)) + amount
        ctx.update({"balance": balance, "topups": int(ctx.state.get("topups", 0)) + 1})
        return f"Added {amount}. Your balance: {balance}."


class Transfer(Flow):
    """Send credits to another user, with a confirmation."""

    amount = Step("How much to send?", clean=_transfer_amount, next="to")
    to = Step("To whom? (a user id)", clean=_recipient, next="confirm")
    confirm = Step(_confirm, clean=_yes_no, next={"yes": DONE, "no": "amount"})

    async def on_complete(self, data: dict[str, Any], ctx: Ctx) -> str:
        amount, to = data["amount"], data["to"]
        await ctx.deps.bank(ctx.idempotency_key, "transfer", ctx.user_id, amount, to)
        await ctx.deps.fault("before_commit")
        balance = int(ctx.state.get("balance", 0)) - amount
        ctx.update({"balance": balance, "sent": int(ctx.state.get("sent", 0)) + amount})
        return f"Sent {amount} to {to}. Your balance: {balance}."


async def _balance(ctx: Ctx) -> str:
    await ctx.deps.fault("before_commit")
    return f"Your balance: {int(ctx.state.get('balance', 0))}."


def build_router(service: AsyncStateService, wallet: Wallet, **options: Any) -> AsyncRouter[Wallet]:
    """The bot over ``service``; ``options`` go to :class:`AsyncRouter` (``lease``, ``wait``)."""
    guest = Menu("Welcome.", [MenuItem("register", "Register", flow=Register)])
    member = Menu(
        "Your wallet.",
        [
            MenuItem("topup", "Top up", flow=TopUp),
            MenuItem("send", "Send", flow=Transfer),
            MenuItem("balance", "Balance", handler=_balance),
        ],
    )
    return AsyncRouter(
        service,
        main_menu=member,
        auth_menu=guest,
        deps=wallet,
        is_authenticated=lambda doc: bool(doc.get("account")),
        **options,
    )
