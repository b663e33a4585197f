"""10,000 reminders due at once, two run_due processes, one killed with SIGKILL mid-run.

    python benchmarks/bench_due.py [--backend redis|sqlite|both] [--reminders 10000]
        [--send-ms 50] [--rate 1000] [--concurrency 128] [--kill-at 0.3]
        [--mode due|broadcast] [--hold-after K] [--json]

Schedules ``--reminders`` messages (one per user) due now, on a throwaway
redis-server (from PATH, on a random loopback port) or a SQLite file in a
temporary directory, then starts two processes that run
``AsyncRouter.run_due(send, delivery="at-least-once", rate=--rate,
concurrency=--concurrency)`` (lease 1 s, resend_after 1 s). ``send`` sleeps
``--send-ms`` and appends ``pid identity time`` to a log. Once ``--kill-at`` of
the reminders were sent, the first process gets ``kill -9``. It prints: every
reminder sent (distinct identities), repeats (an identity sent twice: only what
the killed process had in flight), and when the last reminder was first sent,
against the bound ``reminders / rate + 2 s`` (``--rate`` is per process).

``--mode broadcast`` does the same for a broadcast: two processes run
``broadcast(...)`` over the same users, one is killed, the other finishes (and
resumes what the killed one left).

Both processes connect, then wait at a gate and start together. ``--hold-after K``
makes the run a fixed sequence, for the test suite: the first process starts
alone, and every send after its K-th logs its line and then never returns (a
platform that took the message while the process never heard back); once it has
``--concurrency`` sends held, the second process starts; once the second has
sent (``due``; a broadcast waits on the held users' claims instead), the first
is killed. Nothing then depends on which process is faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from chatstate import AsyncStateService, RedisBackend, StateService
from chatstate.flow import AsyncRouter, Menu, MenuItem, Router
from chatstate.state import AsyncRedisBackend, AsyncSqliteBackend, SqliteBackend

MENU = Menu("M", [MenuItem("help", "Help", handler=lambda _ctx: "Help.")])
NAMESPACE = "bench-due"
LEASE = 1.0
RESEND_AFTER = 1.0


def _service(backend: str, target: str) -> StateService:
    if backend == "redis":
        return StateService(RedisBackend.from_url(target, namespace=NAMESPACE))
    return StateService(SqliteBackend(target))


def _async_service(backend: str, target: str) -> AsyncStateService:
    if backend == "redis":
        return AsyncStateService(AsyncRedisBackend.from_url(target, namespace=NAMESPACE))
    return AsyncStateService(AsyncSqliteBackend(target))


def _users(n: int) -> list[str]:
    return [f"user-{i:06d}" for i in range(n)]


def setup(backend: str, target: str, n: int, mode: str) -> float:
    """Schedule one reminder per user, due now (``due``), or create the users (``broadcast``)."""
    service = _service(backend, target)
    router = Router(service, main_menu=MENU)
    now = time.time()
    for user in _users(n):
        if mode == "due":
            router.schedule(user, "reminder", now, f"Reminder for {user}")
        else:
            service.update(user, {"subscribed": True})
    service.close()
    return now


def worker(backend: str, target: str, log: str, options: dict[str, Any], role: str) -> None:
    """One process: run_due (or broadcast) until killed, logging every send.

    It writes ``<log>.<role>.ready`` once connected and starts when ``<log>.go``
    exists; the ``victim`` of a ``hold_after`` run holds its sends after that many.
    """

    async def main() -> None:
        router = AsyncRouter(
            _async_service(backend, target),
            main_menu=MENU,
            lease=LEASE,
            resend_after=RESEND_AFTER,
            wait=30,
        )
        await router.service.ping()
        pid = os.getpid()
        out = open(log, "a", encoding="utf-8")  # noqa: ASYNC230, PTH123, SIM115 - for the whole run
        hold = options["hold_after"] if role == "victim" else None
        sent = 0
        Path(f"{log}.{role}.ready").write_text(str(pid))  # noqa: ASYNC240 - once
        while not Path(f"{log}.go").exists():  # noqa: ASYNC110, ASYNC240 - a file gate
            await asyncio.sleep(0.01)

        async def send(_user_id: str, _replies: list[Any], identity: str) -> None:
            nonlocal sent
            await asyncio.sleep(options["send_ms"] / 1000)
            out.write(f"{pid} {identity} {time.time():.4f}\n")
            out.flush()
            sent += 1
            if hold is not None and sent > hold:
                await asyncio.Event().wait()  # taken by the platform, never confirmed

        if options["mode"] == "due":
            await router.run_due(
                send,
                interval=0.05,
                limit=500,
                concurrency=options["concurrency"],
                rate=options["rate"],
                delivery="at-least-once",
            )
        else:
            await router.broadcast(
                "news-1",
                "Our news.",
                send,
                users=_users(options["reminders"]),
                concurrency=options["concurrency"],
                rate=options["rate"],
            )

    asyncio.run(main())


def _read(log: Path) -> list[tuple[int, str, float]]:
    rows = []
    for line in log.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 3:
            rows.append((int(parts[0]), parts[1], float(parts[2])))
    return rows


def _start(argv: list[str], log: Path, role: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([*argv, role])  # noqa: S603 - our own script
    ready = Path(f"{log}.{role}.ready")
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(
                f"the {role} process exited with {proc.returncode} before it was ready"
            )
        time.sleep(0.01)
    return proc


def _wait_for(what: str, done: Callable[[], bool], procs: list[subprocess.Popen[bytes]]) -> None:
    """Polls ``done``; fails at once if a process exits, or after 600 s (a hang guard)."""
    limit = time.time() + 600
    while not done():
        if any(proc.poll() is not None for proc in procs) and not done():
            codes = [proc.returncode for proc in procs]
            raise RuntimeError(f"a worker exited ({codes}) while waiting for {what}")
        if time.time() > limit:
            raise RuntimeError(f"no progress: waiting for {what}")
        time.sleep(0.02)


def run(backend: str, target: str, options: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Set up, run two workers, kill one, wait for every reminder; the figures."""
    n = options["reminders"]
    log = workdir / f"sent-{backend}-{options['mode']}.log"
    log.write_text("")
    setup(backend, target, n, options["mode"])
    argv = [sys.executable, __file__, "worker", backend, target, str(log), json.dumps(options)]
    go = Path(f"{log}.go")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        killed = _start(argv, log, "victim")
        procs.append(killed)
        if options["hold_after"] is None:
            procs.append(_start(argv, log, "survivor"))
            start = time.time()
            go.write_text("")

            def progressed() -> bool:
                rows = _read(log)
                return len(rows) >= options["kill_at"] * n and any(
                    pid == killed.pid for pid, _, _ in rows
                )

            _wait_for("the first process to send its share", progressed, procs)
        else:
            start = time.time()
            go.write_text("")
            held = options["hold_after"] + min(options["concurrency"], n - options["hold_after"])
            _wait_for("the first process to hold its sends", lambda: len(_read(log)) >= held, procs)
            survivor = _start(argv, log, "survivor")
            procs.append(survivor)
            if options["mode"] == "due":  # run_due passes over busy users; broadcast waits for them
                _wait_for(
                    "the second process to send",
                    lambda: any(pid == survivor.pid for pid, _, _ in _read(log)),
                    procs,
                )
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        killed_at = time.time()
        survivors = procs[1:]
        _wait_for("every reminder", lambda: len({i for _, i, _ in _read(log)}) >= n, survivors)
        time.sleep(LEASE + RESEND_AFTER + 1)  # room for a stray resend to show up
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return _figures(backend, options, _read(log), killed.pid, start, killed_at)


def _figures(  # noqa: PLR0917 - one run's facts
    backend: str,
    options: dict[str, Any],
    rows: list[tuple[int, str, float]],
    killed_pid: int,
    start: float,
    killed_at: float,
) -> dict[str, Any]:
    """What the log says: every identity sent, which twice, by whom, and when."""
    n = options["reminders"]
    first: dict[str, tuple[int, float]] = {}
    repeats: list[tuple[str, int]] = []
    for pid, identity, at in rows:
        if identity in first:
            repeats.append((identity, first[identity][0]))
        else:
            first[identity] = (pid, at)
    expected = {f"{u}:due:reminder@" for u in _users(n)} if options["mode"] == "due" else set()
    last = max(at for _, at in first.values()) - start
    return {
        "backend": backend,
        "mode": options["mode"],
        "reminders": n,
        "sent": len(first),
        "all_sent": len(first) == n,
        "repeats": len(repeats),
        "repeats_first_sent_by_killed": all(pid == killed_pid for _, pid in repeats),
        "by_killed": sum(1 for pid, _ in first.values() if pid == killed_pid),
        "killed_after_s": round(killed_at - start, 2),
        "last_sent_s": round(last, 2),
        "bound_s": round(n / options["rate"] + 2, 2),
        "within_bound": last <= n / options["rate"] + 2,
        "expected_prefixes_ok": (
            not expected
            or all(i.split("@")[0] + "@" in expected for i in first)  # one identity per user
        ),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5]), sys.argv[6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["redis", "sqlite", "both"], default="both")
    parser.add_argument("--reminders", type=int, default=10_000)
    parser.add_argument("--send-ms", type=float, default=50)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--kill-at", type=float, default=0.3)
    parser.add_argument("--mode", choices=["due", "broadcast"], default="due")
    parser.add_argument(
        "--hold-after",
        type=int,
        default=None,
        help="a fixed sequence instead of --kill-at: the first process holds its sends after K",
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per backend")
    args = parser.parse_args()
    options = {
        "reminders": args.reminders,
        "send_ms": args.send_ms,
        "rate": args.rate,
        "concurrency": args.concurrency,
        "kill_at": args.kill_at,
        "mode": args.mode,
        "hold_after": args.hold_after,
    }
    backends = ["redis", "sqlite"] if args.backend == "both" else [args.backend]
    import servers

    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="bench-due-") as tmp:
            workdir = Path(tmp)
            server = servers.start_server("redis") if backend == "redis" else None
            try:
                target = server.url if server is not None else str(workdir / "state.db")
                result = run(backend, target, options, workdir)
            finally:
                if server is not None:
                    server.cleanup()
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"{backend}: {result['sent']:,}/{result['reminders']:,} sent, "
                f"{result['repeats']} repeated (all first sent by the killed process: "
                f"{result['repeats_first_sent_by_killed']}), "
                f"{result['by_killed']:,} by the killed process, killed at "
                f"{result['killed_after_s']} s, last first sent at {result['last_sent_s']} s "
                f"(bound {result['bound_s']} s: {'ok' if result['within_bound'] else 'MISSED'})"
            )


if __name__ == "__main__":
    main()
