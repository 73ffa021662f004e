"""The Trio backend: non-blocking standard sockets and Trio's native readiness waits.

Trio waits on sockets natively on every platform (IOCP/AFD on Windows), so
this is what Trio's own socket module does, without its per-call wrappers:
one task per socket (UDP) or connection (TCP) receives; nobody but an
:class:`~._outbox.Outbox` writer task ever waits for a socket to be writable.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any

import anyio
import trio
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
    tcp_client_socket,
    udp_error,
    wire_address,
)
from ._tcp import CONNECT_TIMEOUT, READ_SIZE, Connection, TCPBase

__all__ = ["TCPTransport", "UDPTransport"]

log = logging.getLogger("trio_rignet.transport")


class Waiter:
    """A confirmed send's wake-up on Trio: trio's own ``Event`` under a ``CancelScope``."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        """Wake the waiting task."""
        self._event.set()

    async def wait(self, deadline: float) -> None:
        """Return when set, or at ``deadline``; cancellation leaves nothing behind."""
        with trio.CancelScope(deadline=deadline):
            await self._event.wait()


class UDPTransport(Transport):
    """One UDP socket: bound for a server, connected to the peer for a client."""

    kind = "udp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sock: socket.socket | None = None
        self._outbox: Outbox | None = None
        self._handler: Handler | None = None
        self._log = RateLimit()

    @property
    def is_connected(self) -> bool:
        return self._sock is not None and not self._closed

    async def run(self, handler: Handler, *, task_status: TaskStatus[None]) -> None:
        if self.role == "server":
            sock = bind_udp(self.host, self.port)
        else:
            sock = connect_udp(self.host, self.port)
        self._sock = sock
        self._handler = handler
        self.local_address = ip_addr(sock.getsockname())
        if self.role == "client":  # connected to its one peer

            def write(data: Any, addr: Address | None) -> int:
                try:
                    return sock.send(data)
                except BlockingIOError:
                    return 0

        elif sock.family == socket.AF_INET6:  # may be dual-stack: IPv4 peers as ::ffff:a.b.c.d

            def write(data: Any, addr: Address | None) -> int:
                assert addr is not None
                try:
                    return sock.sendto(data, wire_address(socket.AF_INET6, addr))
                except BlockingIOError:
                    return 0

        else:

            def write(data: Any, addr: Address | None) -> int:
                try:  # a server is always given addr
                    return sock.sendto(data, addr)  # type: ignore[arg-type]
                except BlockingIOError:
                    return 0

        outbox = Outbox(
            write,
            functools.partial(trio.lowlevel.wait_writable, sock),
            limit=self.config.out_limit,
            datagrams=True,
            on_error=self._queued_send_failed,
        )
        self._outbox = outbox
        try:
            async with anyio.create_task_group() as tg:
                outbox.attach(functools.partial(tg.start_soon, outbox.run))
                self._set_connected(True)
                task_status.started()
                try:
                    await self._receive(sock, handler)
                finally:
                    outbox.attach(None)
        finally:
            self._closed = True
            self._set_connected(True)  # wake waiters: closed
            trio.lowlevel.notify_closing(sock)
            sock.close()

    async def _receive(self, sock: socket.socket, handler: Handler) -> None:
        recvfrom = sock.recvfrom
        received = handler._received
        idle = 0  # wake-ups left that read one datagram (see IDLE_WAKES)
        while True:
            await trio.lowlevel.wait_readable(sock)
            limit = 1 if idle else DRAIN
            n = 0
            while n < limit:
                n += 1
                try:
                    data, addr = recvfrom(65536)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if is_unreachable(exc):
                        self._error(exc)
                        continue
                    # Unexpected (e.g. ENOBUFS): log, and pause rather than spin.
                    if self._log.ready(anyio.current_time()):
                        log.warning("UDP receive on %s failed: %s", self.local_address, exc)
                    await anyio.sleep(0.05)
                    break
                received(data, addr)
            # Busy (a second datagram was waiting): read until empty at every
            # wake-up. Otherwise look for more only every few wake-ups.
            if idle:
                idle -= 1
            elif n <= 2:
                idle = IDLE_WAKES

    def _error(self, exc: OSError) -> None:
        """An error of the socket: ICMP port unreachable, or something to log."""
        if is_unreachable(exc):
            # A client socket is connected, so the error is about its one peer. A
            # server socket cannot tell which peer it was about: its sends time out.
            if self.role == "client" and self._handler is not None:
                self._handler._peer_lost(self.peer, UNREACHABLE)
        elif self._log.ready(anyio.current_time()):
            log.warning("UDP error on %s: %s", self.local_address, exc)

    def _queued_send_failed(self, addr: Address | None, exc: OSError) -> None:
        self._error(exc)

    def transmit(self, data: bytes, addr: Address, owner: Any = None) -> bool:
        outbox = self._outbox
        if outbox is None or self._closed:
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
        except OSError as exc:
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


def _send_some(sock: socket.socket, data: Any, addr: Address | None = None) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


class TCPTransport(TCPBase):
    """A listener and its connections (server), or one connection (client)."""

    def _make_conn(self, sock: socket.socket, addr: Address) -> Connection:
        outbox = self._outbox(
            functools.partial(_send_some, sock),
            functools.partial(trio.lowlevel.wait_writable, sock),
        )
        conn = Connection(addr, StreamDecoder(self.config.max_message_size), outbox)
        conn.io = sock
        return conn

    async def run(self, handler: Handler, *, task_status: TaskStatus[None]) -> None:
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
        listener = bind_tcp_listener(self.host, self.port)
        try:
            self.local_address = ip_addr(listener.getsockname())
            async with anyio.create_task_group() as tg:
                self._set_connected(True)
                task_status.started()
                await self._accept(listener, tg, handler)
        finally:
            trio.lowlevel.notify_closing(listener)
            listener.close()

    async def _accept(self, listener: socket.socket, tg: TaskGroup, handler: Handler) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, sockaddr = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("TCP accept on %s failed: %s", self.local_address, exc)
                await anyio.sleep(0.1)
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                sock.close()
                continue
            conn = self._make_conn(sock, ip_addr(sockaddr))
            if not self._admit(conn, handler):
                sock.close()
                continue
            tg.start_soon(self._serve, conn, handler, name=f"tcp connection {conn.peer}")

    async def _connect(self) -> Connection:
        sock = tcp_client_socket(self.host)
        try:
            with anyio.fail_after(CONNECT_TIMEOUT):
                try:
                    sock.connect((self.host, self.port))
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, os.strerror(err)) from None
            addr = ip_addr(sock.getpeername())
            self.local_address = ip_addr(sock.getsockname())
        except BaseException:
            sock.close()
            raise
        return self._make_conn(sock, addr)

    async def _serve(self, conn: Connection, handler: Handler) -> None:
        sock: socket.socket = conn.io
        try:
            with anyio.CancelScope() as scope:
                conn.scope = scope
                if conn.closed:
                    return
                async with anyio.create_task_group() as tg:
                    conn.outbox.attach(functools.partial(tg.start_soon, self._write, conn))
                    try:
                        await self._read(conn, sock, handler)
                    finally:
                        conn.outbox.attach(None)
                    tg.cancel_scope.cancel()
        finally:
            conn.closed = True
            trio.lowlevel.notify_closing(sock)
            sock.close()
            self._ended(conn, handler)

    async def _write(self, conn: Connection) -> None:
        try:
            await conn.outbox.run()
        except TimeoutError as exc:
            conn.close(f"was disconnected: {exc} (it is not reading)")
            log.warning("TCP peer %s %s", conn.peer, conn.reason)
        except OSError as exc:
            conn.close(f"connection lost ({exc})")

    async def _read(self, conn: Connection, sock: socket.socket, handler: Handler) -> None:
        recv = sock.recv
        decoder = conn.decoder
        try:
            while True:
                if not decoder.buffered:  # nothing half-received: no timer needed
                    await trio.lowlevel.wait_readable(sock)
                else:
                    deadline = self._read_deadline(conn)
                    with trio.CancelScope(deadline=deadline) as scope:
                        await trio.lowlevel.wait_readable(sock)
                    if scope.cancelled_caught:
                        self._stalled(conn)
                        return
                try:
                    # A new bytes object per read (allocated at READ_SIZE, shrunk):
                    # the framer's regular expressions scan bytes faster than a view.
                    chunk = recv(READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    conn.reason = f"connection lost ({exc})"
                    return
                if not chunk:
                    decoder.eof()
                    return
                conn.feed(chunk, handler)
        except FramingError as exc:
            self._unframeable(conn, exc)
