"""Heartbeats: a held claim's (or lock's) lease renewed while its holder lives.

A claim's lease says how long a user stays held after the holder's process
died. Kept short (5 s by default), it would also lapse under a handler that
legitimately works longer, so the claim is renewed every third of its lease
while it is open: a dead process stops renewing and its users are free again
within one lease, a slow live one keeps them.

A heartbeat holds its claim only weakly: a claim that is dropped without being
committed or released (a bug in the caller) stops being renewed once it is
collected, and then lapses like a dead process's.

``heartbeat_async`` (the running event loop's timers; a renewal is a task of
its own) and ``heartbeat_sync`` (one daemon thread per process for all sync
claims) are the twins' one difference here: ``tools/unasync.py`` puts the
second in place of the first in the generated sync service.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

__all__ = ["Beat", "heartbeat_async", "heartbeat_sync"]

log = logging.getLogger("chatstate.state")


class Beat(Protocol):
    """A running heartbeat: stopped once its claim is settled."""

    def stop(self) -> None:
        """Renew no more (a renewal under way finishes; it cannot take a settled claim)."""
        ...


class _AsyncBeat:
    """Renews on the running loop: a timer, then a task per renewal."""

    __slots__ = ("__weakref__", "_handle", "_interval", "_loop", "_renew", "_stopped", "_task")

    def __init__(self, renew: Callable[[], Awaitable[bool]], interval: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._renew = renew
        self._interval = interval
        self._stopped = False
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(interval, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._stopped:
            self._task = self._loop.create_task(self._beat())

    async def _beat(self) -> None:
        try:
            held = await self._renew()
        except Exception:  # a store hiccup: the next beat tries again
            log.warning("could not renew a lease; trying again", exc_info=True)
            held = True
        if held and not self._stopped:
            self._handle = self._loop.call_later(self._interval, self._fire)

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def heartbeat_async(claim: Any, renew: Callable[[Any], Awaitable[bool]], interval: float) -> Beat:
    """Call ``renew(claim)`` every ``interval`` seconds on the running loop until stopped.

    ``renew`` returns False when the claim is no longer held: the beat ends.
    """
    ref = weakref.ref(claim)

    async def beat() -> bool:
        held = ref()
        return held is not None and await renew(held)

    return _AsyncBeat(beat, interval)


class _ThreadBeats:
    """One daemon thread that renews every open sync claim of the process when due.

    Claims come and go far more often than they are renewed (most commit within
    a few milliseconds), so adding and removing one is a dict operation under a
    lock, and the thread looks for due claims only when the earliest is due.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: dict[int, _ThreadBeat] = {}
        self._wake = math.inf  # when the thread means to look next
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, beat: _ThreadBeat) -> None:
        with self._cond:
            if self._thread is None or self._pid != os.getpid():
                # None yet, or a forked child (threads do not survive a fork).
                self._active, self._pid, self._wake = {}, os.getpid(), math.inf
                self._thread = threading.Thread(
                    target=self._run, name="chatstate-heartbeat", daemon=True
                )
                self._thread.start()
            self._active[id(beat)] = beat
            if beat.due < self._wake:
                self._wake = beat.due
                self._cond.notify()

    def discard(self, beat: _ThreadBeat) -> None:
        with self._cond:
            self._active.pop(id(beat), None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = [b for b in self._active.values() if b.due <= now]
                    if due:
                        break
                    self._wake = min((b.due for b in self._active.values()), default=math.inf)
                    self._cond.wait(None if self._wake == math.inf else self._wake - now)
            for beat in due:
                if not beat.beat():
                    self.discard(beat)


_beats = _ThreadBeats()


class _ThreadBeat:
    __slots__ = ("_interval", "_renew", "due", "stopped")

    def __init__(self, renew: Callable[[], bool], interval: float) -> None:
        self._renew = renew
        self._interval = interval
        self.due = time.monotonic() + interval
        self.stopped = False

    def beat(self) -> bool:
        """Renew once; True when it should go on."""
        if self.stopped:
            return False
        try:
            held = self._renew()
        except Exception:  # a store hiccup: the next beat tries again
            log.warning("could not renew a lease; trying again", exc_info=True)
            held = True
        self.due = time.monotonic() + self._interval
        return held and not self.stopped

    def stop(self) -> None:
        self.stopped = True
        _beats.discard(self)


def heartbeat_sync(claim: Any, renew: Callable[[Any], bool], interval: float) -> Beat:
    """Call ``renew(claim)`` every ``interval`` seconds from the heartbeat thread until stopped."""
    ref = weakref.ref(claim)

    def beat() -> bool:
        held = ref()
        return held is not None and renew(held)

    found = _ThreadBeat(beat, interval)
    _beats.add(found)
    return found
