"""Scheduled messages as they are stored: pure building, reading and checking, no I/O.

A user's scheduled messages live in their document, under the router's
``scheduled_field``, as ``{key: [at_ms, [screen, ...], flow name or null]}``:
written with the user's other state (so they survive restarts, move with
exports and go with ``erase()``), and indexed in the backend's deadline index
like a flow's deadline (the user's entry is the earliest of their deadlines).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from chatstate.exceptions import UsageError
from chatstate.flow._screens import Buttons, ListScreen, Text, screen_from_json, screen_to_json
from chatstate.flow._sending import check_key

__all__ = [
    "due_scheduled",
    "scheduled_entry",
    "scheduled_times",
    "screens_of",
    "stored_scheduled",
]

MAX_SECONDS = 1e11  # the year 5138: a time beyond is a unit mistake (milliseconds)


def at_ms(at: object) -> int:
    """``at`` (an aware datetime or Unix seconds) in Unix milliseconds."""
    if isinstance(at, datetime):
        if at.tzinfo is None or at.utcoffset() is None:
            raise UsageError(
                "a scheduled time must be an aware datetime (with tzinfo), or Unix seconds"
            )
        seconds = at.timestamp()
    elif isinstance(at, bool) or not isinstance(at, int | float):
        raise UsageError(f"a scheduled time is a datetime or Unix seconds, not {at!r}")
    else:
        seconds = float(at)
    if not 0 <= seconds < MAX_SECONDS:
        raise UsageError(f"a scheduled time must be Unix seconds after 1970, not {at!r}")
    return math.ceil(seconds * 1000)


def screens_of(replies: object) -> list[Any]:
    """``replies`` (a text, a screen, or a list of them) as stored JSON screens."""
    if replies is None:
        return []
    if isinstance(replies, str | Text | Buttons | ListScreen):
        replies = [replies]
    if not isinstance(replies, list | tuple):
        raise UsageError(f"replies takes a text, a screen or a list of them, not {replies!r}")
    screens = [Text(r) if isinstance(r, str) else r for r in replies]
    for screen in screens:
        if not isinstance(screen, Text | Buttons | ListScreen):
            raise UsageError(f"replies takes texts and screens, not {screen!r}")
    return [screen_to_json(s) for s in screens]


def scheduled_entry(
    key: object, at: object, replies: object, start: object, flows: Mapping[str, Any]
) -> list[Any]:
    """The stored form of a scheduled message, checked (``UsageError`` when it is wrong)."""
    check_key(key, "a scheduled message's key")
    when = at_ms(at)
    screens = screens_of(replies)
    flow_name = None
    if start is not None:
        name = start if isinstance(start, str) else getattr(start, "name", None)
        known = flows.get(name) if isinstance(name, str) else None
        if known is None or (not isinstance(start, str) and known is not start):
            raise UsageError(
                f"the router does not know the flow {name!r}: put it in a menu or in flows="
            )
        flow_name = known.name
    if not screens and flow_name is None:
        raise UsageError("a scheduled message needs replies, a flow to start (start=), or both")
    return [when, screens, flow_name]


def stored_scheduled(doc: Mapping[str, Any], field: str) -> dict[str, list[Any]]:
    """The user's scheduled messages that are well formed (others are ignored)."""
    box = doc.get(field)
    if not isinstance(box, dict):
        return {}
    return {
        k: e
        for k, e in box.items()
        if isinstance(e, list) and len(e) == 3 and type(e[0]) is int and isinstance(e[1], list)
    }


def scheduled_times(doc: Mapping[str, Any], field: str) -> list[int]:
    """When each of the user's scheduled messages is due (ms)."""
    return [e[0] for e in stored_scheduled(doc, field).values()]


def due_scheduled(
    doc: Mapping[str, Any], field: str, now_ms: int
) -> list[tuple[str, int, list[Any], str | None]]:
    """The scheduled messages due at ``now_ms``, earliest first: key, time, screens, flow."""
    found = [
        (key, e[0], [screen_from_json(s) for s in e[1]], e[2] if isinstance(e[2], str) else None)
        for key, e in stored_scheduled(doc, field).items()
        if e[0] <= now_ms
    ]
    found.sort(key=lambda f: (f[1], f[0]))
    return found
