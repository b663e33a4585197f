"""Durations given as seconds or a ``timedelta``, checked and turned into milliseconds.

Shared by every room that takes a lease, a TTL or a timeout.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Final

from chatstate.exceptions import ConfigurationError

__all__ = ["to_ms"]


def to_ms(value: float | timedelta | None, name: str) -> int | None:
    """Seconds or a timedelta as whole milliseconds (at least 1).

    Raises:
        ConfigurationError: the value is not positive.
    """
    if value is None:
        return None
    try:
        return _to_ms_cached(value, name)
    except TypeError:  # unhashable, so not a number: say so below
        return _to_ms(value, name)


@functools.lru_cache(maxsize=256, typed=True)  # typed: True must not hit the entry of 1
def _to_ms_cached(value: float | timedelta, name: str) -> int:
    return _to_ms(value, name)


def _to_ms(value: float | timedelta, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise ConfigurationError(f"{name} must be seconds or a timedelta, got {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 < seconds <= _MAX_SECONDS:
        raise ConfigurationError(f"{name} must be positive and at most ten years, got {value!r}")
    return max(1, round(seconds * 1000))


_MAX_SECONDS: Final = 10 * 365 * 24 * 3600
