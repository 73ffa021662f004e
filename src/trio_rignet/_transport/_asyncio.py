"""The asyncio backend: asyncio's own transports and protocols.

Every asyncio event loop implements these natively, Windows'
ProactorEventLoop included (which has no ``add_reader``/``add_writer``), so
no read needs a helper thread. Messages are handled as they arrive, in the
protocol callbacks, synchronously: there is no receive loop to block or to
spin. Each TCP connection owns one task (its outbox writer and lifetime);
writes go through the same :class:`~._outbox.Outbox` rules as on Trio, with
"writable" meaning that the transport has not asked us to pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import socket
from typing import Any

import anyio
import sniffio
from anyio.abc import TaskGroup, TaskStatus

from .._errors import FramingError, PeerUnavailable
from .._framing import StreamDecoder
from .._ratelimit import RateLimit
from . import Address, Handler, Transport
from ._outbox import Outbox
from ._sockets import (
    DRAIN,
    IDLE_WAKES,
    UNREACHABLE,
    bind_tcp_listener,
    bind_udp,
    connect_udp,
    ip_addr,
    is_unreachable,
    large_receive_buffer,
    udp_error,
    wire_address,
)
from ._tcp import CONNECT_TIMEOUT, READ_SIZE, Connection, TCPBase

__all__ = ["TCPTransport", "UDPTransport"]

log = logging.getLogger("trio_rignet.transport")


def _mark_asyncio() -> None:
    """Let AnyIO recognise asyncio in this task's protocol callbacks.

    Protocol callbacks run outside any task, where sniffio (and so AnyIO) cannot
    tell which library runs the loop unless its context variable says so, as
    ``anyio.run`` sets it but a plain ``asyncio.run`` does not. Callbacks run in
    a copy of the context they were registered from, so setting it in the task
    that opens the transport covers every callback of that transport (and the
    caller's context is untouched: this task has its own).
    """
    sniffio.current_async_library_cvar.set("asyncio")


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Waiter:
    """A confirmed send's wake-up on asyncio: a flag and, while waiting, a future and a timer.

    It does what ``anyio.Event().wait()`` under ``anyio.CancelScope(deadline=...)``
    does for this one use, without their bookkeeping (most of an asyncio
    client's time with many sends in flight). A cancelled wait is asyncio's own
    (the task's cancellation cancels the future), so any AnyIO scope around it
    behaves as around any native await. Once set it stays set, as an ``Event``:
    a ``set()`` racing the timer, or a cancellation, is never lost.
    """

    __slots__ = ("_future", "_is_set", "_loop")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._is_set = False
        self._future: asyncio.Future[None] | None = None  # only while a task waits

    def set(self) -> None:
        """Wake the waiting task, and make every later wait return at once."""
        self._is_set = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, deadline: float) -> None:
        """Return when set, or at ``deadline``; cancellation leaves no timer behind."""
        if self._is_set:
            await anyio.lowlevel.checkpoint()
            return
        future = self._future = self._loop.create_future()
        timer = self._loop.call_at(deadline, _expire, future) if deadline < math.inf else None
        try:
            await future
        finally:
            self._future = None
            if timer is not None:
                timer.cancel()


class _Flow:
    """Write flow control of one asyncio transport: paused, and a wait for resumption."""

    __slots__ = ("paused", "resumed")

    def __init__(self) -> None:
        self.paused = False
        self.resumed: anyio.Event | None = None  # made when someone waits

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        if self.resumed is not None:
            self.resumed.set()
            self.resumed = None

    async def wait(self) -> None:
        while self.paused:
            if self.resumed is None:
                self.resumed = anyio.Event()
            await self.resumed.wait()


# ---------------------------------------------------------------------- UDP


def _reads_sockets(loop: asyncio.AbstractEventLoop) -> bool:
    """True if the loop's transports leave their sockets to be read by anyone
    (a selector loop), False if they keep a receive pending (a proactor loop)."""
    return isinstance(loop, asyncio.SelectorEventLoop)


_DATAGRAM_BUFFER = 65536  # > the largest UDP payload (65,507 bytes over IPv4)


class _DatagramProtocol(asyncio.DatagramProtocol):
    """The callbacks of one datagram transport.

    asyncio's transports read one datagram per event-loop iteration: under
    load (many sends in flight) that is a pass of the loop per datagram. On
    a selector loop the socket is ours to read too (``sock``): after each
    datagram the protocol reads those already waiting, as the Trio backend
    does (at most :data:`DRAIN`; while datagrams come one by one it looks for
    a second only every :data:`IDLE_WAKES` wake-ups). A proactor loop
    (Windows) has a receive of its own pending on the socket: ``sock`` is
    None there, and each datagram comes through asyncio.
    """

    def __init__(self, owner: UDPTransport, handler: Handler) -> None:
        self.owner = owner
        self.received = handler._received
        self.flow = _Flow()
        self.lost = anyio.Event()
        self.sock: socket.socket | None = None
        self.idle = 0  # wake-ups left that read one datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        received = self.received
        received(data, addr)  # never raises: the endpoint logs and drops failures
        sock = self.sock
        if sock is None:
            return
        if self.idle:
            self.idle -= 1
            return
        n = 1
        while n < DRAIN:
            n += 1
            try:
                data, addr = sock.recvfrom(_DATAGRAM_BUFFER)
            except BlockingIOError:
                break
            except OSError as exc:  # an ICMP error, or the socket closed meanwhile
                if self.lost.is_set():
                    break
                self.owner._error(exc)  # as asyncio reports it (error_received)
                if not is_unreachable(exc):
                    break
                continue
            received(data, addr)
        if n <= 2:  # the socket held one datagram: one by one from here on
            self.idle = IDLE_WAKES

    def error_received(self, exc: Exception) -> None:
        self.owner._error(exc)

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()
        outbox = self.owner._outbox
        if outbox is not None:
            outbox.drain()  # what waited for room: no writer task needed

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


class UDPTransport(Transport):
    """One UDP datagram endpoint: bound for a server, connected to the peer for a client."""

    kind = "udp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._transport: asyncio.DatagramTransport | None = None
        self._outbox: Outbox | None = None
        self._handler: Handler | None = None
        self._log = RateLimit()

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and not self._closed

    async def run(self, handler: Handler, *, task_status: TaskStatus[None]) -> None:
        _mark_asyncio()
        loop = asyncio.get_running_loop()
        self._handler = handler
        protocol = _DatagramProtocol(self, handler)
        readable = _reads_sockets(loop)
        sock: socket.socket | None = None
        if self.role == "server":
            sock = bind_udp(self.host, self.port)
        elif readable:
            sock = connect_udp(self.host, self.port)  # a selector transport sends on it as is
        if sock is not None:
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
            except BaseException:
                sock.close()
                raise
            if readable:
                protocol.sock = sock  # see _DatagramProtocol
        else:
            # remote_addr, not a connected sock=: ProactorEventLoop's datagram
            # transport only sends without an address when it knows its peer.
            transport, _ = await loop.create_datagram_endpoint(
                lambda: protocol,
                remote_addr=(self.host, self.port),
                family=socket.AF_INET6 if ":" in self.host else socket.AF_INET,
            )
        self._transport = transport
        self.local_address = ip_addr(transport.get_extra_info("sockname"))
        raw = transport.get_extra_info("socket")
        large_receive_buffer(raw)
        # asyncio receives each datagram into a new buffer of the transport's
        # max_size, 256 KiB: on Linux an mmap, page faults and an munmap per
        # datagram. The largest UDP payload needs 64 KiB. (An attribute of the
        # selector and proactor datagram transports alike; nothing changes
        # where it is absent.)
        if getattr(transport, "max_size", 0) > _DATAGRAM_BUFFER:
            transport.max_size = _DATAGRAM_BUFFER  # type: ignore[attr-defined]
        family = raw.family
        flow = protocol.flow
        client = self.role == "client"

        def write(data: Any, addr: Address | None) -> int:
            if flow.paused:
                return 0
            if client:
                transport.sendto(data)
            else:
                assert addr is not None
                transport.sendto(data, wire_address(family, addr))
            return len(data)

        # Never attached: asyncio buffers what the socket does not take, and
        # what waits for room here is written by resume_writing (drain).
        outbox = Outbox(write, flow.wait, limit=self.config.out_limit, datagrams=True)
        self._outbox = outbox
        try:
            self._set_connected(True)
            task_status.started()
            await protocol.lost.wait()
        finally:
            self._closed = True
            self._set_connected(True)  # wake waiters: closed
            transport.abort()

    def _error(self, exc: Exception) -> None:
        if is_unreachable(exc):
            # A client is connected, so the error is about its one peer; a
            # server cannot tell which peer it was about: its sends time out.
            if self.role == "client" and self._handler is not None:
                self._handler._peer_lost(self.peer, UNREACHABLE)
        elif self._log.ready(anyio.current_time()):
            log.warning("UDP error on %s: %s", self.local_address, exc)

    def transmit(self, data: bytes, addr: Address, owner: Any = None) -> bool:
        outbox = self._outbox
        transport = self._transport
        if outbox is None or transport is None or self._closed or transport.is_closing():
            raise PeerUnavailable(addr, "the endpoint is closed")
        if owner is None and outbox.full:
            if self._log.ready(anyio.current_time()):
                log.warning(
                    "UDP send buffer of %s full: dropped a reply to %s (%d dropped lately)",
                    self.local_address,
                    addr,
                    self._log.take(),
                )
            return False
        try:
            outbox.put(data, addr, owner)
        except OSError as exc:  # pragma: no cover - asyncio reports send errors to error_received
            raise udp_error(addr, exc, len(data)) from None
        return True

    def has_room(self, addr: Address) -> bool:
        return self._outbox is None or not self._outbox.full

    async def wait_room(self, addr: Address) -> None:
        if self._outbox is not None:
            await self._outbox.wait_room()

    def abandon(self, owner: Any) -> None:
        outbox = Outbox.of(owner)
        if outbox is not None:
            outbox.abandon(owner)  # a datagram is never written part-way


# ---------------------------------------------------------------------- TCP


class _StreamProtocol(asyncio.BufferedProtocol):
    """The callbacks of one TCP connection, feeding its :class:`Connection`.

    A buffered protocol: asyncio reads into the transport's one receive
    buffer. A plain protocol gets a new ``bytes`` per read, which selector
    loops allocate at 256 KiB (an mmap, a page fault and an munmap per
    message on Linux).
    """

    def __init__(self, owner: TCPTransport, handler: Handler) -> None:
        self.owner = owner
        self.handler = handler
        self.flow = _Flow()
        self.lost = anyio.Event()
        self.conn: Connection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.failure: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn = self.owner._connection_made(transport, self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.owner._read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._feed(self.owner._read_buffer()[:nbytes])

    def _feed(self, data: memoryview) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        try:
            conn.feed(data, self.handler)
        except FramingError as exc:
            self.owner._unframeable(conn, exc)
            return
        except Exception as exc:  # a framing bug: end the endpoint with it, as on Trio
            self.failure = exc
            self.lost.set()
            return
        if conn.decoder.buffered and self.timer is None:
            self._arm()

    def _arm(self) -> None:
        conn = self.conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(self.owner._read_deadline(conn), self._check_stalled)

    def _check_stalled(self) -> None:
        self.timer = None
        conn = self.conn
        if conn is None or conn.closed or not conn.decoder.buffered:
            return
        if anyio.current_time() >= self.owner._read_deadline(conn):
            self.owner._stalled(conn)
        else:
            self._arm()

    def eof_received(self) -> bool:
        conn = self.conn
        if conn is not None:
            try:
                conn.decoder.eof()
            except FramingError as exc:
                self.owner._unframeable(conn, exc)
        return False  # close the transport

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        conn = self.conn
        if conn is not None and exc is not None and not conn.closed:
            conn.reason = f"connection lost ({exc})"
        self.lost.set()


class TCPTransport(TCPBase):
    """A server and its connections, or one client connection, on asyncio transports."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tg: TaskGroup | None = None
        self._handler: Handler | None = None
        self._rbuf: memoryview | None = None

    def _read_buffer(self) -> memoryview:
        """The buffer every connection of this transport receives into.

        asyncio fills it and hands it over in one step (selector loops), or
        copies into it from its own (proactor), and each receive is framed
        (copied out) before the next: one buffer serves them all.
        """
        buf = self._rbuf
        if buf is None:
            buf = self._rbuf = memoryview(bytearray(READ_SIZE))
        return buf

    def _connection_made(
        self, transport: asyncio.Transport, protocol: _StreamProtocol
    ) -> Connection:
        flow = protocol.flow

        def write(data: Any, addr: Address | None) -> int:
            if flow.paused:
                return 0
            transport.write(data)
            return len(data)

        # Nagle off on every connection, as on Trio. asyncio sets TCP_NODELAY only on
        # sockets whose proto is IPPROTO_TCP, which excludes the connections a
        # listener made with proto 0 accepts: a rig's completion update written just
        # after its echo then waited for the main PC's delayed ACK (40 ms on Linux,
        # up to 200 ms on Windows) on every signal.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Pause as soon as anything is buffered (high water 0): then at most one
        # message is inside asyncio's buffer, and a send cancelled while part of it
        # is still there can be told apart (and its connection closed), as on Trio.
        transport.set_write_buffer_limits(high=0, low=0)
        outbox = self._outbox(write, flow.wait, lambda: flow.paused)
        conn = Connection(
            ip_addr(transport.get_extra_info("peername")),
            StreamDecoder(self.config.max_message_size),
            outbox,
        )
        conn.io = protocol
        conn.abort = transport.abort
        if self.role == "server":
            assert self._handler is not None
            if self._tg is None or self._closed:
                # Accepted while the server closes (asyncio may still hand over
                # connections it accepted): close it, or it would leak.
                conn.closed = True
                transport.abort()
                return conn
            if not self._admit(conn, self._handler):
                conn.closed = True
                transport.abort()
                return conn
            self._tg.start_soon(
                self._serve, conn, self._handler, name=f"tcp connection {conn.peer}"
            )
        return conn

    async def run(self, handler: Handler, *, task_status: TaskStatus[None]) -> None:
        _mark_asyncio()
        self._handler = handler
        try:
            if self.role == "client":
                await self._run_client(handler, task_status)
                await anyio.sleep_forever()  # stay open after a lost connection
            else:
                await self._run_server(handler, task_status)
        finally:
            self._closed = True
            self._set_connected(True)  # wake waiters: closed
            for conn in [*self._conns.values(), self._client]:
                if conn is not None:
                    conn.close()

    async def _run_server(self, handler: Handler, task_status: TaskStatus[None]) -> None:
        loop = asyncio.get_running_loop()
        sock = bind_tcp_listener(self.host, self.port)
        try:
            server = await loop.create_server(lambda: _StreamProtocol(self, handler), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            self.local_address = ip_addr(sock.getsockname())
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._set_connected(True)
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    self._tg = None  # closing: no new connection tasks from here on
        finally:
            server.close()
            for conn in list(self._conns.values()):
                conn.close()
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await server.wait_closed()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        handler = self._handler
        assert handler is not None
        with anyio.fail_after(CONNECT_TIMEOUT):
            transport, protocol = await loop.create_connection(
                lambda: _StreamProtocol(self, handler), self.host, self.port
            )
        conn = protocol.conn
        assert conn is not None
        self.local_address = ip_addr(transport.get_extra_info("sockname"))
        return conn

    async def _serve(self, conn: Connection, handler: Handler) -> None:
        protocol: _StreamProtocol = conn.io
        try:
            with anyio.CancelScope() as scope:
                conn.scope = scope
                if conn.closed:
                    return
                async with anyio.create_task_group() as tg:
                    conn.outbox.attach(functools.partial(tg.start_soon, self._write, conn))
                    try:
                        await protocol.lost.wait()
                    finally:
                        conn.outbox.attach(None)
                    if protocol.failure is not None:
                        raise protocol.failure
                    tg.cancel_scope.cancel()
        finally:
            conn.closed = True
            if conn.abort is not None:
                conn.abort()
            self._ended(conn, handler)

    async def _write(self, conn: Connection) -> None:
        try:
            await conn.outbox.run()
        except TimeoutError as exc:
            conn.close(f"was disconnected: {exc} (it is not reading)")
            log.warning("TCP peer %s %s", conn.peer, conn.reason)
        except OSError as exc:  # pragma: no cover - asyncio reports errors via connection_lost
            conn.close(f"connection lost ({exc})")
