"""Fault injection for tests: UDP and TCP relays on loopback.

``UDPRelay`` sits between a client and a server and drops, duplicates,
reorders and delays datagrams, each decision drawn from a seeded random
generator per direction. ``TCPRelay`` splits and coalesces the byte stream at
random points and can stall or cut its connections.

Both run in a task group: ``address = await tg.start(relay.serve)``; clients
connect to ``address`` instead of the server.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel
from anyio.abc import ConnectedUDPSocket, SocketStream, TaskGroup, TaskStatus, UDPSocket

Address = tuple[str, int]


@dataclass
class Faults:
    """What happens to datagrams in one direction (probabilities per datagram)."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0  # extra delay drawn uniformly from [0, delay] seconds
    seed: int = 0
    rng: random.Random = field(init=False)
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    forwarded: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)


class _Direction:
    """Applies :class:`Faults` to a stream of datagrams sent with ``send``."""

    def __init__(
        self, faults: Faults, send: Callable[[bytes], Awaitable[None]], tg: TaskGroup
    ) -> None:
        self.faults = faults
        self.send = send
        self.tg = tg
        self.held: bytes | None = None
        self.lock = anyio.Lock()  # AnyIO sockets refuse concurrent sends

    async def push(self, data: bytes) -> None:
        f = self.faults
        rng = f.rng
        if rng.random() < f.loss:
            f.dropped += 1
            return
        copies = 1
        if rng.random() < f.duplicate:
            copies = 2
            f.duplicated += 1
        for _ in range(copies):
            if self.held is None and rng.random() < f.reorder:
                # Hold this one back: it goes out after the next datagram, or
                # on its own shortly if none follows.
                f.reordered += 1
                self.held = data
                self.tg.start_soon(self._flush_later, data)
                continue
            await self._emit(data)
            if self.held is not None:
                held, self.held = self.held, None
                await self._emit(held)

    async def _flush_later(self, data: bytes) -> None:
        await anyio.sleep(0.01)
        if self.held is data:
            self.held = None
            await self._emit(data)

    async def _emit(self, data: bytes) -> None:
        if self.faults.delay > 0:
            self.tg.start_soon(self._delayed, data, self.faults.rng.uniform(0, self.faults.delay))
        else:
            await self._send_quietly(data)

    async def _delayed(self, data: bytes, delay: float) -> None:
        await anyio.sleep(delay)
        await self._send_quietly(data)

    async def _send_quietly(self, data: bytes) -> None:
        self.faults.forwarded += 1
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async with self.lock:
                await self.send(data)


class UDPRelay:
    """Forward datagrams between clients and ``target``, with faults."""

    def __init__(self, target: Address, up: Faults | None = None, down: Faults | None = None):
        self.target = target
        self.up = up or Faults()
        self.down = down or Faults(seed=self.up.seed + 1)

    async def serve(self, *, task_status: TaskStatus[Address]) -> None:
        async with (
            await anyio.create_udp_socket(local_host="127.0.0.1") as front,
            anyio.create_task_group() as tg,
        ):
            host, port = front.extra(anyio.abc.SocketAttribute.local_address)[:2]  # type: ignore[index]
            task_status.started((str(host), int(port)))
            upstreams: dict[Address, tuple[ConnectedUDPSocket, _Direction]] = {}
            async for data, client in front:
                entry = upstreams.get(client)
                if entry is None:
                    upstream = await anyio.create_connected_udp_socket(
                        self.target[0], self.target[1], local_host="127.0.0.1"
                    )
                    entry = (upstream, _Direction(self.up, upstream.send, tg))
                    upstreams[client] = entry
                    tg.start_soon(self._downstream, front, upstream, client, tg)
                await entry[1].push(data)

    async def _downstream(
        self, front: UDPSocket, upstream: ConnectedUDPSocket, client: Address, tg: TaskGroup
    ) -> None:
        async def send(data: bytes) -> None:
            await front.sendto(data, client[0], client[1])

        direction = _Direction(self.down, send, tg)
        async with upstream:
            while True:
                try:
                    data = await upstream.receive()
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    # ICMP refused while the server is down: keep relaying.
                    await anyio.lowlevel.checkpoint()
                    continue
                await direction.push(data)


class TCPRelay:
    """Forward TCP connections to ``target``, re-cutting the byte stream at random points.

    ``split``: probability of cutting a chunk into random pieces written
    separately; ``coalesce``: probability of holding a chunk back to be written
    together with the next one. :meth:`stall` stops forwarding until
    :meth:`resume`; :meth:`cut` closes every relayed connection.
    """

    def __init__(
        self, target: Address, *, seed: int = 0, split: float = 0.5, coalesce: float = 0.5
    ) -> None:
        self.target = target
        self.rng = random.Random(seed)
        self.split = split
        self.coalesce = coalesce
        self._running = anyio.Event()
        self._running.set()
        self._streams: list[SocketStream] = []

    def stall(self) -> None:
        """Stop forwarding bytes (connections stay open)."""
        self._running = anyio.Event()

    def resume(self) -> None:
        """Forward again after :meth:`stall`."""
        self._running.set()

    async def cut(self) -> None:
        """Close every relayed connection, both sides."""
        streams, self._streams = self._streams, []
        for stream in streams:
            await stream.aclose()

    async def serve(self, *, task_status: TaskStatus[Address]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        async with listener, anyio.create_task_group() as tg:
            host, port = listener.extra(anyio.abc.SocketAttribute.local_address)[:2]  # type: ignore[index]
            task_status.started((str(host), int(port)))
            await listener.serve(self._relay, task_group=tg)

    async def _relay(self, client: SocketStream) -> None:
        try:
            server = await anyio.connect_tcp(*self.target)
        except OSError:
            await client.aclose()
            return
        self._streams += [client, server]
        async with client, server, anyio.create_task_group() as tg:
            tg.start_soon(self._pump, client, server, tg.cancel_scope)
            tg.start_soon(self._pump, server, client, tg.cancel_scope)

    async def _pump(self, src: SocketStream, dst: SocketStream, scope: anyio.CancelScope) -> None:
        held = b""
        try:
            while True:
                if held:
                    with anyio.move_on_after(0.005):
                        chunk = await src.receive()
                        held += chunk
                    data, held = held, b""
                else:
                    chunk = await src.receive()
                    if self.rng.random() < self.coalesce:
                        held = chunk
                        continue
                    data = chunk
                await self._running.wait()
                await self._write(dst, data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            if held:
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await self._write(dst, held)
        finally:
            scope.cancel()

    async def _write(self, dst: SocketStream, data: bytes) -> None:
        if len(data) > 1 and self.rng.random() < self.split:
            cuts = sorted(self.rng.sample(range(1, len(data)), k=min(len(data) - 1, 3)))
            start = 0
            for cut in [*cuts, len(data)]:
                await dst.send(data[start:cut])
                await anyio.lowlevel.checkpoint()
                start = cut
        else:
            await dst.send(data)


__all__ = ["Faults", "TCPRelay", "UDPRelay"]
