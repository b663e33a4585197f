"""Where the PostgreSQL twins differ: one helper pair per difference (see ``chatstate._twins``).

The asyncio source calls the ``*_async`` variant; ``tools/unasync.py`` renames
the call to the ``*_sync`` one in the generated twin.
"""

from __future__ import annotations

import asyncio
import threading
import time

__all__ = ["new_lock_async", "new_lock_sync", "pause_async", "pause_sync"]


def new_lock_async() -> asyncio.Lock:
    """Guards the first use (pool opened, tables checked) among the tasks of one loop."""
    return asyncio.Lock()


def new_lock_sync() -> threading.Lock:
    """Guards the first use among threads."""
    return threading.Lock()


async def pause_async(seconds: float) -> None:
    """Wait before sending again, letting the loop's other tasks run."""
    await asyncio.sleep(seconds)


def pause_sync(seconds: float) -> None:
    """Wait before sending again."""
    time.sleep(seconds)
