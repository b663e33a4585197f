"""Values as ``json.dumps`` writes them: what the framework integrations store.

aiogram's own ``RedisStorage`` stores FSM data with ``json.dumps``, which writes
an enum member as its value and a tuple as a list; the aiogram and
python-telegram-bot integrations store the same, so a bot moving to chatstate
keeps working. Neither integration may import the other's framework, so the
conversion lives here, in the house.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Final

__all__ = ["plain"]

_DEPTH: Final = 256


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as ``json.dumps`` writes it: enum members as their values, tuples as lists.

    Dict keys that are enum members become their values too. Anything else is
    left for the store to take or refuse (so a set still raises
    :class:`~chatstate.exceptions.SerializationError`).

    Examples:
        >>> import enum
        >>> class Step(enum.IntEnum):
        ...     NAME = 1
        >>> plain({"step": Step.NAME, "pair": (1, (2, 3)), Step.NAME.name: {4}})
        {'step': 1, 'pair': [1, [2, 3]], 'NAME': {4}}
    """
    if depth > _DEPTH:  # deeper than any store accepts: left for it to refuse
        return value
    if isinstance(value, Enum):
        return plain(value.value, depth + 1)
    if isinstance(value, dict):
        return {
            (k.value if isinstance(k, Enum) else k): plain(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value]
    return value
