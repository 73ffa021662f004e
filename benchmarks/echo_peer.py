"""Helper process: ``count`` listening endpoints that echo every message.

    python echo_peer.py --lib rignet --backend trio --scheme udp --count 8

Prints ``{"ready": true, "ports": [...]}`` once listening, then runs until its
standard input closes. ``--lib iblutil`` uses iblutil's EchoProtocol on asyncio.
"""

from __future__ import annotations

import argparse
import asyncio

from _common import exit_when_stdin_closes, iblutil_server, quiet_logger, ready


async def rignet_peer(scheme: str, count: int) -> None:
    from contextlib import AsyncExitStack

    import anyio

    from trio_rignet import EchoProtocol

    async with AsyncExitStack() as stack:
        ports = []
        for i in range(count):
            ep = await stack.enter_async_context(
                EchoProtocol.server(f"{scheme}://127.0.0.1:0", name=f"peer{i}")
            )
            ports.append(ep.local_address[1])
        ready({"ports": ports})
        await anyio.sleep_forever()


async def iblutil_peer(scheme: str, count: int) -> None:
    log = quiet_logger("peer")
    ports = []
    for i in range(count):
        _, port = await iblutil_server(scheme, f"peer{i}", log)
        ports.append(port)
    ready({"ports": ports})
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", choices=["rignet", "iblutil"], required=True)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument("--scheme", choices=["udp", "ws"], default="udp")
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    exit_when_stdin_closes()
    if args.lib == "iblutil":
        asyncio.run(iblutil_peer(args.scheme, args.count))
    else:
        import anyio

        anyio.run(rignet_peer, args.scheme, args.count, backend=args.backend)


if __name__ == "__main__":
    main()
