"""The protocols of a backend: what it must do, and each optional capability.

A backend is a :class:`Backend` (or :class:`AsyncBackend`): ``load``, ``apply``
and ``close``. Each optional capability is one protocol, checked with
``isinstance`` where chatstate needs it (never by looking for a method by
name): :class:`Listing`, :class:`Locking`, :class:`DeadlineIndex`,
:class:`Erasing`, :class:`Pinging`, :class:`StoresSchema` (and
:class:`chatstate.observe.Describing`). The public face for backend authors is
:mod:`chatstate.state.backend`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Protocol, runtime_checkable

from chatstate.state._backend import Outcome, Snapshot, Write

__all__ = [
    "AsyncBackend",
    "AsyncDeadlineIndex",
    "AsyncErasing",
    "AsyncListing",
    "AsyncLocking",
    "AsyncPinging",
    "Backend",
    "DeadlineIndex",
    "Erasing",
    "Listing",
    "Locking",
    "Pinging",
    "StoresSchema",
    "stores_schema",
]


@runtime_checkable
class Backend(Protocol):
    """A synchronous store of one document and one operation log per user id."""

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``. Never creates anything."""
        ...

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically (see :func:`apply_write` for the rules).

        Raises:
            StateTooLargeError: the result would exceed ``write.max_bytes``;
                nothing was written.
            OpIdReusedError: the operation key came back with another digest.
            CounterError: an increment met a non-integer or overflowed.
            CorruptStateError: the stored data is not a document; nothing was written.
            BackendError: the store failed.
        """
        ...

    def close(self) -> None:
        """Release what the backend owns. Clients passed in by the caller stay open."""
        ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The asyncio twin of :class:`Backend`."""

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``. Never creates anything."""
        ...

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically (see :meth:`Backend.apply`)."""
        ...

    async def aclose(self) -> None:
        """Release what the backend owns. Clients passed in by the caller stay open."""
        ...


# -- per-user locks ---------------------------------------------------------------


@runtime_checkable
class Locking(Protocol):
    """What a backend adds to hold a named per-user lock across processes (optional).

    The single-flight token refresh (:mod:`chatstate.auth`) and aiogram's event
    isolation use it; over a backend without it they fall back to a lock of
    this process (and log a warning once).
    """

    def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the user's lock ``name`` for a block.

        Raises:
            LockTimeoutError: it was not free within ``wait`` seconds.
            LockLostError: the ``lease`` ran out while held (another holder
                may have run meanwhile); raised when the block ends.
        """
        ...


@runtime_checkable
class AsyncLocking(Protocol):
    """The asyncio twin of :class:`Locking`."""

    def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """See :meth:`Locking.lock` (used with ``async with``)."""
        ...


# -- optional capabilities: erasing, pinging, schema versions ----------------------


@runtime_checkable
class Erasing(Protocol):
    """What a backend adds to remove everything it keeps for a user (optional).

    Without it :meth:`StateService.erase <chatstate.StateService.erase>` raises
    :class:`~chatstate.exceptions.UsageError`.
    """

    def erase(self, user_id: str) -> list[str]:
        """Remove the user's document, op ids, claim, locks and deadline entry.

        Returns the names of :data:`ERASED_PARTS` there were (``[]``: nothing).
        """
        ...


@runtime_checkable
class AsyncErasing(Protocol):
    """The asyncio twin of :class:`Erasing`."""

    async def erase(self, user_id: str) -> list[str]:
        """See :meth:`Erasing.erase`."""
        ...


@runtime_checkable
class Pinging(Protocol):
    """What a backend adds to answer health checks (optional; without it, ``ping()`` is 0)."""

    def ping(self) -> float:
        """Round-trip the store once; return the latency in seconds.

        Raises:
            BackendUnavailable: the store cannot be reached.
        """
        ...


@runtime_checkable
class AsyncPinging(Protocol):
    """The asyncio twin of :class:`Pinging`."""

    async def ping(self) -> float:
        """See :meth:`Pinging.ping`."""
        ...


@runtime_checkable
class StoresSchema(Protocol):
    """What a backend adds to store schema versions (see "Writing a backend").

    A backend whose ``stores_schema`` is ``True`` stores, per document, the
    schema version :func:`apply_write` returns and hands it back as
    :attr:`Snapshot.schema`; ``StateData(schema_version=...)`` needs one.
    """

    stores_schema: bool


def stores_schema(backend: object) -> bool:
    """Whether ``backend`` stores schema versions (a :class:`StoresSchema` saying ``True``)."""
    return isinstance(backend, StoresSchema) and backend.stores_schema is True


# -- listing users ------------------------------------------------------------------


@runtime_checkable
class Listing(Protocol):
    """What a backend adds to list the users it holds a document for (optional).

    :meth:`StateService.users <chatstate.StateService.users>`, the command line
    and framework start-up loads (python-telegram-bot's ``get_user_data``) use
    it; over a backend without it they raise
    :class:`~chatstate.exceptions.ConfigurationError`.
    """

    def users(self, prefix: str = "") -> Iterator[str]:
        """Every user id with a live document that starts with ``prefix``, as a lazy iterator.

        A user stored for the whole iteration is yielded at least once (a
        backend that scans may yield one twice); one written or removed while
        it runs may or may not be. Nothing is held between steps.
        """
        ...


@runtime_checkable
class AsyncListing(Protocol):
    """The asyncio twin of :class:`Listing`."""

    def users(self, prefix: str = "") -> AsyncIterator[str]:
        """See :meth:`Listing.users` (used with ``async for``)."""
        ...


# -- the deadline index ----------------------------------------------------------


@runtime_checkable
class DeadlineIndex(Protocol):
    """What a backend adds to keep flow deadlines (reminders, timeouts) in the store.

    Optional: a :class:`~chatstate.flow.Router` over a backend with these three
    methods can fire due reminders and timeouts with ``due()``; over one
    without, a flow's timeout still applies at the user's next message. One
    entry per user; times are milliseconds on the router's clock.
    """

    def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """Set the user's entry to ``at_ms``; with ``earlier_only``, never move it later."""
        ...

    def unschedule(self, user_id: str) -> None:
        """Remove the user's entry, if any."""
        ...

    def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """Up to ``limit`` ``(user_id, at_ms)`` entries with ``at_ms <= now_ms``, earliest first.

        Nothing is removed: an entry stays until it is rescheduled or removed,
        so a deadline whose handling failed comes due again.
        """
        ...


@runtime_checkable
class AsyncDeadlineIndex(Protocol):
    """The asyncio twin of :class:`DeadlineIndex`."""

    async def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """See :meth:`DeadlineIndex.schedule`."""
        ...

    async def unschedule(self, user_id: str) -> None:
        """See :meth:`DeadlineIndex.unschedule`."""
        ...

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """See :meth:`DeadlineIndex.due`."""
        ...
