"""Worker: confirmed-send round trip and throughput, for one library and backend.

    python roundtrip.py rtt --lib rignet --backend trio --scheme udp --where inproc
    python roundtrip.py rtt --lib iblutil --scheme ws --where xproc
    python roundtrip.py throughput --lib rignet --backend asyncio --senders 64 --peers 8

``rtt``: one sender, sequential confirmed sends; each repetition times ``--n``
round trips and reports microseconds per round trip. ``--where inproc`` puts
the echoing peer in the same process (same event loop), ``xproc`` in a
subprocess running the same library and backend (:mod:`echo_peer`; for
diagnosis ``--peer-lib`` and ``--peer-backend`` choose another).

``throughput``: ``--senders`` tasks send confirmed messages as fast as they can
for ``--duration`` seconds to ``--peers`` echo endpoints in a subprocess; each
repetition reports confirmed messages per second. trio-rignet senders share
one client endpoint per peer (it allows many sends in flight per endpoint);
iblutil allows one unconfirmed send per address, so each iblutil sender has
its own client endpoint. Sender ``i`` talks to peer ``i % peers``.

Prints one JSON line: ``{"ok": true, "values": [...]}`` or ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

from _common import (
    PAYLOAD,
    emit,
    iblutil_server,
    quiet_logger,
    repetitions,
    set_stepped,
    spawn,
    stop,
)


def peer_args(lib: str, backend: str, scheme: str, count: int) -> list[str]:
    return [
        sys.executable,
        "echo_peer.py",
        "--lib",
        lib,
        "--backend",
        backend,
        "--scheme",
        scheme,
        "--count",
        str(count),
    ]


# ---------------------------------------------------------------- trio-rignet


async def rignet_rtt(args: argparse.Namespace, ports: list[int] | None) -> list[float]:
    from trio_rignet import EchoProtocol

    async with AsyncExitStack() as stack:
        if ports is None:
            server = await stack.enter_async_context(
                EchoProtocol.server(f"{args.scheme}://127.0.0.1:0", name="peer")
            )
            port = server.local_address[1]
        else:
            port = ports[0]
        client = await stack.enter_async_context(
            EchoProtocol.client(f"{args.scheme}://127.0.0.1:{port}", name="sender")
        )
        send = client.confirmed_send
        for _ in range(args.warmup):
            await send(PAYLOAD)
        values = []
        for _ in repetitions(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.n):
                await send(PAYLOAD)
            values.append((time.perf_counter() - t0) / args.n * 1e6)
        return values


async def rignet_throughput(args: argparse.Namespace, ports: list[int]) -> list[float]:
    import anyio

    from trio_rignet import EchoProtocol

    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                EchoProtocol.client(f"udp://127.0.0.1:{port}", name=f"peer{i}")
            )
            for i, port in enumerate(ports)
        ]

        async def one_run(duration: float) -> float:
            counts = [0] * args.senders
            deadline = time.perf_counter() + duration

            async def sender(i: int) -> None:
                send = clients[i % len(clients)].confirmed_send
                payload = b'[64, 20, {"sender": %d}]' % i
                n = 0
                while time.perf_counter() < deadline:
                    await send(payload)
                    n += 1
                counts[i] = n

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(args.senders):
                    tg.start_soon(sender, i)
            return sum(counts) / (time.perf_counter() - t0)

        await one_run(min(0.2, args.duration))
        return [await one_run(args.duration) for _ in repetitions(args.reps)]


# -------------------------------------------------------------------- iblutil


async def iblutil_rtt(args: argparse.Namespace, ports: list[int] | None) -> list[float]:
    from iblutil.io.net.app import EchoProtocol

    log = quiet_logger()
    endpoints = []
    try:
        if ports is None:
            server, port = await iblutil_server(args.scheme, "peer", log)
            endpoints.append(server)
        else:
            port = ports[0]
        client = await EchoProtocol.client(
            f"{args.scheme}://127.0.0.1:{port}", name="sender", log=log
        )
        endpoints.append(client)
        send = client.confirmed_send
        for _ in range(args.warmup):
            await send(PAYLOAD)
        values = []
        for _ in repetitions(args.reps):
            t0 = time.perf_counter()
            for _ in range(args.n):
                await send(PAYLOAD)
            values.append((time.perf_counter() - t0) / args.n * 1e6)
        return values
    finally:
        close_iblutil(endpoints)


async def iblutil_throughput(args: argparse.Namespace, ports: list[int]) -> list[float]:
    from iblutil.io.net.app import EchoProtocol

    log = quiet_logger()
    clients: list[Any] = []
    try:
        for i in range(args.senders):
            port = ports[i % len(ports)]
            clients.append(
                await EchoProtocol.client(f"udp://127.0.0.1:{port}", name=f"s{i}", log=log)
            )

        async def one_run(duration: float) -> float:
            counts = [0] * args.senders
            deadline = time.perf_counter() + duration

            async def sender(i: int) -> None:
                send = clients[i].confirmed_send
                payload = b'[64, 20, {"sender": %d}]' % i
                n = 0
                while time.perf_counter() < deadline:
                    await send(payload)
                    n += 1
                counts[i] = n

            t0 = time.perf_counter()
            await asyncio.gather(*(sender(i) for i in range(args.senders)))
            return sum(counts) / (time.perf_counter() - t0)

        await one_run(min(0.2, args.duration))
        return [await one_run(args.duration) for _ in repetitions(args.reps)]
    finally:
        close_iblutil(clients)


def close_iblutil(endpoints: list[Any]) -> None:
    for ep in endpoints:
        ep.close()
        server = getattr(ep, "Server", None)
        if server is not None:
            server.close()


# ----------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["rtt", "throughput"])
    parser.add_argument("--lib", choices=["rignet", "iblutil"], required=True)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument("--scheme", choices=["udp", "ws"], default="udp")
    parser.add_argument("--where", choices=["inproc", "xproc"], default="inproc")
    parser.add_argument("--n", type=int, default=2000, help="round trips per repetition")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--peers", type=int, default=1)
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--peer-backend", choices=["trio", "asyncio"], help="default: --backend")
    parser.add_argument("--peer-lib", choices=["rignet", "iblutil"], help="default: --lib")
    parser.add_argument("--stepped", action="store_true", help="one repetition per 'go'")
    args = parser.parse_args()
    set_stepped(args.stepped)
    backend = "asyncio" if args.lib == "iblutil" else args.backend
    peer_backend = args.peer_backend or backend

    peer = None
    try:
        ports = None
        if args.what == "throughput" or args.where == "xproc":
            count = args.peers if args.what == "throughput" else 1
            peer_lib = args.peer_lib or args.lib
            peer, info = spawn(peer_args(peer_lib, peer_backend, args.scheme, count))
            ports = info["ports"]
        if args.lib == "rignet":
            import anyio

            fn = rignet_rtt if args.what == "rtt" else rignet_throughput
            values = anyio.run(fn, args, ports, backend=backend)
        else:
            fn = iblutil_rtt if args.what == "rtt" else iblutil_throughput
            values = asyncio.run(fn(args, ports))
        emit({"ok": True, "values": values})
    except Exception as exc:
        emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        stop(peer)


if __name__ == "__main__":
    main()
