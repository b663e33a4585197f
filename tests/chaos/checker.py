"""Judge a chaos run from its history: what a user saw, what the bank did, what was stored.

The history holds, per delivery, when it was dispatched and to which worker,
what the worker recorded (``recv``, ``bank``, ``handled``, each ``send``,
``ack`` or ``fail``, an injected ``crash``), and the dispatcher's notes (when a
user said each message, kills, deaths with what the dead worker held, the
server's faults). Times are ``time.monotonic()`` of the machine, one clock for
every process.

The figures (:class:`Report`):

- **never answered**: a message of which no reply was ever sent; **partly
  answered**: some of its replies were never sent.
- **answered twice**: a message whose replies were sent by two deliveries. The
  second is *inside the documented window* when it resent the stored replies
  (``delivery.resent``) after every earlier sender of them died or failed before
  its acknowledgement; else *outside*.
- **run twice**: a message handled afresh (not found stored) by two deliveries.
- **effects doubled**: a bank call made for a message after the message had
  been committed (the worker's ``handled`` line of another delivery came
  first), so a hook ran again after its commit. Calls repeated after a handling
  that died or failed before its commit are the documented retry (the bank
  dedupes them by key) and are only counted.
- **orphan effects**: a bank movement for a message whose committed handling
  made no movement (it died after the call, and the redelivery took another
  path because the user's state had moved on): the no-outbox limitation.
- **states not sequential**: each user's messages are replayed one at a time
  through the same bot on the memory backend, in every order the history
  allows (a message committed after it was said and before the first
  ``handled`` line that saw it committed); an order must give every recorded
  reply and end in the stored document.
- **block after a kill**: for each user a dead worker was handling, the time
  from the death to the next reply the user got for a message they were
  waiting for (from the death, or from when they said it if later).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from chaos.bot import RecordingBank, Wallet, build_router
from chaos.dispatcher import Msg, Run
from chatstate import AsyncStateService
from chatstate.flow import Message, render_text

SEARCH_BUDGET = 50_000
"""Model steps the order search may take for one user before it gives up (undecided)."""


@dataclass
class Report:
    """The figures of one run."""

    seed: int
    shim: bool
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    never_answered: list[str] = field(default_factory=list)
    partly_answered: list[str] = field(default_factory=list)
    twice_inside: list[str] = field(default_factory=list)
    twice_outside: list[str] = field(default_factory=list)
    run_twice: list[str] = field(default_factory=list)
    resent_differs: list[str] = field(default_factory=list)
    effect_retries: list[str] = field(default_factory=list)
    effects_doubled: list[str] = field(default_factory=list)
    orphan_effects: list[str] = field(default_factory=list)
    lost_effects: list[str] = field(default_factory=list)
    not_sequential: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)
    blocks: list[tuple[float, str, str, bool]] = field(default_factory=list)
    lease: float = 5.0

    @property
    def max_block(self) -> float:
        """The longest wait after a kill, the server up all along."""
        return max((b for b, _, _, outage in self.blocks if not outage), default=0.0)

    @property
    def max_block_outage(self) -> float:
        """The longest wait after a kill that overlapped a server outage."""
        return max((b for b, _, _, outage in self.blocks if outage), default=0.0)

    def rows(self) -> list[tuple[str, str]]:
        """The figures as (name, value) rows."""
        c = self.counts
        return [
            ("API", "handle() shim" if self.shim else "deliver()"),
            ("seconds", f"{self.seconds:.0f}"),
            ("users / messages", f"{c['users']} / {c['messages']}"),
            (
                "deliveries (duplicated, after failure, late)",
                f"{c['deliveries']} ({c['duplicate']}, {c['redelivered']}, {c['late']})",
            ),
            ("swapped pairs", str(c["swapped"])),
            (
                "workers killed (SIGKILL, at a fault point)",
                f"{c['sigkill'] + c['crashes']} ({c['sigkill']}, {c['crashes']})",
            ),
            ("send errors injected", str(c["send_error"])),
            (
                "connection kills / script flushes / server kills",
                f"{c['client_kill']} / {c['script_flush']} / {c['server_kill']}",
            ),
            ("bank calls (timed out after applying)", f"{c['bank_calls']} ({c['bank_timeouts']})"),
            ("failed deliveries (redelivered)", str(c["fails"])),
            ("never answered", str(len(self.never_answered))),
            ("partly answered", str(len(self.partly_answered))),
            ("answered twice, inside the window", str(len(self.twice_inside))),
            ("answered twice, outside the window", str(len(self.twice_outside))),
            ("run twice", str(len(self.run_twice))),
            ("resent replies that differ", str(len(self.resent_differs))),
            (
                "bank calls repeated after a failed handling (deduped)",
                str(len(self.effect_retries)),
            ),
            ("side effects doubled", str(len(self.effects_doubled))),
            ("orphan effects (no outbox)", str(len(self.orphan_effects))),
            ("effects missing", str(len(self.lost_effects))),
            (
                "states not sequential (undecided)",
                f"{len(self.not_sequential)} ({len(self.undecided)})",
            ),
            ("users blocked after a kill", str(len(self.blocks))),
            ("longest block after a kill, s", f"{self.max_block:.2f}"),
            ("  with a server outage, s", f"{self.max_block_outage:.2f}"),
        ]

    def table(self) -> str:
        """The figures as a Markdown table."""
        return table([self])

    def done(self) -> list[str]:
        """What keeps this run from the issue's 'done when' (empty: nothing)."""
        problems = []
        for name, found in (
            ("never answered", self.never_answered),
            ("partly answered", self.partly_answered),
            ("answered twice outside the window", self.twice_outside),
            ("run twice", self.run_twice),
            ("resent replies differ", self.resent_differs),
            ("side effects doubled", self.effects_doubled),
            ("effects missing", self.lost_effects),
            ("states not sequential", self.not_sequential),
            ("states undecided", self.undecided),
        ):
            if found:
                problems.append(f"{name}: {found[:10]}")
        if self.max_block > self.lease + 1.0:
            worst = max(b for b in self.blocks if not b[3])
            problems.append(
                f"a user waited {worst[0]:.2f} s after a kill (lease {self.lease} s): {worst}"
            )
        return problems


def table(reports: list[Report]) -> str:
    """Several runs side by side, one column per seed."""
    rows = [r.rows() for r in reports]
    head = "| | " + " | ".join(f"seed {r.seed}" for r in reports) + " |"
    lines = [head, "|---" * (len(reports) + 1) + "|"]
    for i, (name, _) in enumerate(rows[0]):
        lines.append(f"| {name} | " + " | ".join(r[i][1] for r in rows) + " |")
    return "\n".join(lines)


@dataclass
class _Delivery:
    id: str
    mid: str = ""
    user: str = ""
    worker: str = ""
    kind: str = ""
    fault: str | None = None
    dispatched: float = 0.0
    handled: dict[str, Any] | None = None
    sends: list[dict[str, Any]] = field(default_factory=list)
    acked: float | None = None
    failed: str | None = None
    crashed: str | None = None
    bank: list[dict[str, Any]] = field(default_factory=list)


class _History:
    """The history, indexed: each line goes to the ``_on_<ev>`` method of its event."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.deliveries: dict[str, _Delivery] = {}
        self.by_mid: dict[str, list[_Delivery]] = defaultdict(list)
        self.said: dict[str, float] = {}
        self.deaths: list[dict[str, Any]] = []
        self.outages: list[tuple[float, float]] = []
        self.counts: Counter[str] = Counter()
        self._down: float | None = None
        for r in run.history:
            getattr(self, f"_on_{r['ev']}", self._on_other)(r)
        self.counts["swapped"] //= 2
        self.counts["send_error"] = sum(
            1 for d in self.deliveries.values() if d.fault == "send_error" and d.sends
        )

    def delivery(self, d: str) -> _Delivery:
        found = self.deliveries.get(d)
        if found is None:
            found = self.deliveries[d] = _Delivery(d)
        return found

    def _on_dispatch(self, r: dict[str, Any]) -> None:
        d = self.delivery(r["d"])
        d.mid, d.user, d.worker, d.kind = r["mid"], r["user"], r["worker"], r["kind"]
        d.fault, d.dispatched = r["fault"], r["t"]
        self.by_mid[d.mid].append(d)
        self.counts["deliveries"] += 1
        kinds = {"duplicate": "duplicate", "late": "late", "first": "first"}
        self.counts[kinds.get(d.kind, "redelivered")] += 1

    def _on_say(self, r: dict[str, Any]) -> None:
        self.said.setdefault(r["mid"], r["t"])
        self.counts["swapped"] += bool(r["swapped"])

    def _on_handled(self, r: dict[str, Any]) -> None:
        self.delivery(r["d"]).handled = r

    def _on_send(self, r: dict[str, Any]) -> None:
        self.delivery(r["d"]).sends.append(r)

    def _on_ack(self, r: dict[str, Any]) -> None:
        self.delivery(r["d"]).acked = r["t"]

    def _on_fail(self, r: dict[str, Any]) -> None:
        self.delivery(r["d"]).failed = r["error"]
        self.counts["fails"] += 1

    def _on_crash(self, r: dict[str, Any]) -> None:
        self.delivery(r["d"]).crashed = r["point"]
        self.counts["crashes"] += 1

    def _on_bank(self, r: dict[str, Any]) -> None:
        self.delivery(r["d"]).bank.append(r)
        self.counts["bank_calls"] += 1

    def _on_bank_answer(self, r: dict[str, Any]) -> None:
        self.counts["bank_timeouts"] += not r["ok"]

    def _on_kill(self, r: dict[str, Any]) -> None:
        self.counts["sigkill"] += 1

    def _on_dead(self, r: dict[str, Any]) -> None:
        self.deaths.append(r)

    def _on_fault(self, r: dict[str, Any]) -> None:
        kind = r["kind"]
        if kind == "server kill":
            self._down = r["t"]
            self.counts["server_kill"] += 1
        elif kind == "server up" and self._down is not None:
            self.outages.append((self._down, r["t"]))
            self._down = None
        else:
            self.counts[kind.split()[0] + "_" + kind.split()[1]] += 1  # client_kill, script_flush

    def _on_other(self, r: dict[str, Any]) -> None:
        """Lines that only mark time (ready, recv, start, begin, quiet, end)."""


def check(run: Run) -> Report:
    """Every figure of one run."""
    h = _History(run)
    report = Report(run.config.seed, run.shim, run.seconds, lease=run.config.lease)
    messages = [m for msgs in run.scripts.values() for m in msgs]
    h.counts["users"] = len(run.scripts)
    h.counts["messages"] = len(messages)
    report.counts = dict(h.counts)
    for key in (
        "deliveries",
        "duplicate",
        "redelivered",
        "late",
        "swapped",
        "sigkill",
        "crashes",
        "send_error",
        "client_kill",
        "script_flush",
        "server_kill",
        "bank_calls",
        "bank_timeouts",
        "fails",
    ):
        report.counts.setdefault(key, 0)
    for m in messages:
        _answers(h, m, report)
        _effects(h, m, report)
    asyncio.run(_states(h, run, report))
    _blocks(h, run, report)
    return report


def _answers(h: _History, m: Msg, report: Report) -> None:
    ds = h.by_mid.get(m.mid, [])
    senders = sorted((d for d in ds if d.sends), key=lambda d: d.sends[0]["t"])
    if not senders:
        report.never_answered.append(m.mid)
        return
    sizes = {d.handled["n"] for d in ds if d.handled and d.handled["n"]}
    sent = {s["i"] for d in senders for s in d.sends}
    if sizes and sent != set(range(max(sizes))):
        report.partly_answered.append(m.mid)
    texts: dict[int, str] = {}
    for d in senders:
        for s in d.sends:
            if texts.setdefault(s["i"], s["text"]) != s["text"]:
                report.resent_differs.append(m.mid)
    fresh = [d for d in ds if d.handled and not d.handled["resent"] and d.handled["n"]]
    if len(fresh) > 1:
        report.run_twice.append(m.mid)
    if len(senders) > 1:
        inside = all(
            d.handled is not None
            and d.handled["resent"]
            and all(e.acked is None for e in senders[:i])
            for i, d in enumerate(senders)
            if i
        )
        (report.twice_inside if inside else report.twice_outside).append(m.mid)


def _effects(h: _History, m: Msg, report: Report) -> None:
    ds = h.by_mid.get(m.mid, [])
    calls = [(b["t"], d) for d in ds for b in d.bank]
    if len({d.id for _, d in calls}) > 1:
        report.effect_retries.append(m.mid)
    for t, d in calls:
        seen = [e.handled["t"] for e in ds if e is not d and e.handled is not None]
        if seen and t > min(seen):
            report.effects_doubled.append(m.mid)
            break


class _Model:
    """The bot, one message at a time, on the memory backend."""

    def __init__(self, shim: bool) -> None:
        self.service = AsyncStateService()
        self.bank = RecordingBank()
        self.router = build_router(self.service, Wallet(self.bank))
        self.shim = shim
        self.steps = 0

    async def step(
        self, doc: dict[str, Any], m: Msg
    ) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
        """The document, replies and bank movements after ``m`` from ``doc``."""
        self.steps += 1
        await self.service.erase(m.user)
        if doc:
            await self.service.assign(m.user, doc)
        self.bank.moves.clear()
        message = Message(m.user, m.text, message_id=m.mid, timestamp=m.ts)
        if self.shim:
            screens = await self.router.handle(message)
        else:  # the outbox the deliveries keep in the document is then modelled too
            async with self.router.deliver(message) as delivery:
                screens = delivery.replies
        replies = [render_text(s) for s in screens]
        return await self.service.get(m.user), replies, dict(self.bank.moves)


async def _states(h: _History, run: Run, report: Report) -> None:
    model = _Model(run.shim)
    for user, msgs in run.scripts.items():
        order = _Order(h, model, msgs, run.states.get(user, {}))
        found = await order.search({}, frozenset(), -math.inf, {})
        if found is None:
            report.undecided.append(user)
            continue
        if not found:
            report.not_sequential.append(user)
            continue
        mine = {k for k, v in run.bank.items() if v[1] == user}
        report.orphan_effects += sorted(mine - set(order.movements))
        report.lost_effects += sorted(set(order.movements) - mine)


class _Order:
    """The search for a sequential order of one user's messages that explains the run.

    A message was committed after the user said it (``lo``) and before the
    first ``handled`` line of any of its deliveries (``hi``: that line comes
    after the commit, whether it ran the message or found it done). A message
    with no such line may have been committed or not. Each step of the search
    runs the model; an order is dropped as soon as a reply differs from one
    the history recorded.
    """

    def __init__(self, h: _History, model: _Model, msgs: list[Msg], final: dict[str, Any]) -> None:
        self.model = model
        self.msgs = msgs
        self.final = final
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}
        self.replies: dict[str, dict[int, str]] = {}
        self.sizes: dict[str, int] = {}
        for m in msgs:
            ds = h.by_mid.get(m.mid, [])
            self.lo[m.mid] = h.said.get(m.mid, math.inf)
            self.hi[m.mid] = min((d.handled["t"] for d in ds if d.handled), default=math.inf)
            self.replies[m.mid] = {s["i"]: s["text"] for d in ds for s in d.sends}
            sizes = [d.handled["n"] for d in ds if d.handled and d.handled["n"]]
            if sizes:
                self.sizes[m.mid] = max(sizes)
        self.required = {m.mid for m in msgs if self.hi[m.mid] < math.inf}
        self.start = model.steps
        self.visited: set[tuple[frozenset[str], str, float]] = set()
        self.movements: dict[str, Any] = {}

    def fits(self, m: Msg, got: list[str]) -> bool:
        """Whether the model's replies agree with what the history recorded for ``m``."""
        if m.mid in self.sizes and len(got) != self.sizes[m.mid]:
            return False
        return all(i < len(got) and got[i] == text for i, text in self.replies[m.mid].items())

    async def search(
        self, doc: dict[str, Any], done: frozenset[str], c: float, moved: dict[str, Any]
    ) -> bool | None:
        """True: an order from here explains the run; False: none does; None: out of budget."""
        if self.model.steps - self.start > SEARCH_BUDGET:
            return None
        key = (done, json.dumps(doc, sort_keys=True), c)
        if key in self.visited:
            return False
        self.visited.add(key)
        left = [mid for mid in self.required if mid not in done]
        if not left and doc == self.final:
            self.movements = moved
            return True
        bound = min((self.hi[mid] for mid in left), default=math.inf)
        undecided = False
        for m in self.msgs:
            at = max(c, self.lo[m.mid])
            if m.mid in done or at > min(bound, self.hi[m.mid]):
                continue  # done, never said, or a message still left was committed before
            new, got, moves = await self.model.step(doc, m)
            if not self.fits(m, got):
                continue
            found = await self.search(new, done | {m.mid}, at, {**moved, **moves})
            if found:
                return True
            undecided = undecided or found is None
        return None if undecided else False


def _killed_at(death: dict[str, Any]) -> float:
    """When a worker died: its crash line, the SIGKILL, else when its end was seen."""
    return float(death["killed_at"] if death["killed_at"] is not None else death["t"])


def _blocks(h: _History, run: Run, report: Report) -> None:
    answers: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for d in h.deliveries.values():
        for s in d.sends:
            answers[d.user].append((s["t"], d.mid))
    first_answer = {
        mid: min(s["t"] for d in ds for s in d.sends)
        for mid, ds in h.by_mid.items()
        if any(d.sends for d in ds)
    }
    hits: dict[str, list[float]] = defaultdict(list)  # user: when a worker holding them died
    for death in h.deaths:
        for _, _, user in death["inflight"]:
            hits[user].append(_killed_at(death))
    for death in h.deaths:
        killed = _killed_at(death)
        for user in sorted({u for _, _, u in death["inflight"]}):
            waiting = [
                (max(killed, h.said[m.mid]), first_answer[m.mid])
                for m in run.scripts[user]
                if m.mid in h.said and m.mid in first_answer and first_answer[m.mid] > killed
            ]
            if not waiting:
                continue
            since, answered = min(waiting, key=lambda w: w[1])
            # a later death that hits the same user starts a block of its own
            answered = min([answered, *(t for t in hits[user] if t > killed)])
            block = answered - since
            outage = any(a <= answered and b >= killed for a, b in h.outages)
            report.blocks.append((round(block, 3), user, death["worker"], outage))
