"""The test process of the chaos harness: users, an at-least-once platform, a bank, faults.

:func:`run` starts a Redis server of its own (``--appendonly yes --appendfsync
always``, on a random loopback port), ``workers`` worker processes
(:mod:`chaos.worker`), and plays every user's scripted conversation through
them while breaking things; it returns a :class:`Run`: the history (every
worker's lines and the dispatcher's own), the stored state of every user, the
bank's movements. :mod:`chaos.checker` judges it.

The platform is at least once: a delivery that is not acknowledged (its
worker died, it failed, or no acknowledgement came within ``ack_timeout``) is
delivered again to another worker until one acknowledges it. On top of that,
``duplicate`` of the messages go to two workers at once, ``swap`` of the time a
user's two next messages are delivered in the opposite order, and
``redeliver_acked`` of the acknowledged messages come once more a little later.
A user sends the next message once the last one was answered, or after
``patience`` seconds without an answer, as a person would.

The faults, while users talk: ``crash_share`` of the deliveries are told to die
(``os._exit(137)``) at one of the worker's fault points (before the commit,
after it, between two replies, after the replies before the acknowledgement) or
to fail the platform's send; a busy worker is SIGKILLed every ``kill_every``
seconds on average (each dead worker is replaced at once); every
``client_kill_every`` seconds ``CLIENT KILL TYPE normal`` cuts every connection;
every ``script_flush_every`` seconds ``SCRIPT FLUSH`` drops the Lua scripts; every
``server_kill_every`` seconds the server is SIGKILLed and started again
``server_down`` seconds later on the same port and data directory. The bank
answers ``bank_timeout`` of its calls with a timeout after applying the movement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio

import servers
from chaos.worker import POINTS
from chatstate import AsyncStateService
from chatstate.flow import AsyncRouter
from chatstate.state import AsyncRedisBackend

TESTS = Path(__file__).resolve().parent.parent
NAMESPACE = "chaos"


@dataclass
class Config:
    """One run: its size, the platform's misbehaviour and the fault schedule."""

    seed: int = 1
    users: int = 10
    messages: int = 14
    workers: int = 3
    lease: float = 5.0
    patience: float = 8.0
    ack_timeout: float = 12.0
    think: float = 0.3
    duplicate: float = 0.10
    swap: float = 0.05
    redeliver_acked: float = 0.05
    crash_share: float = 0.04
    kill_every: float = 5.0
    client_kill_every: float = 3.0
    script_flush_every: float = 4.0
    server_kill_every: float = 12.0
    server_down: float = 1.0
    bank_timeout: float = 0.03
    shim: bool = False
    drain: float = 40.0
    limit: float = 600.0
    logs: str = ""  # a directory to keep the workers' stderr in (else a temporary one)


@dataclass
class Msg:
    """One message of a user's script."""

    user: str
    k: int
    text: str
    mid: str
    ts: int
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    acked: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Delivery:
    """One delivery of a message to a worker."""

    id: str
    msg: Msg
    worker: str
    fault: str | None
    outcome: asyncio.Future[str]


@dataclass
class Proc:
    """One worker process."""

    name: str
    proc: asyncio.subprocess.Process
    ready: bool = False
    alive: bool = True
    inflight: dict[str, Delivery] = field(default_factory=dict)
    crash_t: float | None = None
    kill_t: float | None = None


@dataclass
class Run:
    """What a run leaves for the checker."""

    config: Config
    scripts: dict[str, list[Msg]]
    history: list[dict[str, Any]]
    states: dict[str, dict[str, Any]]
    bank: dict[str, tuple[str, str, int, str | None]]
    shim: bool
    seconds: float


def script(rng: random.Random, user: str, users: list[str], messages: int) -> list[str]:
    """A user's conversation: register, then top-ups, transfers, balances, a few mistakes."""
    texts = ["hi", "register", f"Name {user}", f"{rng.randrange(10000):04d}"]
    balance = 0
    while len(texts) < messages:
        roll = rng.random()
        if roll < 0.35 or balance < 5:
            amount = rng.randrange(5, 200)
            texts += ["topup", *(["lots"] if rng.random() < 0.1 else []), str(amount)]
            balance += amount
        elif roll < 0.7:
            amount = rng.randrange(1, max(2, balance // 2))
            to = rng.choice([u for u in users if u != user])
            if rng.random() < 0.2:
                texts += ["send", str(amount), to, "no", "cancel"]
            else:
                texts += ["send", str(amount), to, "yes"]
                balance -= amount
        elif roll < 0.85:
            texts.append("balance")
        elif roll < 0.93:
            texts.append("hi")
        else:
            texts += ["topup", "cancel"]
    return texts


class Dispatcher:
    """The platform, the bank and the fault injector of one run."""

    def __init__(self, config: Config, server: servers.Server, workdir: Path) -> None:
        self.config = config
        self.server = server
        self.workdir = workdir
        self.rng = random.Random(f"faults-{config.seed}")
        self.history: list[dict[str, Any]] = []
        self.procs: dict[str, Proc] = {}
        self.started = 0
        self.failed_starts = 0
        self.broken = ""
        self.deliveries = 0
        self.bank: dict[str, tuple[str, str, int, str | None]] = {}
        self.ready = asyncio.Event()
        self.faulting = True
        self.closing = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.errors: list[BaseException | None] = []
        self.restarting: asyncio.Future[None] | None = None
        self.shim = config.shim or not hasattr(AsyncRouter, "deliver")
        self.t0 = time.monotonic()

    # -- history -----------------------------------------------------------------

    def note(self, ev: str, **fields: Any) -> None:
        """Record one of the dispatcher's own events."""
        self.history.append({"ev": ev, "w": "dispatcher", "t": time.monotonic(), **fields})

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task of the run; an error in it fails the run."""
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.settled)
        return task

    def settled(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.errors.append(task.exception())

    # -- workers -------------------------------------------------------------------

    async def start_worker(self) -> None:
        """Start one worker process (it says ``ready`` on stdout when it is)."""
        self.started += 1
        name = f"w{self.started}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
        args = [sys.executable, "-m", "chaos.worker", self.server.url, NAMESPACE, name]
        args += [str(self.config.lease), *(["--shim"] if self.shim else [])]
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
                limit=1 << 20,
            )
        self.procs[name] = Proc(name, proc)
        self.note("start", worker=name, pid=proc.pid)
        self.spawn(self.watch(self.procs[name]))

    async def watch(self, p: Proc) -> None:
        """Read a worker's history lines until it exits; then redeliver what it held."""
        assert p.proc.stdout is not None
        while line := await p.proc.stdout.readline():
            if not line.endswith(b"\n"):
                break  # a line cut by the death (never happens: one write per line)
            record = json.loads(line)
            self.history.append(record)
            await self.on_record(p, record)
        await p.proc.wait()
        was_ready = p.ready
        p.alive = False
        p.ready = False
        killed_at = p.crash_t if p.crash_t is not None else p.kill_t
        self.note(
            "dead",
            worker=p.name,
            code=p.proc.returncode,
            killed_at=killed_at,
            inflight=[(d.id, d.msg.mid, d.msg.user) for d in p.inflight.values()],
        )
        for d in list(p.inflight.values()):
            if not d.outcome.done():
                d.outcome.set_result("dead")
        p.inflight.clear()
        if not was_ready and p.proc.returncode not in (-9, 137):
            self.failed_starts += 1
            if self.failed_starts > 3:
                log = (self.workdir / f"{p.name}.log").read_text()[-2000:]
                self.broken = f"workers fail to start: {log}"
                self.ready.set()
                return
        if not self.closing:
            await self.start_worker()

    async def on_record(self, p: Proc, record: dict[str, Any]) -> None:
        """Act on one worker line: readiness, a bank call, a send, an outcome."""
        ev = record["ev"]
        if ev == "ready":
            p.ready = True
            self.ready.set()
            return
        if ev == "bank":
            ok = await self.pay(record)
            await self.write(p, {"op": "bank", "rid": record["rid"], "ok": ok})
            return
        if ev == "crash":
            p.crash_t = record["t"]
            return
        d = p.inflight.get(record.get("d", ""))
        if d is None:
            return
        if ev == "send":
            d.msg.answered.set()
        elif ev in ("ack", "fail"):
            p.inflight.pop(d.id, None)
            if ev == "ack":
                d.msg.acked.set()
            if not d.outcome.done():
                d.outcome.set_result(ev)

    async def pay(self, record: dict[str, Any]) -> bool:
        """The bank: apply a movement once per key; sometimes time out after applying."""
        key = record["key"]
        applied = key not in self.bank
        if applied:
            self.bank[key] = (record["kind"], record["user"], record["amount"], record["to"])
        ok = not (self.faulting and self.rng.random() < self.config.bank_timeout)
        self.note("bank_answer", key=key, d=record["d"], applied=applied, ok=ok)
        return ok

    async def write(self, p: Proc, order: dict[str, Any]) -> bool:
        """Send one line to a worker; False when it is gone."""
        stdin = p.proc.stdin
        if not p.alive or p.proc.returncode is not None or stdin is None or stdin.is_closing():
            return False  # dead, its end not read yet: the watcher redelivers what it held
        try:
            stdin.write((json.dumps(order) + "\n").encode())
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    async def pick(self, avoid: str | None = None) -> Proc:
        """A ready worker, another than ``avoid`` when there is one."""
        while True:
            if self.broken:
                raise RuntimeError(self.broken)
            ready = [p for p in self.procs.values() if p.ready and p.alive]
            others = [p for p in ready if p.name != avoid] or ready
            if others:
                return self.rng.choice(others)
            self.ready.clear()
            await self.ready.wait()

    # -- deliveries ------------------------------------------------------------------

    async def deliver(self, msg: Msg, kind: str, avoid: str | None = None) -> Delivery:
        """Hand ``msg`` to a worker once; the delivery's outcome resolves later."""
        p = await self.pick(avoid)
        self.deliveries += 1
        fault = None
        if self.faulting and self.rng.random() < self.config.crash_share:
            fault = self.rng.choice(POINTS)
        d = Delivery(
            f"d{self.deliveries}", msg, p.name, fault, asyncio.get_running_loop().create_future()
        )
        p.inflight[d.id] = d
        self.note(
            "dispatch", d=d.id, mid=msg.mid, user=msg.user, worker=p.name, kind=kind, fault=fault
        )
        order = {"op": "msg", "d": d.id, "user": msg.user, "text": msg.text, "mid": msg.mid}
        if not await self.write(p, {**order, "ts": msg.ts, "fault": fault}):
            p.inflight.pop(d.id, None)
            if not d.outcome.done():  # the worker's death may have settled it already
                d.outcome.set_result("dead")
        return d

    async def until_acked(self, msg: Msg) -> None:
        """At least once: deliver ``msg`` again until a worker acknowledges it."""
        kind, avoid = "first", None
        while not msg.acked.is_set():
            d = await self.deliver(msg, kind, avoid)
            if kind == "first" and self.rng.random() < self.config.duplicate:
                self.spawn(self.deliver(msg, "duplicate", avoid=d.worker))
            done = asyncio.ensure_future(msg.acked.wait())
            waited, _ = await asyncio.wait(
                [d.outcome, done],
                timeout=self.config.ack_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            done.cancel()
            if msg.acked.is_set():
                break
            outcome = d.outcome.result() if d.outcome.done() else "timeout"
            if outcome == "fail":
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))  # the platform's backoff
            kind, avoid = f"after_{outcome}", d.worker
            del waited
        if self.rng.random() < self.config.redeliver_acked:
            self.spawn(self.late(msg))

    async def late(self, msg: Msg) -> None:
        """A redelivery of an acknowledged message, a little later."""
        await asyncio.sleep(self.rng.uniform(0.0, 2.0))
        d = await self.deliver(msg, "late")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(d.outcome), self.config.ack_timeout)

    async def user(self, rng: random.Random, msgs: list[Msg]) -> None:
        """A person: the next message once the last is answered (or patience ran out)."""
        k = 0
        while k < len(msgs):
            batch = (
                [msgs[k + 1], msgs[k]]
                if k + 1 < len(msgs) and rng.random() < self.config.swap
                else [msgs[k]]
            )
            for i, msg in enumerate(batch):
                if i:
                    await asyncio.sleep(0.01)
                self.note("say", mid=msg.mid, user=msg.user, swapped=len(batch) > 1)
                self.spawn(self.until_acked(msg))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(m.answered.wait() for m in batch)), self.config.patience
                )
            k += len(batch)
            await asyncio.sleep(rng.uniform(0.0, self.config.think))

    # -- faults ----------------------------------------------------------------------

    async def every(self, mean: float, action: Any) -> None:
        """Run ``action`` at random moments, from half to one and a half ``mean`` apart.

        Each fault has a random generator of its own, so that its moments depend on
        the seed alone, and a run of a given length sees about as many of each.
        """
        if mean <= 0:
            return
        rng = random.Random(f"{action.__name__}-{self.config.seed}")
        while True:
            await asyncio.sleep(rng.uniform(0.5, 1.5) * mean)
            await action()

    async def kill_worker(self) -> None:
        """SIGKILL a worker, a busy one when there is one."""
        alive = [p for p in self.procs.values() if p.alive and p.ready]
        busy = [p for p in alive if p.inflight] or alive
        if not busy:
            return
        p = self.rng.choice(busy)
        p.kill_t = time.monotonic()
        self.note(
            "kill",
            worker=p.name,
            inflight=[(d.id, d.msg.mid, d.msg.user) for d in p.inflight.values()],
        )
        with contextlib.suppress(ProcessLookupError):
            p.proc.kill()

    async def redis_command(self, *args: str) -> None:
        """One command on a fresh connection (errors while the server is down are expected)."""
        client = redis.asyncio.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=2)
        try:
            await client.execute_command(*args)
            self.note("fault", kind=" ".join(args).lower())
        except redis.RedisError as exc:
            self.note("fault", kind=" ".join(args).lower(), error=type(exc).__name__)
        finally:
            await client.aclose()

    async def client_kill(self) -> None:
        await self.redis_command("CLIENT", "KILL", "TYPE", "normal")

    async def script_flush(self) -> None:
        await self.redis_command("SCRIPT", "FLUSH")

    async def server_kill(self) -> None:
        """SIGKILL the server, start it again on its port and data directory."""
        self.note("fault", kind="server kill")
        self.server.kill()
        self.restarting = asyncio.ensure_future(self.restart())
        await asyncio.shield(self.restarting)  # the faults' end waits for it, never cancels it

    async def restart(self) -> None:
        await asyncio.sleep(self.config.server_down)
        await asyncio.to_thread(self.server.start)
        self.note("fault", kind="server up")

    # -- the run ---------------------------------------------------------------------

    async def play(self, scripts: dict[str, list[Msg]]) -> float:
        """Start the workers, play every user, stop the faults, drain; the seconds played."""
        for _ in range(self.config.workers):
            await self.start_worker()
        await asyncio.wait_for(self.ready.wait(), 60)
        self.t0 = time.monotonic()
        self.note("begin")
        c = self.config
        faults = [
            asyncio.create_task(self.every(c.kill_every, self.kill_worker)),
            asyncio.create_task(self.every(c.client_kill_every, self.client_kill)),
            asyncio.create_task(self.every(c.script_flush_every, self.script_flush)),
            asyncio.create_task(self.every(c.server_kill_every, self.server_kill)),
        ]
        users = [
            asyncio.create_task(self.user(random.Random(f"user-{c.seed}-{u}"), msgs))
            for u, msgs in scripts.items()
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*users), c.limit)
        finally:
            self.faulting = False
            for task in faults:
                task.cancel()
            outcomes = await asyncio.gather(*faults, return_exceptions=True)
            if self.restarting is not None:
                outcomes.append(*await asyncio.gather(self.restarting, return_exceptions=True))
            for outcome in outcomes:
                if not isinstance(outcome, asyncio.CancelledError | None):
                    self.errors.append(outcome)
        self.note("quiet")
        every = [m for msgs in scripts.values() for m in msgs]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(m.acked.wait() for m in every)), c.drain)
        held = [d.outcome for p in self.procs.values() if p.alive for d in p.inflight.values()]
        if held:  # late and duplicate deliveries still running: let them end
            await asyncio.wait(held, timeout=c.ack_timeout + 3)
        self.note("end")
        if self.errors:
            raise RuntimeError(f"the harness failed: {self.errors[0]!r}") from self.errors[0]
        return time.monotonic() - self.t0

    async def close(self) -> None:
        """Stop the workers (stdin closed: they finish what they hold and exit)."""
        self.closing = True
        for p in self.procs.values():
            if p.alive and p.proc.stdin is not None:
                p.proc.stdin.close()
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.proc.wait(), 30)
            except TimeoutError:
                p.proc.kill()
                await p.proc.wait()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def scripts_for(config: Config) -> dict[str, list[Msg]]:
    """Every user's messages, the same for the same seed."""
    users = [f"u{i}" for i in range(1, config.users + 1)]
    out: dict[str, list[Msg]] = {}
    for n, user in enumerate(users):
        rng = random.Random(f"script-{config.seed}-{user}")
        texts = script(rng, user, users, config.messages)
        base = 1_700_000_000 + 100_000 * n
        out[user] = [Msg(user, k, t, f"{user}.{k}", base + k) for k, t in enumerate(texts)]
    return out


async def read_states(url: str, users: list[str]) -> dict[str, dict[str, Any]]:
    """Every user's stored document, read once the run is over."""
    service = AsyncStateService(AsyncRedisBackend.from_url(url, namespace=NAMESPACE))
    try:
        return {user: await service.get(user) for user in users}
    finally:
        await service.aclose()


async def play(config: Config, server: servers.Server, workdir: Path) -> Run:
    """One whole run on ``server``."""
    scripts = scripts_for(config)
    dispatcher = Dispatcher(config, server, workdir)
    try:
        seconds = await dispatcher.play(scripts)
    finally:
        await dispatcher.close()
    states = await read_states(server.url, list(scripts))
    history, bank = dispatcher.history, dispatcher.bank
    return Run(config, scripts, history, states, bank, dispatcher.shim, seconds)


def run(config: Config) -> Run:
    """One whole run on a Redis server of its own (append-only, fsync always)."""
    server = servers.start_server("redis", "--appendonly", "yes", "--appendfsync", "always")
    workdir = Path(config.logs or tempfile.mkdtemp(prefix="chatstate-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = asyncio.run(play(config, server, workdir))
    except BaseException:
        sys.stderr.write(f"chaos: the workers' logs are kept in {workdir}\n")
        raise
    finally:
        server.cleanup()
    if not config.logs:
        shutil.rmtree(workdir, ignore_errors=True)
    return result
