"""Sending many messages: a rate limit, the send callable's identity, broadcast progress.

Pure helpers, no store access: :class:`RateLimit` paces sends (a bot's
platform caps them: Telegram about 30 messages a second, WhatsApp Cloud API 80
a second per sending number by default), :func:`send_call` calls the caller's
``send`` with the identity when it takes one, :class:`BroadcastProgress` counts.

An identity is ``<user id>:<key>``, where the key is stored with the replies
(the outbox entry's key), so a resend of the same replies has the same identity:
pass it to the platform as an idempotency key where it takes one, or keep a
short record of identities sent to drop a repeat.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Literal

import attrs

from chatstate.exceptions import ConfigurationError, UsageError

__all__ = ["BroadcastProgress", "DeliveryMode", "RateLimit"]

DeliveryMode = Literal["at-most-once", "at-least-once"]
"""How :meth:`AsyncRouter.run_due` sends: see "Sending at scale" in the flows guide."""

DELIVERY_MODES: Final = ("at-most-once", "at-least-once")
MAX_RATE: Final = 100_000.0
MAX_CONCURRENCY: Final = 10_000
MAX_KEY: Final = 200


class RateLimit:
    """At most ``per_second`` messages a second, evenly spaced, for every send that shares it.

    One ``send`` of three screens takes three messages. Pass the same object as
    ``rate=`` to :meth:`~chatstate.flow.AsyncRouter.run_due` and
    :meth:`~chatstate.flow.AsyncRouter.broadcast` so that reminders and a
    broadcast share the bot's budget. It paces this process only: with two
    processes sending for one bot, give each half the platform's rate.

    Args:
        per_second: Messages a second (more than 0, at most 100,000), e.g. 30
            for a Telegram bot, 80 for a WhatsApp Cloud API number.

    Raises:
        ConfigurationError: ``per_second`` is not a positive number within the limit.
    """

    def __init__(self, per_second: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if (
            isinstance(per_second, bool)
            or not isinstance(per_second, int | float)  # type: ignore[redundant-expr]  # callers may be untyped
            or not 0 < per_second <= MAX_RATE
        ):
            raise ConfigurationError(
                f"a rate is messages a second, more than 0 and at most {MAX_RATE:,.0f}, "
                f"not {per_second!r}"
            )
        self.per_second = float(per_second)
        self._clock = clock
        self._next = -math.inf
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RateLimit({self.per_second:g})"

    def reserve(self, messages: int = 1) -> float:
        """Book ``messages`` sends; return how many seconds to wait before making them."""
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + max(messages, 1) / self.per_second
            return start - now

    def give_back(self, messages: int = 1) -> None:
        """Return turns booked by :meth:`reserve` for sends that will not happen.

        The next booking comes that much sooner, so the rate stays what it was
        over time: a turn booked for a user who turned out busy is not lost.
        """
        if messages > 0:
            with self._lock:
                self._next -= messages / self.per_second

    async def acquire(self, messages: int = 1) -> None:
        """Wait (asyncio) until ``messages`` sends fit in the rate."""
        delay = self.reserve(messages)
        if delay > 0:
            await asyncio.sleep(delay)

    def acquire_sync(self, messages: int = 1) -> None:
        """Wait (blocking the thread) until ``messages`` sends fit in the rate."""
        delay = self.reserve(messages)
        if delay > 0:
            time.sleep(delay)


def rate_limit(rate: object) -> RateLimit | None:
    """``rate=`` as a :class:`RateLimit` (a number builds one; ``None``: no limit)."""
    if rate is None or isinstance(rate, RateLimit):
        return rate
    try:
        return RateLimit(rate)  # type: ignore[arg-type]  # checked there
    except ConfigurationError as exc:
        raise UsageError(f"rate takes messages a second or a RateLimit: {exc}") from None


def check_sending(concurrency: object, delivery: object) -> None:
    """Refuse a bad ``concurrency`` or ``delivery`` argument (``UsageError``)."""
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= MAX_CONCURRENCY
    ):
        raise UsageError(
            f"concurrency must be an int from 1 to {MAX_CONCURRENCY:,}, not {concurrency!r}"
        )
    if delivery not in DELIVERY_MODES:
        raise UsageError(f"delivery must be 'at-most-once' or 'at-least-once', not {delivery!r}")


def check_key(key: object, what: str) -> str:
    """A scheduled message's key or a broadcast id: a non-empty str of at most 200 characters."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise UsageError(f"{what} must be a non-empty str of at most {MAX_KEY} characters")
    return key


def identity(user_id: str, key: str) -> str:
    """The identity a send gets: the user and the stored replies' key."""
    return f"{user_id}:{key}"


def event_key(events: list[str]) -> str:
    """One key for the events a due round fired together (short, and the same every time)."""
    joined = "+".join(sorted(events))
    if len(joined) <= MAX_KEY:
        return f"due:{joined}"
    return "due:" + hashlib.sha256(joined.encode()).hexdigest()[:32]


def takes_identity(send: Callable[..., Any]) -> bool:
    """Whether ``send`` has a parameter named ``identity`` (or ``**kwargs``)."""
    try:
        parameters = inspect.signature(send).parameters.values()
    except (TypeError, ValueError):
        return False
    for p in parameters:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return True
        if p.name == "identity" and p.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False


def _bind_error(function: Callable[..., Any], *args: Any, **kwargs: Any) -> str | None:
    """Why ``function`` cannot take these arguments; None if it can, or if its signature is unknown.

    A function whose signature cannot be read (some built-ins) is left to its first call.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return None


def check_send(send: Callable[..., Any], keyed: bool, what: str) -> None:
    """Raise :class:`UsageError` when ``send`` cannot be called as ``what`` will call it.

    Checked when ``run_due`` or ``broadcast`` starts: a wrong signature would
    fail every send, each only logged (at most once: every message lost; at
    least once: each retried forever).
    """
    if keyed:
        why = _bind_error(send, "user", [], identity="user:key")
    else:
        why = _bind_error(send, "user", [])
    if why is not None:
        shape = "send(user_id, replies, identity=...)" if keyed else "send(user_id, replies)"
        raise UsageError(f"{what} calls {shape}, which this send cannot take: {why}")


def check_progress(on_progress: object) -> None:
    """Raise :class:`UsageError` unless ``on_progress`` is None or takes one argument."""
    if on_progress is None:
        return
    if not callable(on_progress):
        raise UsageError(
            f"on_progress takes a function of the progress, or None, not {on_progress!r}"
        )
    why = _bind_error(on_progress, None)
    if why is not None:
        raise UsageError(f"broadcast calls on_progress(progress), which it cannot take: {why}")


@attrs.define
class BroadcastProgress:
    """How far a broadcast got; :meth:`~chatstate.flow.AsyncRouter.broadcast` returns it.

    Attributes:
        broadcast_id: The broadcast.
        total: Users seen so far (all of them once ``done``: a list given as
            ``users`` is read as the broadcast goes, like the backend's listing).
        sent: Users whose ``send`` succeeded in this run (a resumed user counts here).
        skipped: Users who had it already (sent by an earlier run).
        failed: Users whose ``send`` failed, or who stayed busy longer than the
            router's ``wait``: run the broadcast again to retry them (their
            replies stay stored; ``run_due`` resends them too).
        done: Every user was handled.
    """

    broadcast_id: str
    total: int = 0
    sent: int = 0
    skipped: int = 0
    failed: int = 0
    done: bool = False

    @property
    def handled(self) -> int:
        """``sent + skipped + failed``."""
        return self.sent + self.skipped + self.failed
