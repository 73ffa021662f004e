"""Small helpers shared by the endpoint tests: URIs, a fake Alyx client, raw socket peers.

Raw peers are plain AnyIO sockets on loopback that speak bytes, not the
protocol: tests use them to play a misbehaving or silent peer and to see
exactly what an endpoint puts on the wire. Every one is an async context
manager, so no socket outlives its test.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketListener, SocketStream, UDPSocket

from trio_rignet import EchoProtocol, StreamDecoder
from trio_rignet._tag import read_tag, strip_tag

LOCALHOST = "127.0.0.1"

Address = tuple[str, int]


def uri_of(endpoint: EchoProtocol) -> str:
    """``"scheme://127.0.0.1:PORT"`` of the address ``endpoint`` is bound to."""
    host, port = endpoint.local_address
    return f"{endpoint.protocol}://{host}:{port}"


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A loopback port that nothing listens on (bound, then released at once)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def untag(raw: bytes) -> bytes:
    """``raw`` as iblutil would have sent it: without its trio-rignet tag (which it must carry).

    Every message a trio-rignet endpoint originates carries a tag in JSON
    whitespace before its closing bracket (see ``trio_rignet._tag``); what is
    left once it is removed is exactly iblutil's bytes.
    """
    assert read_tag(raw) is not None, f"no trio-rignet tag in {raw!r}"
    return strip_tag(raw)


@dataclass
class FakeAlyx:
    """Duck-typed stand-in for ``one.webclient.AlyxClient``."""

    base_url: str = "https://alyx.example.org"
    user: str = "experimenter"
    _token: str = field(default="0123456789abcdef")
    is_logged_in: bool = True


class RawUDP:
    """A bound UDP socket: send bytes anywhere, receive raw datagrams."""

    def __init__(self, sock: UDPSocket) -> None:
        self.sock = sock
        self.address: Address = sock.extra(SocketAttribute.local_address)[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    async def send(self, data: bytes, addr: Address) -> None:
        if not data:
            # asyncio (Python < 3.12) silently skips empty datagrams: send one from a
            # duplicate of the same socket, so it still comes from self.address.
            fd = os.dup(self.sock.extra(SocketAttribute.raw_socket).fileno())
            with socket.socket(fileno=fd) as dup:
                dup.sendto(data, addr)
            await anyio.lowlevel.checkpoint()
            return
        await self.sock.sendto(data, addr[0], addr[1])

    async def recv(self) -> tuple[bytes, Address]:
        data, addr = await self.sock.receive()
        return data, (addr[0], addr[1])


class RawTCP:
    """One TCP stream: write raw bytes, read raw bytes or whole framed messages."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.address: Address = stream.extra(SocketAttribute.local_address)[:2]
        self._decoder = StreamDecoder()
        self._messages: list[bytes] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def recv_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes (do not mix with :meth:`recv_message`)."""
        buf = bytearray()
        while len(buf) < n:
            buf += await self.stream.receive(n - len(buf))
        return bytes(buf)

    async def recv_message(self) -> bytes:
        """The next whole message, however the stream was cut."""
        while not self._messages:
            self._messages.extend(self._decoder.feed(await self.stream.receive()))
        return self._messages.pop(0)

    async def wait_closed(self) -> None:
        """Return once the other side has closed the connection (drain what is left)."""
        try:
            while True:
                await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def raw_udp() -> AsyncIterator[RawUDP]:
    """A UDP socket bound to a free loopback port."""
    async with await anyio.create_udp_socket(
        family=socket.AF_INET, local_host=LOCALHOST, local_port=0
    ) as sock:
        yield RawUDP(sock)


@asynccontextmanager
async def raw_tcp_client(port: int) -> AsyncIterator[RawTCP]:
    """A TCP connection to ``127.0.0.1:port``."""
    stream = await anyio.connect_tcp(LOCALHOST, port)
    peer = RawTCP(stream)
    try:
        yield peer
    finally:
        await peer.aclose()


@asynccontextmanager
async def raw_tcp_listener() -> AsyncIterator[SocketListener]:
    """A TCP listener on a free loopback port (``listener_port(listener)``; accept yourself)."""
    multi = await anyio.create_tcp_listener(local_host=LOCALHOST, local_port=0)
    listener = multi.listeners[0]
    assert isinstance(listener, SocketListener)
    async with multi:
        yield listener


def listener_port(listener: SocketListener) -> int:
    return int(listener.extra(SocketAttribute.local_address)[1])


class RawServer:
    """A raw peer listening on a free port, for a client endpoint to talk to.

    :meth:`recv` returns the next message the client sent (a datagram, or a
    framed message over TCP) and :meth:`send` writes bytes back to that client.
    Over TCP it accepts the one client connection in the background.
    """

    def __init__(self, scheme: str, port: int) -> None:
        self.scheme = scheme
        self.port = port
        self.uri = f"{scheme}://{LOCALHOST}:{port}"
        self.udp: RawUDP | None = None
        self.client_addr: Address | None = None
        self.tcp: RawTCP | None = None
        self._accepted = anyio.Event()

    async def recv(self) -> bytes:
        if self.udp is not None:
            data, self.client_addr = await self.udp.recv()
            return data
        await self._accepted.wait()
        assert self.tcp is not None
        return await self.tcp.recv_message()

    async def send(self, data: bytes) -> None:
        if self.udp is not None:
            assert self.client_addr is not None, "recv() from the client first"
            await self.udp.send(data, self.client_addr)
            return
        await self._accepted.wait()
        assert self.tcp is not None
        await self.tcp.send(data)

    async def disconnect(self) -> None:
        """Close the accepted TCP connection."""
        await self._accepted.wait()
        assert self.tcp is not None
        await self.tcp.aclose()


@asynccontextmanager
async def raw_server(scheme: str) -> AsyncIterator[RawServer]:
    """A :class:`RawServer` for ``scheme`` ``"udp"`` or a TCP scheme (``"ws"``)."""
    if scheme == "udp":
        async with raw_udp() as udp:
            server = RawServer(scheme, udp.port)
            server.udp = udp
            yield server
        return
    async with raw_tcp_listener() as listener:
        server = RawServer(scheme, listener_port(listener))

        async def accept_one() -> None:
            server.tcp = RawTCP(await listener.accept())
            server._accepted.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(accept_one)
                try:
                    yield server
                finally:
                    tg.cancel_scope.cancel()
        finally:
            # Never await inside the cancelled scope above: the Cancelled would
            # replace (and the scope then swallow) an exception raised by the test.
            if server.tcp is not None:
                with anyio.CancelScope(shield=True):
                    await server.tcp.aclose()


class RawClient:
    """A raw peer of a server endpoint: :meth:`send` bytes to it, :meth:`recv` messages back."""

    def __init__(self, udp: RawUDP | None, tcp: RawTCP | None, server: Address) -> None:
        self._udp = udp
        self._tcp = tcp
        self.server = server
        self.address: Address = udp.address if udp is not None else tcp.address  # type: ignore[union-attr]

    async def send(self, data: bytes) -> None:
        if self._udp is not None:
            await self._udp.send(data, self.server)
        else:
            assert self._tcp is not None
            await self._tcp.send(data)

    async def recv(self) -> bytes:
        if self._udp is not None:
            data, _ = await self._udp.recv()
            return data
        assert self._tcp is not None
        return await self._tcp.recv_message()


@asynccontextmanager
async def raw_client(endpoint: EchoProtocol) -> AsyncIterator[RawClient]:
    """A raw peer (UDP socket or TCP connection) of the server ``endpoint``."""
    server = (LOCALHOST, endpoint.local_address[1])
    if endpoint.protocol == "udp":
        async with raw_udp() as udp:
            yield RawClient(udp, None, server)
    else:
        async with raw_tcp_client(server[1]) as tcp:
            yield RawClient(None, tcp, server)
