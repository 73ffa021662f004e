"""The ordered, bounded write path of one TCP connection or one UDP socket.

Rules (trio-websocket's, adapted to a protocol whose receive loop must never
wait on a write):

- A message is written at once by its sender's own call when nothing is
  queued or held: one system call, no task switch. Otherwise it is queued and
  the outbox's writer task writes it, in order, when the socket accepts it.
  Nobody but the writer task waits on the socket, so two senders never
  contend for it. The writer task starts when a message first has to wait
  (:meth:`Outbox.attach`): most endpoints never need one.
- Putting never blocks, so the receive loop can echo without waiting.
  Confirmed senders first wait for room (:meth:`Outbox.wait_room`, below
  ``limit``); echoes may go beyond it, up to ``cap`` (they must not wait, or
  two endpoints writing to each other would deadlock): past ``cap`` the peer
  is not reading, and the transport drops the echo (UDP) or the connection.
- A stream that makes no progress for ``stall`` seconds while messages wait
  fails (``TimeoutError``): the peer stopped reading.
- A queued message whose sender gives up is withdrawn. A message the sender
  gave up on after part of it reached the socket cannot be withdrawn without
  corrupting the stream: :meth:`Outbox.abandon` says so, and the transport
  closes that connection.
- Pacing (toward TCP peers that cannot frame messages, such as iblutil): after
  each write the next waits until the peer has had time to read
  (``pace`` seconds), or until :meth:`Outbox.release` reports that the peer
  answered the message just written (its echo arrived), whichever is first.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from . import clock

__all__ = ["Outbox", "Write"]

Address = tuple[str, int]
_NEVER = -math.inf  # no hold
Write = Callable[[Any, "Address | None"], int]
"""``write(data, addr)``: bytes the socket accepted now (0: it would block); raises OSError."""


class _Entry:
    __slots__ = ("addr", "box", "data", "dead", "owner", "started")

    def __init__(
        self, box: Outbox, data: Any, addr: Address | None, owner: Any, started: bool
    ) -> None:
        self.box = box
        self.data = data
        self.addr = addr
        self.owner = owner
        self.started = started
        self.dead = False


class Outbox:
    """Queued messages of one connection (TCP) or one socket (UDP).

    Args:
        write: writes what the socket accepts now (see :data:`Write`).
        wait_writable: waits until the socket may accept more.
        limit: queued bytes beyond which :meth:`wait_room` waits and
            :attr:`full` is true.
        cap: queued bytes beyond which even echoes do not fit (:meth:`fits`).
        stall: seconds without progress after which :meth:`run` raises
            ``TimeoutError`` (None: wait forever).
        pace: seconds to hold the next message after each write (0: none).
        datagrams: UDP: a failed write drops that datagram (reported to
            ``on_error``) instead of failing the outbox.
        on_error: called with ``(addr, exc)`` when a queued datagram fails.
        unflushed: true while the last message written is not wholly out yet
            (asyncio: the transport still buffers part of it); None: writes
            go straight to the socket.

    ``conn`` is free for the transport (the connection this outbox belongs to).
    Nothing is written after queueing until the transport has called
    :meth:`attach`.
    """

    __slots__ = (
        "_awaiting",
        "_entries",
        "_hold_until",
        "_last",
        "_now",
        "_room",
        "_spawn",
        "_unflushed",
        "_wait_writable",
        "_wake",
        "_write",
        "cap",
        "conn",
        "datagrams",
        "limit",
        "on_error",
        "pace",
        "queued",
        "stall",
    )

    def __init__(
        self,
        write: Write,
        wait_writable: Callable[[], Awaitable[object]],
        *,
        limit: int,
        cap: int | None = None,
        stall: float | None = None,
        pace: float = 0.0,
        datagrams: bool = False,
        on_error: Callable[[Address | None, OSError], None] | None = None,
        unflushed: Callable[[], bool] | None = None,
    ) -> None:
        self._write = write
        self._unflushed = unflushed
        self._last: Any = None  # the owner of the last message written whole
        self._wait_writable = wait_writable
        self.limit = limit
        self.cap = limit if cap is None else cap
        self.stall = stall
        self.pace = pace
        self.datagrams = datagrams
        self.on_error = on_error
        self.conn: Any = None
        self._entries: deque[_Entry] | None = None  # made when a message first waits
        self.queued = 0
        self._hold_until = _NEVER
        self._now = clock()
        self._awaiting: Any = None
        # Both made when first needed: an idle endpoint holds no writer task.
        self._wake: Any = None  # set while the writer task runs (or is starting)
        self._room: Any = None
        self._spawn: Callable[[], object] | None = None

    @property
    def full(self) -> bool:
        """True when as many bytes are queued as the limit allows."""
        return self.queued >= self.limit

    def fits(self, size: int) -> bool:
        """True if ``size`` more bytes stay within the cap."""
        return self.queued + size <= self.cap

    def put(self, data: bytes, addr: Address | None = None, owner: Any = None) -> None:
        """Write ``data`` now if possible, else queue it; never blocks.

        ``owner`` (a confirmed send) gets ``owner.handle`` set to the queued
        entry, then to this outbox once written (left None when it is written
        at once and neither pacing nor an unflushed transport can ask about
        it: there is nothing to withdraw). Raises the socket's OSError if the
        immediate write fails.
        """
        entries = self._entries
        hold = self._hold_until
        if not entries and (hold == _NEVER or self._now() >= hold):
            n = self._write(data, addr)
            if n == len(data):  # the common case: written whole at once
                if self.pace or self._unflushed is not None:  # else nobody asks about it
                    self._written(owner)
                return
            entry = _Entry(self, memoryview(data)[n:] if n else data, addr, owner, n > 0)
        else:
            entry = _Entry(self, data, addr, owner, False)
        if entries is None:
            entries = self._entries = deque()
        entries.append(entry)
        self.queued += len(entry.data)
        if owner is not None:
            owner.handle = entry
        self._kick()

    def attach(self, spawn: Callable[[], object] | None) -> None:
        """How to start the writer task (``spawn()`` starts :meth:`run`); None: never.

        The transport attaches its task group's ``start_soon`` while the
        connection or socket is open, and detaches it (None) before that
        task group closes. The writer starts the first time a message has to
        wait, at once if one already does.
        """
        self._spawn = spawn
        if spawn is not None and self._entries:
            self._kick()

    def _kick(self) -> None:
        """Wake the writer task; start it if it is not running."""
        wake = self._wake
        if wake is not None:
            wake.set()
        elif self._spawn is not None:
            self._wake = anyio.Event()
            self._spawn()

    def _written(self, owner: Any) -> None:
        if self._unflushed is not None:  # only then is the last one asked about
            self._last = owner
        if owner is not None:
            owner.handle = self
        if self.pace:
            self._hold_until = self._now() + self.pace
            self._awaiting = owner

    async def wait_room(self) -> None:
        """Wait until fewer bytes than the limit are queued.

        Cancellation: nothing to undo.
        """
        while self.queued >= self.limit:
            if self._room is None or self._room.is_set():
                self._room = anyio.Event()
            await self._room.wait()

    @staticmethod
    def of(owner: Any) -> Outbox | None:
        """The outbox that holds or wrote ``owner``'s message, if any."""
        handle = owner.handle
        if handle is None or isinstance(handle, Outbox):
            return handle
        assert isinstance(handle, _Entry)
        return handle.box

    def abandon(self, owner: Any) -> bool:
        """``owner`` stopped waiting: withdraw its message if none of it was written.

        Returns True if part of it was written already: the stream can only
        be kept whole by closing the connection.
        """
        entry = owner.handle
        owner.handle = None
        if entry is self:  # written: still partly buffered above the socket?
            return owner is self._last and self._unflushed is not None and self._unflushed()
        if entry is None or entry.dead:
            return False
        if entry.started:
            return True
        entry.dead = True
        self._dequeued(len(entry.data))
        return False

    def release(self, owner: Any) -> None:
        """The peer answered ``owner``'s message: it has read it, so stop holding."""
        if owner is not None and owner is self._awaiting:
            self._awaiting = None
            self._hold_until = _NEVER
            if self._entries:  # else the next put writes at once: no task to wake
                self._kick()

    def trust(self) -> None:
        """The peer frames messages itself: no pacing from now on."""
        if not self.pace and self._hold_until == _NEVER:
            return  # already trusted (called for every tagged message)
        self.pace = 0.0
        self._hold_until = _NEVER
        self._awaiting = None
        if self._entries:
            self._kick()

    def _dequeued(self, n: int) -> None:
        self.queued -= n
        if self.queued < self.limit and self._room is not None:
            self._room.set()

    async def run(self) -> None:
        """The writer task: write queued messages in order until cancelled.

        Started through :meth:`attach`'s ``spawn``. Raises the socket's
        OSError when a stream write fails (the transport then closes the
        connection).
        """
        if self._wake is None:
            self._wake = anyio.Event()
        entries = self._entries
        if entries is None:
            entries = self._entries = deque()
        while True:
            while entries and entries[0].dead:
                entries.popleft()
            if not entries:
                if self._wake.is_set():
                    self._wake = anyio.Event()
                    continue
                await self._wake.wait()
                continue
            hold = self._hold_until
            if self._now() < hold:
                if self._wake.is_set():
                    self._wake = anyio.Event()
                with anyio.CancelScope(deadline=hold):
                    await self._wake.wait()
                continue
            if self.stall is None:
                await self._wait_writable()
            else:
                with anyio.move_on_after(self.stall) as scope:
                    await self._wait_writable()
                if scope.cancelled_caught:
                    raise TimeoutError(
                        f"{self.queued} bytes could not be written for {self.stall:g} s"
                    )
            if not entries[0].dead:
                self._write_head()

    def drain(self) -> None:
        """Write queued messages while the socket takes them, without waiting.

        For a datagram transport that reports writability by callback
        (asyncio's ``resume_writing``): it calls this instead of running a
        writer task. No pacing.
        """
        entries = self._entries
        while entries:
            if entries[0].dead:
                entries.popleft()
            elif not self._write_head():
                return

    def _write_head(self) -> bool:
        """Write what the socket takes of the first queued message (not withdrawn).

        Returns False if it took nothing. Raises the socket's OSError for a
        stream; a failed datagram is dropped and reported to ``on_error``.
        """
        entries = self._entries
        assert entries
        entry = entries[0]
        try:
            n = self._write(entry.data, entry.addr)
        except OSError as exc:
            if not self.datagrams:
                raise
            entries.popleft()
            self._dequeued(len(entry.data))
            if entry.owner is not None:
                entry.owner.handle = None  # failed: nothing to withdraw
            if self.on_error is not None:
                self.on_error(entry.addr, exc)
            return True
        if not n:
            return False
        entry.started = True
        if n < len(entry.data):
            entry.data = memoryview(entry.data)[n:]
            self._dequeued(n)
            return True
        entries.popleft()
        self._dequeued(n)
        self._written(entry.owner)
        return True
