"""Automatic pipelining for the asyncio Redis backend.

Commands that many tasks issue at the same moment go to the server together: one
write of all of them and one read of all replies per connection, instead of one
round trip each. Each command is still its own atomic ``EVALSHA`` with its own
reply and its own error.

- **Lanes.** A user's commands always go through the same lane (by the hash of
  its key), and a lane sends one batch at a time, in the order the commands
  came: a user's commands reach the server in the order they were issued.
  Several lanes (each with its own connection) keep the server and the client
  busy at once.
- **Cancellation.** A task cancelled before its command was sent is dropped
  from the batch; one cancelled after is answered into the void. Replies are
  read by the lane's own task, which no caller's cancellation interrupts, so
  replies can never be mixed up between callers.
- **Failures.** A connection that cannot be had means nothing was sent
  (:class:`NotSent`). A connection lost while sending or reading fails every
  command whose reply was not read; the callers send an idempotent command
  again, and settle a write with its operation key and nonce.
- **A tail after a write.** A command may bring a tail (``WAIT``, for
  ``durability=``) that must follow it on the same connection: ``WAIT`` counts
  the replicas that acknowledged every earlier write *of its connection*. The
  tail is sent in the same round trip, and its replies come back beside the
  command's (an error reply among them as an exception object: the command
  itself ran). In a batch one copy of each distinct tail goes after all the
  batch's commands: it covers every write before it on the connection, so each
  caller's own write is covered, and a batch of writes waits once, not once per
  write. A caller with a tail is answered only once the tail's reply is read;
  when the connection breaks before that, it gets the failure (its write may
  have run: it is re-sent with its op key, and waits again).
- **Connections the server closed.** An idle connection owes no reply, so one
  whose socket has anything to read (the end of the stream, a reset) was
  closed by the server while it waited (``CLIENT KILL``, a restart, its idle
  ``timeout``). It is dropped when it is taken, before a command is written on
  it, and another is used: nothing was sent, so the command never fails for
  it, and a restart that left every idle connection dead costs one new
  connection, not one failed attempt per dead one.

This asymmetry with the sync backend is deliberate: threads each wait on their
own connection, so only asyncio can gather concurrent commands without adding
latency to any of them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis.exceptions as rex

__all__ = [
    "AsyncConnections",
    "AutoPipeline",
    "Connections",
    "NotSent",
    "closed_by_server",
    "closed_by_server_async",
    "pack",
]


def pack(args: tuple[Any, ...]) -> bytes:
    """The RESP encoding of a command (str arguments as UTF-8).

    Written here rather than left to redis-py: chatstate's commands are a few
    plain strings, and this is several times cheaper than redis-py's packer.
    """
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if type(arg) is str else arg if type(arg) is bytes else b"%d" % arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class NotSent(Exception):  # noqa: N818 - a state, like redis-py's own names
    """No connection could be had: the command was not sent. ``__cause__`` says why."""


_UNKNOWN: Any = object()


def _readable(sock: Any) -> bool:
    """True when a socket has something to read now (data, the end of the stream, a reset)."""
    try:
        return bool(select.select((sock,), (), (), 0)[0])
    except (OSError, ValueError):  # closed meanwhile (a file number of -1)
        return True


def closed_by_server(conn: Any) -> bool:
    """True when an idle connection of the sync client is no longer usable.

    It owes no reply, so anything to read means the server closed it (or sent
    what no command asked for): either way it must not carry a command. One
    ``select`` of the socket, about half a microsecond. A connection class
    without the attribute this looks at is trusted as it is.
    """
    sock = getattr(conn, "_sock", _UNKNOWN)
    if sock is _UNKNOWN:
        return False
    return sock is None or _readable(sock)


def closed_by_server_async(conn: Any) -> bool:
    """The asyncio twin of :func:`closed_by_server`, for ``redis.asyncio`` connections.

    The socket itself is asked, not only the stream: the event loop may not
    have run since the server's FIN arrived, so the stream may not know yet.
    """
    writer = getattr(conn, "_writer", _UNKNOWN)
    if writer is _UNKNOWN:
        return False
    if writer is None:
        return True
    transport = writer.transport
    reader = conn._reader  # noqa: SLF001 - redis-py keeps its stream here
    if transport.is_closing() or reader is None or reader.at_eof():
        return True
    sock = transport.get_extra_info("socket")
    return sock is not None and _readable(sock)


Tail = tuple[tuple[Any, ...], ...]
"""Commands that must follow a command on its connection (``PUBLISH``, ``WAIT``), or ``()``."""

_Item = tuple[tuple[Any, ...], Tail, asyncio.Future[Any]]


def _read_tail(read: Callable[[], Any], tail: Tail) -> list[Any]:
    """Read a tail's replies; error replies are kept as exception objects, not raised."""
    replies: list[Any] = []
    for _ in tail:
        try:
            replies.append(read())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


async def _read_tail_async(read: Callable[[], Any], tail: Tail) -> list[Any]:
    """The asyncio twin of :func:`_read_tail`."""
    replies: list[Any] = []
    for _ in tail:
        try:
            replies.append(await read())
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


class _Lane:
    __slots__ = ("busy", "conn", "queue", "solo", "task", "wake")

    def __init__(self) -> None:
        self.queue: collections.deque[_Item] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.conn: Any = None
        self.busy = False  # someone is using conn: the lane's task, or a caller inline
        self.solo = True  # the lane's last round carried one command: callers may go inline


class Connections:
    """chatstate's own pool of redis-py connections, for the commands it sends itself.

    It makes connections with the client pool's factory (so host, TLS, password,
    Sentinel discovery and timeouts are the client's) but keeps them itself: a
    LIFO list of idle connections behind one lock, at most ``max_connections``
    of them, callers waiting up to ``timeout`` seconds for one. redis-py's own
    pool costs several microseconds per command in bookkeeping; this one a few
    hundred nanoseconds. Every connection given back is in a clean state (every
    reply read); a connection that failed is dropped instead.
    """

    def __init__(self, pool: Any, max_connections: int, timeout: float | None) -> None:
        self._pool = pool
        self._max = max_connections
        self._timeout = timeout
        self._idle: list[Any] = []
        self._count = 0
        self._cond = threading.Condition(threading.Lock())
        self._pid = os.getpid()

    def _check_fork(self) -> None:
        # A forked child must not share its parent's sockets: start over, leave them be.
        if os.getpid() != self._pid:
            with self._cond:
                if os.getpid() != self._pid:
                    self._idle, self._count, self._pid = [], 0, os.getpid()

    def acquire(self) -> Any:
        """An idle connection, a new one, or one given back within the timeout.

        An idle connection the server closed meanwhile is dropped, not handed out.

        Raises:
            NotSent: no connection could be had (none came free, or connecting failed).
        """
        self._check_fork()
        while (conn := self._reserve()) is not None:
            if not closed_by_server(conn):
                return conn
            self.discard(conn)
        with _opening(self._forget):
            conn = _new_connection(self._pool)
            conn.connect()
        return conn

    def _reserve(self) -> Any:
        """An idle connection, or ``None`` once a place for a new one is counted."""
        cond = self._cond
        with cond:
            if self._idle:
                return self._idle.pop()
            deadline = None if self._timeout is None else time.monotonic() + self._timeout
            while self._count >= self._max:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise NotSent(f"all {self._max} connections are in use")
                cond.wait(remaining)
                if self._idle:
                    return self._idle.pop()
            self._count += 1
            return None

    def release(self, conn: Any) -> None:
        """Give back a connection whose replies were all read."""
        with self._cond:
            self._idle.append(conn)
            self._cond.notify()

    def discard(self, conn: Any) -> None:
        """Drop a connection that failed (its state is unknown)."""
        with contextlib.suppress(Exception):
            conn.disconnect()
        self._forget()

    def _forget(self) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify()

    def close(self) -> None:
        """Disconnect the idle connections."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.disconnect()

    def execute(self, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """Send one command and read its reply; with a ``tail``, ``(reply, tail's replies)``.

        An error reply to the command is raised (once the tail's replies are read).
        """
        conn = self.acquire()
        try:
            conn.send_packed_command([pack(args), *map(pack, tail)])
            try:
                reply = conn.read_response()
            except rex.ResponseError as exc:
                reply = exc
            waited = _read_tail(conn.read_response, tail)
        except BaseException:
            self.discard(conn)
            raise
        self.release(conn)
        if isinstance(reply, rex.ResponseError):
            raise reply
        return (reply, waited) if tail else reply


@contextlib.contextmanager
def _opening(forget: Callable[[], None]) -> Iterator[None]:
    """Open a connection for a pool of either twin; on failure ``forget`` its place.

    Refused credentials are raised as they are (a retry cannot help); a server
    that cannot be reached is :class:`NotSent`, since nothing was sent yet.
    """
    try:
        yield
    except (rex.AuthenticationError, rex.AuthorizationError):
        forget()
        raise
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        forget()
        raise NotSent(str(exc)) from exc
    except BaseException:
        forget()
        raise


def _new_connection(pool: Any) -> Any:
    """A connection made as the pool would make it, outside the pool's own accounting."""
    return pool.connection_class(**pool.connection_kwargs)


class AsyncConnections:
    """The asyncio twin of :class:`Connections` (one event loop at a time)."""

    def __init__(self, pool: Any, max_connections: int, timeout: float | None) -> None:
        self._pool = pool
        self._max = max_connections
        self._timeout = timeout
        self._idle: list[Any] = []
        self._count = 0
        self._freed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def acquire(self) -> Any:
        """See :meth:`Connections.acquire`."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Connections belong to the loop that opened them.
            self._idle, self._count, self._freed, self._loop = [], 0, asyncio.Event(), loop
        while (conn := await self._reserve(loop)) is not None:
            if not closed_by_server_async(conn):
                return conn
            await self.discard(conn)
        with _opening(self._forget):
            conn = _new_connection(self._pool)
            await conn.connect()
        return conn

    async def _reserve(self, loop: asyncio.AbstractEventLoop) -> Any:
        """See :meth:`Connections._reserve`."""
        if self._idle:
            return self._idle.pop()
        deadline = None if self._timeout is None else loop.time() + self._timeout
        freed = self._freed
        assert freed is not None
        while self._count >= self._max:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                raise NotSent(f"all {self._max} connections are in use")
            freed.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the event is set, leaving a cancelled
            # task running on (it hung asyncio.run's shutdown under load).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await freed.wait()
            if self._idle:
                return self._idle.pop()
        self._count += 1
        return None

    def release(self, conn: Any) -> None:
        """See :meth:`Connections.release`."""
        self._idle.append(conn)
        if self._freed is not None:
            self._freed.set()

    async def discard(self, conn: Any) -> None:
        """See :meth:`Connections.discard`."""
        with contextlib.suppress(Exception):
            await conn.disconnect()
        self._forget()

    def _forget(self) -> None:
        self._count -= 1
        if self._freed is not None:
            self._freed.set()

    async def close(self) -> None:
        """Disconnect the idle connections."""
        idle, self._idle = self._idle, []
        self._count -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def execute(self, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """See :meth:`Connections.execute` (no pipelining)."""
        conn = await self.acquire()
        try:
            await conn.send_packed_command([pack(args), *map(pack, tail)])
            try:
                reply = await conn.read_response()
            except rex.ResponseError as exc:
                reply = exc
            waited = await _read_tail_async(conn.read_response, tail)
        except BaseException:
            await self.discard(conn)
            raise
        self.release(conn)
        if isinstance(reply, rex.ResponseError):
            raise reply
        return (reply, waited) if tail else reply


class AutoPipeline:
    """Batches the commands of concurrent tasks, per lane, on one event loop.

    Args:
        pool: Where the lanes take their connections.
        lanes: How many batches may be in flight at once (one connection each).
        max_batch: The most commands in one batch.
    """

    def __init__(self, pool: AsyncConnections, *, lanes: int = 2, max_batch: int = 512) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self._size = lanes
        self._lanes: list[_Lane] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def call(self, route: str, args: tuple[Any, ...], tail: Tail = ()) -> Any:
        """Send ``args`` in the next batch of ``route``'s lane and return its reply.

        With a ``tail``, return ``(reply, the tail's replies)`` (see the module's
        docstring: a batch sends each distinct tail once, after its commands).

        When the lane is idle and has lately carried one command at a time, the
        caller sends its command itself, with no hop through the lane's task:
        one task alone pays nothing for pipelining. Under load the lane batches.
        """
        if self._closed:
            raise NotSent("the backend is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Lanes (and their connections) belong to one event loop.
            self._lanes = [_Lane() for _ in range(self._size)]
            self._loop = loop
        lane = self._lanes[hash(route) % self._size]
        if lane.solo and not lane.busy and not lane.queue:
            return await self._inline(lane, args, tail)
        future: asyncio.Future[Any] = loop.create_future()
        lane.queue.append((args, tail, future))
        self._kick(lane, loop)
        return await future

    def _keep(self, lane: _Lane, conn: Any) -> None:
        """Give a clean connection back to its lane (or to the pool if the lane has one)."""
        if lane.conn is None and not self._closed:
            lane.conn = conn
        else:
            self.pool.release(conn)

    def _kick(self, lane: _Lane, loop: asyncio.AbstractEventLoop) -> None:
        if lane.task is None or lane.task.done():
            lane.task = loop.create_task(self._run(lane))
        else:
            lane.wake.set()

    async def _inline(self, lane: _Lane, args: tuple[Any, ...], tail: Tail) -> Any:
        lane.busy = True
        try:
            # The caller holds the connection alone while it uses it: a close meanwhile
            # cannot pull it from under it.
            conn, lane.conn = lane.conn, None
            if conn is not None and closed_by_server_async(conn):
                await self.pool.discard(conn)
                conn = None
            if conn is None:
                conn = await self.pool.acquire()
            try:
                await conn.send_packed_command([pack(args), *map(pack, tail)])
                try:
                    async with asyncio.timeout(conn.socket_timeout or 30.0):
                        read = _reader(conn)
                        reply = await read()
                        waited = await _read_tail_async(read, tail)
                except TimeoutError:
                    raise rex.TimeoutError("Timeout reading from the server") from None
            except rex.ResponseError:
                self._keep(lane, conn)
                raise
            except BaseException:
                await self.pool.discard(conn)
                raise
            self._keep(lane, conn)
        finally:
            lane.busy = False
            if lane.queue:  # others came meanwhile: batch from now on
                lane.solo = False
                self._kick(lane, asyncio.get_running_loop())
        if isinstance(reply, rex.ResponseError):
            raise reply
        return (reply, waited) if tail else reply

    async def aclose(self) -> None:
        """Stop the lanes' tasks and give their connections back; later calls are refused."""
        self._closed = True
        lanes, self._lanes, self._loop = self._lanes, [], None
        for lane in lanes:
            if lane.task is not None and not lane.task.done():
                lane.task.cancel()
                with contextlib.suppress(BaseException):
                    await lane.task
            conn, lane.conn = lane.conn, None
            if conn is not None:  # taken by a caller inline, with no task to close it
                await self.pool.discard(conn)

    async def _run(self, lane: _Lane) -> None:
        """The lane's loop: send what is queued, read the replies, wait for more."""
        try:
            while True:
                while lane.queue and not lane.busy:
                    await self._flush(lane)
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    # Asked to stop, and a library call on the way swallowed the
                    # CancelledError: stop anyway, or asyncio.run's shutdown waits forever.
                    raise asyncio.CancelledError
                lane.wake.clear()
                await lane.wake.wait()
        finally:
            conn, lane.conn = lane.conn, None
            if conn is not None:
                await self.pool.discard(conn)
            while lane.queue:
                _, _, future = lane.queue.popleft()
                if not future.done():
                    future.set_exception(NotSent("the backend was closed"))

    async def _flush(self, lane: _Lane) -> None:
        batch: list[_Item] = []
        while lane.queue and len(batch) < self.max_batch:
            item = lane.queue.popleft()
            if not item[2].done():  # a cancelled caller's command is never sent
                batch.append(item)
        if not batch:
            return
        lane.busy = True
        lane.solo = len(batch) == 1 and not lane.queue
        try:
            await self._send_batch(lane, batch)
        finally:
            lane.busy = False

    async def _send_batch(  # noqa: C901, PLR0912 - one path per outcome
        self, lane: _Lane, batch: list[_Item]
    ) -> None:
        if lane.conn is not None and closed_by_server_async(lane.conn):
            conn, lane.conn = lane.conn, None
            await self.pool.discard(conn)
        if lane.conn is None:
            try:
                lane.conn = await self.pool.acquire()
            except BaseException as exc:  # refused, timed out, a handshake error, closed
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(_copy_error(exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
        conn = lane.conn
        # Each distinct tail once, after every command of the batch (it covers them all).
        tails = list(dict.fromkeys(tail for _, tail, _ in batch if tail))
        held: list[tuple[Any, Tail, asyncio.Future[Any]]] = []
        try:
            await conn.send_packed_command(
                [pack(args) for args, _, _ in batch]
                + [pack(command) for tail in tails for command in tail]
            )
            read = _reader(conn)
            limit = (conn.socket_timeout or 30.0) * max(1.0, len(batch) / 64)
            try:
                async with asyncio.timeout(limit):  # one deadline for the batch, not one per reply
                    for _, tail, future in batch:
                        try:
                            reply: Any = await read()
                        except rex.ResponseError as exc:
                            reply = exc
                        if future.done():
                            continue
                        if isinstance(reply, BaseException):
                            future.set_exception(reply)
                        elif tail:
                            held.append((reply, tail, future))  # answered once its tail is
                        else:
                            future.set_result(reply)
                    waited = {tail: await _read_tail_async(read, tail) for tail in tails}
                    for reply, tail, future in held:
                        if not future.done():
                            future.set_result((reply, waited[tail]))
            except TimeoutError:
                raise rex.TimeoutError("Timeout reading from the server") from None
            if getattr(conn, "health_check_interval", 0):
                conn.next_health_check = asyncio.get_running_loop().time() + (
                    conn.health_check_interval
                )
        except BaseException as exc:
            # The connection is out of step: drop it; the rest get the failure.
            lane.conn = None
            await self.pool.discard(conn)
            for _, _, future in batch:  # every caller not answered yet
                if not future.done():
                    future.set_exception(_copy_error(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise


def _reader(conn: Any) -> Any:
    """The cheapest way to read one reply: the connection's parser, when it has one.

    ``conn.read_response()`` sets up a timeout per reply, which costs more than
    the parsing; the batch has one deadline of its own. The parser hands error
    replies back as exception objects rather than raising them.
    """
    parser = getattr(conn, "_parser", None)
    return parser.read_response if parser is not None else conn.read_response


def _copy_error(exc: BaseException) -> BaseException:
    """A fresh exception per waiting caller (one instance must not be raised in many tasks)."""
    if isinstance(exc, NotSent):
        fresh: BaseException = NotSent(str(exc))
        fresh.__cause__ = exc.__cause__
        return fresh
    if isinstance(exc, asyncio.CancelledError):
        return rex.ConnectionError("the pipeline was closed while the command was in flight")
    try:
        fresh = type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - an error type we cannot rebuild
        fresh = rex.ConnectionError(f"{type(exc).__name__}: {exc}")
    fresh.__cause__ = exc
    return fresh
