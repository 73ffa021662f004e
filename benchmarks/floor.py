"""Worker: the floor, the same echo round trip with no library at all, in one process.

    python floor.py --kind selectors --scheme udp

Kinds:

``selectors``
    plain non-blocking ``socket`` objects and a ``selectors`` (epoll) loop:
    send, wait until the echoing socket is readable, echo, wait until the
    sender is readable, receive, compare. The cheapest a Python program can do.
``trio``
    raw ``trio.socket`` sockets: an echo task and the sending loop (what
    trio-rignet builds on, with one task switch per message as in the library).
``asyncio``
    ``loop.sock_recvfrom`` / ``sock_sendto`` (``sock_recv`` / ``sock_sendall`` on
    TCP) on raw sockets: an echo task and the sending loop.
``protocol``
    asyncio transports and protocols (``DatagramProtocol`` / ``Protocol``) with
    a future per message: what iblutil builds on.
``relay``
    ``selectors`` over UDP through :mod:`relay` (``--relay-ms`` each way): checks
    the delay the relay really adds.

TCP sockets set ``TCP_NODELAY``, as asyncio and Trio streams do. Prints one
JSON line with microseconds per round trip for each repetition.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import selectors
import socket
import subprocess
import sys
import time

from _common import PAYLOAD, emit, repetitions, set_stepped, spawn, stop

HOST = "127.0.0.1"


def pair(
    scheme: str, relay_ms: float | None = None
) -> tuple[socket.socket, socket.socket, socket.socket | None, subprocess.Popen[bytes] | None]:
    """(sender, echoer, listener, relay) connected over loopback, non-blocking.

    With ``relay_ms`` (UDP only) the sender talks to the echoer through
    :mod:`relay` adding ``relay_ms`` each way.
    """
    relay = None
    if scheme == "udp":
        echoer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        echoer.bind((HOST, 0))
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = echoer.getsockname()
        if relay_ms is not None:
            relay, info = spawn(
                [
                    sys.executable,
                    "relay.py",
                    "--delay-ms",
                    str(relay_ms),
                    "--targets",
                    str(target[1]),
                ]
            )
            target = (HOST, info["ports"][0])
        sender.connect(target)
        listener = None
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((HOST, 0))
        listener.listen()
        sender = socket.create_connection(listener.getsockname())
        echoer, _ = listener.accept()
        for s in (sender, echoer):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sender.setblocking(False)
    echoer.setblocking(False)
    return sender, echoer, listener, relay


def close_all(*socks: socket.socket | None) -> None:
    for s in socks:
        if s is not None:
            s.close()


def run_selectors(
    scheme: str, n: int, warmup: int, reps: int, relay_ms: float | None = None
) -> list[float]:
    sender, echoer, listener, relay = pair(scheme, relay_ms)
    sel = selectors.DefaultSelector()
    sel.register(sender, selectors.EVENT_READ, "sender")
    sel.register(echoer, selectors.EVENT_READ, "echoer")
    udp = scheme == "udp"
    size = len(PAYLOAD)

    def round_trip() -> None:
        sender.send(PAYLOAD)
        got = b""
        while True:
            for key, _ in sel.select():
                if key.data == "echoer":
                    if udp:
                        data, addr = echoer.recvfrom(65536)
                        echoer.sendto(data, addr)
                    else:
                        echoer.send(echoer.recv(65536))
                else:
                    got += sender.recv(65536)
                    if len(got) >= size:
                        if got != PAYLOAD:
                            raise RuntimeError(f"bad echo {got!r}")
                        return

    try:
        for _ in range(warmup):
            round_trip()
        values = []
        for _ in repetitions(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                round_trip()
            values.append((time.perf_counter() - t0) / n * 1e6)
        return values
    finally:
        sel.close()
        close_all(sender, echoer, listener)
        stop(relay)


async def run_trio(scheme: str, n: int, warmup: int, reps: int) -> list[float]:
    import trio

    raw_sender, raw_echoer, listener, _ = pair(scheme)
    sender = trio.socket.from_stdlib_socket(raw_sender)
    echoer = trio.socket.from_stdlib_socket(raw_echoer)
    udp = scheme == "udp"
    size = len(PAYLOAD)

    async def echo() -> None:
        while True:
            if udp:
                data, addr = await echoer.recvfrom(65536)
                await echoer.sendto(data, addr)
            else:
                data = await echoer.recv(65536)
                await echoer.send(data)

    async def round_trip() -> None:
        await sender.send(PAYLOAD)
        got = b""
        while len(got) < size:
            got += await sender.recv(65536)
        if got != PAYLOAD:
            raise RuntimeError(f"bad echo {got!r}")

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            for _ in range(warmup):
                await round_trip()
            values = []
            for _ in repetitions(reps):
                t0 = time.perf_counter()
                for _ in range(n):
                    await round_trip()
                values.append((time.perf_counter() - t0) / n * 1e6)
            nursery.cancel_scope.cancel()
        return values
    finally:
        sender.close()
        echoer.close()
        close_all(listener)


async def run_asyncio(scheme: str, n: int, warmup: int, reps: int) -> list[float]:
    loop = asyncio.get_running_loop()
    sender, echoer, listener, _ = pair(scheme)
    udp = scheme == "udp"
    size = len(PAYLOAD)

    async def echo() -> None:
        while True:
            if udp:
                data, addr = await loop.sock_recvfrom(echoer, 65536)
                await loop.sock_sendto(echoer, data, addr)
            else:
                data = await loop.sock_recv(echoer, 65536)
                await loop.sock_sendall(echoer, data)

    async def round_trip() -> None:
        await loop.sock_sendall(sender, PAYLOAD)
        got = b""
        while len(got) < size:
            got += await loop.sock_recv(sender, 65536)
        if got != PAYLOAD:
            raise RuntimeError(f"bad echo {got!r}")

    task = asyncio.create_task(echo())
    try:
        for _ in range(warmup):
            await round_trip()
        values = []
        for _ in repetitions(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                await round_trip()
            values.append((time.perf_counter() - t0) / n * 1e6)
        return values
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        close_all(sender, echoer, listener)


class _Echo(asyncio.DatagramProtocol, asyncio.Protocol):
    """Echoes every datagram (UDP) or chunk (TCP)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class _Sender(asyncio.DatagramProtocol, asyncio.Protocol):
    """Resolves ``self.future`` when the whole echo is in."""

    future: asyncio.Future[bytes] | None = None
    got = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= len(PAYLOAD) and self.future is not None:
            self.future.set_result(self.got)
            self.got = b""


async def run_protocol(scheme: str, n: int, warmup: int, reps: int) -> list[float]:
    loop = asyncio.get_running_loop()
    closers = []
    if scheme == "udp":
        et, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(HOST, 0))
        addr = et.get_extra_info("sockname")
        st, sender = await loop.create_datagram_endpoint(_Sender, remote_addr=addr)
        closers += [et, st]

        def send() -> None:
            st.sendto(PAYLOAD)
    else:
        server = await loop.create_server(_Echo, HOST, 0)
        addr = server.sockets[0].getsockname()
        st, sender = await loop.create_connection(_Sender, *addr)
        closers += [st]

        def send() -> None:
            st.write(PAYLOAD)

    async def round_trip() -> None:
        sender.future = loop.create_future()
        send()
        if await sender.future != PAYLOAD:
            raise RuntimeError("bad echo")

    try:
        for _ in range(warmup):
            await round_trip()
        values = []
        for _ in repetitions(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                await round_trip()
            values.append((time.perf_counter() - t0) / n * 1e6)
        return values
    finally:
        for c in closers:
            c.close()
        if scheme != "udp":
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["selectors", "trio", "asyncio", "protocol", "relay"])
    parser.add_argument("--relay-ms", type=float, default=1.0)
    parser.add_argument("--scheme", choices=["udp", "ws"], default="udp")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--stepped", action="store_true", help="one repetition per 'go'")
    args = parser.parse_args()
    set_stepped(args.stepped)
    a = (args.scheme, args.n, args.warmup, args.reps)
    try:
        if args.kind == "selectors":
            values = run_selectors(*a)
        elif args.kind == "relay":
            values = run_selectors(*a, relay_ms=args.relay_ms)
        elif args.kind == "trio":
            import trio

            values = trio.run(run_trio, *a)
        elif args.kind == "asyncio":
            values = asyncio.run(run_asyncio(*a))
        else:
            values = asyncio.run(run_protocol(*a))
        emit({"ok": True, "values": values})
    except Exception as exc:
        emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
