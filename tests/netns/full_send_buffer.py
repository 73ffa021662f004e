"""Run inside a network namespace whose loopback is rate-limited (see test_netns.py).

A rig answers a burst of signals at once while its UDP send buffer is full
(the rate limit holds packets, and ``sendto`` reports EAGAIN). Prints one JSON
line: what each signal ended with, and whether the rig still answers after.

    python full_send_buffer.py trio|asyncio
"""

from __future__ import annotations

import json
import socket
import sys

import anyio

from trio_rignet import (
    EchoTimeout,
    PeerUnavailable,
    RemoteError,
    RigService,
    Services,
    ServicesError,
)

SIGNALS = 100


def send_buffer_fills() -> bool:
    """The precondition: on this loopback, a burst of datagrams gets EAGAIN."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.setblocking(False)
            for _ in range(1000):
                try:
                    tx.sendto(b"x" * 8000, rx.getsockname())
                except BlockingIOError:
                    return True
    return False


async def main() -> dict[str, object]:
    outcomes: dict[str, int] = {}
    async with anyio.create_task_group() as tg:
        rig = RigService("udp://127.0.0.1:0", name="rig", max_handlers=2 * SIGNALS)
        rig.handle("init")(lambda msg: "x" * 4000)  # completions fill the send buffer too
        await tg.start(rig.serve)
        async with Services.open({"rig": rig.local_uri}, timeout=30, echo_timeout=30) as main:
            endpoint = main["rig"]

            async def one(i: int) -> None:
                try:
                    await endpoint.call([1, {"i": i, "pad": "y" * 4000}], timeout=30)
                    key = "completed"
                except (EchoTimeout, PeerUnavailable, RemoteError, ValueError) as exc:
                    key = type(exc).__name__
                outcomes[key] = outcomes.get(key, 0) + 1

            async with anyio.create_task_group() as burst:
                for i in range(SIGNALS):
                    burst.start_soon(one, i)
            try:
                after = len((await main.init("after"))["rig"][0])
            except ServicesError as exc:
                after = str(exc)
        tg.cancel_scope.cancel()
    return {"full": send_buffer_fills(), "outcomes": outcomes, "after": after}


if __name__ == "__main__":
    print(json.dumps(anyio.run(main, backend=sys.argv[1])), flush=True)
