"""UDP and TCP transports on AnyIO: the only module that touches sockets.

A transport delivers each framed message to a :class:`Handler` from a receive
task (one per connection) and sends bytes to an address. It knows nothing of
echoes or events.

UDP uses a non-blocking standard socket driven by ``anyio.wait_readable``:
a datagram send is a single system call, so concurrent senders never contend
for a lock, and every wake-up drains all queued datagrams. TCP works the
same way on non-blocking stream sockets, framed with
:class:`~trio_rignet.StreamDecoder`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from typing import Literal, Protocol

import anyio
from anyio.abc import TaskGroup

from ._errors import FramingError, PeerUnavailable
from ._framing import StreamDecoder
from ._reliability import RateLimit

__all__ = ["Address", "Handler", "TCPTransport", "Transport", "UDPTransport", "open_transport"]

Address = tuple[str, int]
Role = Literal["client", "server"]

log = logging.getLogger("trio_rignet.transport")

UDP_MAX_PAYLOAD = 65507
"""The largest UDP payload over IPv4."""

_DRAIN = 256  # datagrams handled per wake-up before yielding to other tasks


class Handler(Protocol):
    """What a transport calls: implemented by the echo layer."""

    async def _message_received(self, raw: bytes, addr: Address) -> None:
        """One complete message arrived from ``addr``."""

    def _peer_lost(self, addr: Address, reason: str) -> None:
        """``addr`` cannot be reached any more (disconnected or refused)."""

    def _allows(self, addr: Address) -> bool:
        """May ``addr`` connect (TCP accept filter)?"""


class Transport(ABC):
    """A bound or connected socket (or listener) and its receive tasks."""

    kind: Literal["udp", "tcp"]

    def __init__(self, role: Role, host: str, port: int) -> None:
        self.role = role
        self.host = host
        self.port = port
        self.local_address: Address = ("", 0)
        self._closed = False
        self._connected = anyio.Event()

    async def wait_connected(self) -> None:
        """Wait until :attr:`is_connected` (at once for UDP and servers)."""
        while not self.is_connected and not self._closed:
            await self._connected.wait()

    def _set_connected(self, up: bool) -> None:
        if up:
            self._connected.set()
        elif self._connected.is_set():
            self._connected = anyio.Event()

    @property
    def peer(self) -> Address:
        """The remote address of a client transport."""
        return (self.host, self.port)

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True while the transport can send."""

    @abstractmethod
    async def open(self) -> None:
        """Bind, listen or connect. Raises ``OSError`` on failure."""

    @abstractmethod
    def start(self, tg: TaskGroup, handler: Handler) -> None:
        """Start the receive task(s) in ``tg``."""

    @abstractmethod
    async def send(self, data: bytes, addr: Address) -> None:
        """Send one message to ``addr``.

        Raises:
            PeerUnavailable: the peer is not connected or refuses datagrams.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close every socket. Idempotent. Call after the receive tasks ended."""


def open_transport(
    kind: str,
    role: Role,
    host: str,
    port: int,
    *,
    max_message_size: int,
    reconnect: bool = False,
    max_connections: int = 256,
) -> Transport:
    """Return an unopened transport for ``kind`` ``"udp"`` or ``"tcp"``."""
    if kind == "udp":
        return UDPTransport(role, host, port)
    return TCPTransport(role, host, port, max_message_size, reconnect, max_connections)


def _ip_addr(sockaddr: object) -> Address:
    """``(host, port)`` of an IPv4 or IPv6 socket address."""
    assert isinstance(sockaddr, tuple)
    return (str(sockaddr[0]), int(sockaddr[1]))


@contextlib.contextmanager
def _readable(sock: socket.socket) -> Iterator[Callable[[], Awaitable[object]]]:
    """Yield a function that waits until ``sock`` is readable, for one receive loop.

    On Trio that is trio's own ``wait_readable``. On asyncio the socket's reader
    stays registered for the life of the loop (registering and removing it on
    every wait, as ``anyio.wait_readable`` must, costs two ``epoll_ctl`` calls and
    a future per message). Elsewhere, AnyIO's ``wait_readable``.
    """
    trio = sys.modules.get("trio")  # not imported: not running under Trio
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            yield functools.partial(trio.lowlevel.wait_readable, sock)
            return
    try:
        loop = asyncio.get_running_loop()
        waiter = _AsyncioReadable(loop, sock)
    except (RuntimeError, NotImplementedError):  # not asyncio, or no add_reader
        yield functools.partial(anyio.wait_readable, sock)
        return
    try:
        yield waiter.wait
    finally:
        waiter.close()


class _AsyncioReadable:
    """Readiness of one socket on asyncio, from a reader registered once."""

    __slots__ = ("_fd", "_future", "_loop", "_ready")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._fd = sock.fileno()
        self._future: asyncio.Future[None] | None = None
        self._ready = False
        loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        self._ready = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self) -> None:
        if self._ready:
            # Readable already (level-triggered): still yield to other tasks.
            self._ready = False
            await anyio.lowlevel.checkpoint()
            return
        self._future = future = self._loop.create_future()
        try:
            await future
        finally:
            self._future = None
        self._ready = False

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class UDPTransport(Transport):
    """One UDP socket: bound for a server, connected to the peer for a client."""

    kind = "udp"

    def __init__(self, role: Role, host: str, port: int) -> None:
        super().__init__(role, host, port)
        self._sock: socket.socket | None = None

    @property
    def is_connected(self) -> bool:
        return self._sock is not None and not self._closed

    async def open(self) -> None:
        sock = socket.socket(_family(self.host), socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self.role == "server":
                sock.bind((self.host, self.port))
            else:
                sock.connect((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self.local_address = _ip_addr(sock.getsockname())
        self._set_connected(True)
        await anyio.lowlevel.checkpoint()

    def start(self, tg: TaskGroup, handler: Handler) -> None:
        tg.start_soon(self._receive_loop, handler, name=f"udp receive {self.local_address}")

    async def _receive_loop(self, handler: Handler) -> None:
        sock = self._sock
        assert sock is not None
        recvfrom = sock.recvfrom
        with _readable(sock) as wait_readable:
            while True:
                await wait_readable()
                for _ in range(_DRAIN):
                    try:
                        data, addr = recvfrom(65536)
                    except BlockingIOError:
                        break
                    except ConnectionRefusedError:
                        # ICMP port unreachable on a connected socket: the peer has
                        # nothing listening. Keep receiving; fail pending sends now.
                        refused = "nothing is listening there (connection refused)"
                        handler._peer_lost(self.peer, refused)
                        continue
                    except OSError as exc:  # pragma: no cover - e.g. ENOBUFS
                        log.warning("UDP receive on %s failed: %s", self.local_address, exc)
                        continue
                    await handler._message_received(data, addr[:2])

    async def send(self, data: bytes, addr: Address) -> None:
        sock = self._sock
        if sock is None or self._closed:
            raise PeerUnavailable(addr, "the endpoint is closed")
        while True:
            try:
                if self.role == "server":
                    sock.sendto(data, addr)
                else:
                    sock.send(data)
            except BlockingIOError:
                await anyio.wait_writable(sock)
            except ConnectionRefusedError:
                raise PeerUnavailable(
                    addr, "nothing is listening there (connection refused)"
                ) from None
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    raise ValueError(
                        f"message of {len(data)} bytes is too large for UDP; use a ws:// "
                        "(TCP) URI for large messages"
                    ) from None
                raise PeerUnavailable(addr, f"send failed: {exc}") from exc
            else:
                return

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected.set()
        if self._sock is not None:
            self._sock.close()
        await anyio.lowlevel.checkpoint_if_cancelled()


class _Connection:
    """One TCP connection: a non-blocking socket, its peer, decoder and send lock.

    A send that the kernel takes whole is one system call with no lock; the
    lock is claimed (synchronously) only when a write is partial, and held
    until the rest is written, so bytes of two messages never interleave.
    """

    __slots__ = ("closed", "decoder", "lock", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: Address, max_message_size: int) -> None:
        self.sock = sock
        self.peer = peer
        self.decoder = StreamDecoder(max_message_size)
        self.lock = anyio.Lock()
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise BrokenPipeError("connection closed")
        lock = self.lock
        if not lock.locked():
            sent = _send_some(self.sock, data)
            if sent == len(data):
                return
            lock.acquire_nowait()  # claim the stream before the first await
            try:
                await self._send_rest(memoryview(data)[sent:])
            finally:
                lock.release()
            return
        async with lock:
            await self._send_rest(memoryview(data))

    async def _send_rest(self, view: memoryview) -> None:
        while view:
            await anyio.wait_writable(self.sock)
            if self.closed:
                raise BrokenPipeError("connection closed")
            view = view[_send_some(self.sock, view) :]

    def close(self) -> None:
        """Close the socket, waking any task waiting on it. Idempotent."""
        if not self.closed:
            self.closed = True
            anyio.notify_closing(self.sock)
            self.sock.close()


def _send_some(sock: socket.socket, data: bytes | memoryview) -> int:
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def _tcp_socket(host: str) -> socket.socket:
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setblocking(False)
    return sock


async def _connect(host: str, port: int) -> socket.socket:
    sock = _tcp_socket(host)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except BaseException:
        sock.close()
        raise
    return sock


class TCPTransport(Transport):
    """A listening socket and its accepted connections (server), or one connection (client)."""

    kind = "tcp"

    def __init__(
        self,
        role: Role,
        host: str,
        port: int,
        max_message_size: int,
        reconnect: bool = False,
        max_connections: int = 256,
    ) -> None:
        super().__init__(role, host, port)
        self.max_message_size = max_message_size
        self.reconnect = reconnect
        self.max_connections = max_connections
        self._refused_log = RateLimit()
        self._listener: socket.socket | None = None
        self._conns: dict[Address, _Connection] = {}
        self._client_conn: _Connection | None = None

    @property
    def is_connected(self) -> bool:
        if self._closed:
            return False
        if self.role == "server":
            return self._listener is not None
        return self._client_conn is not None

    async def open(self) -> None:
        if self.role == "server":
            sock = _tcp_socket(self.host)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
            self._listener = sock
            self.local_address = _ip_addr(sock.getsockname())
            await anyio.lowlevel.checkpoint()
        else:
            self._client_conn = await self._connect_client()
        self._set_connected(True)

    async def _connect_client(self) -> _Connection:
        try:
            sock = await _connect(self.host, self.port)
        except OSError as exc:
            raise PeerUnavailable(self.peer, f"cannot connect over TCP: {exc}") from exc
        self.local_address = _ip_addr(sock.getsockname())
        return _Connection(sock, self.peer, self.max_message_size)

    def start(self, tg: TaskGroup, handler: Handler) -> None:
        if self._listener is not None:
            tg.start_soon(self._accept_loop, tg, handler, name=f"tcp accept {self.local_address}")
        elif self._client_conn is not None:
            tg.start_soon(self._client_loop, self._client_conn, handler)

    async def _client_loop(self, conn: _Connection, handler: Handler) -> None:
        delay = 0.05
        while True:
            await self._receive_loop(conn, handler)
            if not self.reconnect:
                return
            while True:  # reconnect with backoff, until cancelled (endpoint closing)
                await anyio.sleep(delay)
                try:
                    conn = await self._connect_client()
                except PeerUnavailable:
                    delay = min(delay * 2, 2.0)
                    continue
                self._client_conn = conn
                self._set_connected(True)
                log.info("TCP client reconnected to %s", self.peer)
                delay = 0.05
                break

    async def _accept_loop(self, tg: TaskGroup, handler: Handler) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            await anyio.wait_readable(listener)
            try:
                sock, sockaddr = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:  # pragma: no cover - EMFILE and friends
                log.warning("TCP accept on %s failed: %s", self.local_address, exc)
                await anyio.sleep(0.1)
                continue
            peer = _ip_addr(sockaddr)
            if not handler._allows(peer) or len(self._conns) >= self.max_connections:
                if self._refused_log.ready(anyio.current_time()):
                    why = "not allowed" if len(self._conns) < self.max_connections else "too many"
                    count = self._refused_log.take()
                    log.warning("TCP connection from %s refused (%s; %d refused)", peer, why, count)
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, peer, self.max_message_size)
            self._conns[peer] = conn
            tg.start_soon(self._receive_loop, conn, handler, name=f"tcp receive {peer}")

    async def _receive_loop(self, conn: _Connection, handler: Handler) -> None:
        reason = "closed the connection"
        sock = conn.sock
        recv = sock.recv
        feed = conn.decoder.feed
        try:
            with _readable(sock) as wait_readable:
                while True:
                    await wait_readable()
                    try:
                        chunk = recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        break  # reset by the peer
                    if not chunk:
                        conn.decoder.eof()
                        break
                    for raw in feed(chunk):
                        await handler._message_received(raw, conn.peer)
        except FramingError as exc:
            reason = f"sent a stream that cannot be framed ({exc}); disconnected"
            log.warning("TCP peer %s %s", conn.peer, reason)
        finally:
            if self._conns.get(conn.peer) is conn:
                del self._conns[conn.peer]
            if conn is self._client_conn:
                self._client_conn = None
                self._set_connected(False)
            conn.close()
        handler._peer_lost(conn.peer, reason)

    def _connection(self, addr: Address) -> _Connection:
        conn = self._client_conn if self.role == "client" else self._conns.get(addr)
        if conn is None:
            if self._closed:
                raise PeerUnavailable(addr, "the endpoint is closed")
            raise PeerUnavailable(addr, "not connected (the TCP peer disconnected)")
        return conn

    async def send(self, data: bytes, addr: Address) -> None:
        conn = self._connection(addr)
        try:
            await conn.send(data)
        except (OSError, anyio.ClosedResourceError) as exc:
            raise PeerUnavailable(addr, "the TCP connection was lost") from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected.set()
        conns = list(self._conns.values())
        if self._client_conn is not None:
            conns.append(self._client_conn)
        self._conns.clear()
        self._client_conn = None
        for conn in conns:
            conn.close()
        if self._listener is not None:
            anyio.notify_closing(self._listener)
            self._listener.close()
        await anyio.lowlevel.checkpoint_if_cancelled()
