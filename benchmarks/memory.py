"""Worker: memory of one library, in a fresh process per case.

    python memory.py sends --lib rignet --backend trio --n 100000
    python memory.py endpoints --lib iblutil --count 128

``sends``: a server and a client in this process (UDP); ``--n`` sequential
confirmed sends. Half-way and at the end it records the peak RSS
(``ru_maxrss``), the current RSS, the number of objects tracked by the
garbage collector and the number of memory blocks allocated by the
interpreter (``sys.getallocatedblocks()``, after ``gc.collect()``): if they
stay flat from ``n/2`` to ``n``, nothing is kept per message.

``endpoints``: one server and ``--count`` client endpoints to it, each having
made one confirmed send; records the peak RSS before opening them (after
imports) and with all of them open.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from contextlib import AsyncExitStack
from typing import Any

from _common import PAYLOAD, current_rss_kib, emit, iblutil_server, maxrss_kib, quiet_logger


def snapshot() -> dict[str, int]:
    gc.collect()
    return {
        "maxrss": maxrss_kib(),
        "rss": current_rss_kib(),
        "objects": len(gc.get_objects()),
        "blocks": sys.getallocatedblocks(),
    }


async def rignet_sends(n: int) -> dict[str, Any]:
    from trio_rignet import EchoProtocol

    async with (
        EchoProtocol.server("udp://127.0.0.1:0") as server,
        EchoProtocol.client(f"udp://127.0.0.1:{server.local_address[1]}") as client,
    ):
        start = snapshot()
        for _ in range(n // 2):
            await client.confirmed_send(PAYLOAD)
        half = snapshot()
        for _ in range(n - n // 2):
            await client.confirmed_send(PAYLOAD)
        end = snapshot()
    return {"start": start, "half": half, "end": end}


async def iblutil_sends(n: int) -> dict[str, Any]:
    from iblutil.io.net.app import EchoProtocol

    log = quiet_logger()
    server, port = await iblutil_server("udp", "peer", log)
    client = await EchoProtocol.client(f"udp://127.0.0.1:{port}", log=log)
    try:
        start = snapshot()
        for _ in range(n // 2):
            await client.confirmed_send(PAYLOAD)
        half = snapshot()
        for _ in range(n - n // 2):
            await client.confirmed_send(PAYLOAD)
        end = snapshot()
    finally:
        client.close()
        server.close()
    return {"start": start, "half": half, "end": end}


async def rignet_endpoints(count: int) -> dict[str, Any]:
    from trio_rignet import EchoProtocol

    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(EchoProtocol.server("udp://127.0.0.1:0"))
        uri = f"udp://127.0.0.1:{server.local_address[1]}"
        before = snapshot()
        for i in range(count):
            client = await stack.enter_async_context(EchoProtocol.client(uri, name=f"c{i}"))
            await client.confirmed_send(PAYLOAD)
        after = snapshot()
    return {"before": before, "after": after}


async def iblutil_endpoints(count: int) -> dict[str, Any]:
    from iblutil.io.net.app import EchoProtocol

    log = quiet_logger()
    server, port = await iblutil_server("udp", "peer", log)
    uri = f"udp://127.0.0.1:{port}"
    endpoints = [server]
    try:
        before = snapshot()
        for i in range(count):
            client = await EchoProtocol.client(uri, name=f"c{i}", log=log)
            endpoints.append(client)
            await client.confirmed_send(PAYLOAD)
        after = snapshot()
    finally:
        for ep in endpoints:
            ep.close()
    return {"before": before, "after": after}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["sends", "endpoints"])
    parser.add_argument("--lib", choices=["rignet", "iblutil"], required=True)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--count", type=int, default=128)
    args = parser.parse_args()
    try:
        if args.lib == "rignet":
            import anyio

            if args.what == "sends":
                result = anyio.run(rignet_sends, args.n, backend=args.backend)
            else:
                result = anyio.run(rignet_endpoints, args.count, backend=args.backend)
        elif args.what == "sends":
            result = asyncio.run(iblutil_sends(args.n))
        else:
            result = asyncio.run(iblutil_endpoints(args.count))
        emit({"ok": True, **result})
    except Exception as exc:
        emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
