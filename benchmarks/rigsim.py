"""Helper process: ``count`` simulated rigs, each answering every signal at once.

    python rigsim.py --kind rignet --count 32
    python rigsim.py --kind iblutil --count 32

Every rig listens on its own UDP port on 127.0.0.1, echoes each signal (its
endpoint does) and immediately sends the completion update, echo-confirmed:
``[1, null]`` for init, ``[2, exp_ref, null]`` for start, ``[4, null]`` for
stop, ``[16, null]`` for interrupt, ``[8, null]`` for cleanup, ``[32, status]``
for status and ``[64, status, null]`` for info (what
:class:`trio_rignet.RigService` sends for a handler returning None).

``--kind rignet`` runs :class:`trio_rignet.RigService` rigs on Trio;
``--kind iblutil`` writes the same loop with iblutil's EchoProtocol (a callback
per event starting a confirmed send of the update), as an iblutil rig would.

Prints ``{"ready": true, "ports": [...]}``, then runs until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from functools import partial
from typing import Any

from _common import exit_when_stdin_closes, iblutil_server, quiet_logger, ready


async def rignet_rigs(count: int) -> None:
    from contextlib import AsyncExitStack

    import anyio

    from trio_rignet import RigService

    async with AsyncExitStack() as stack:
        ports = []
        for i in range(count):
            rig = await stack.enter_async_context(RigService("udp://127.0.0.1:0", name=f"rig{i}"))
            ports.append(rig.local_address[1])
        ready({"ports": ports})
        await anyio.sleep_forever()


async def open_iblutil_rigs(count: int) -> list[tuple[Any, int]]:
    """Open ``count`` iblutil rigs in the running asyncio loop: ``[(endpoint, port)]``."""
    from iblutil.io.net.base import ExpMessage

    log = quiet_logger("rig")
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()

    def reply_for(event: ExpMessage, data: list[Any]) -> list[Any]:
        if event is ExpMessage.EXPSTART:
            return [event, data[0] if data else None, None]
        if event is ExpMessage.EXPSTATUS:
            return [event, data[0] if data else None]
        if event is ExpMessage.EXPINFO:
            return [event, data[0] if data else None, None]
        return [event, None]

    async def confirm(com: Any, reply: list[Any], addr: tuple[str, int]) -> None:
        try:
            await com.confirmed_send(reply, addr=addr)
        except Exception as exc:  # an iblutil rig closes itself on a missed echo
            print(f"rigsim: {com.name} update failed: {exc!r}", file=sys.stderr)

    def on_signal(com: Any, event: ExpMessage, data: list[Any], addr: tuple[str, int]) -> None:
        task = loop.create_task(confirm(com, reply_for(event, data), tuple(addr[:2])))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    events = [
        ExpMessage.EXPINIT,
        ExpMessage.EXPSTART,
        ExpMessage.EXPEND,
        ExpMessage.EXPINTERRUPT,
        ExpMessage.EXPCLEANUP,
        ExpMessage.EXPSTATUS,
        ExpMessage.EXPINFO,
    ]
    rigs = []
    for i in range(count):
        com, port = await iblutil_server("udp", f"rig{i}", log)
        for event in events:
            com.assign_callback(event, partial(on_signal, com, event))
        rigs.append((com, port))
    return rigs


async def iblutil_rigs(count: int) -> None:
    rigs = await open_iblutil_rigs(count)
    ready({"ports": [port for _, port in rigs]})
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["rignet", "iblutil"], required=True)
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    exit_when_stdin_closes()
    if args.kind == "iblutil":
        asyncio.run(iblutil_rigs(args.count))
    else:
        import anyio

        anyio.run(rignet_rigs, args.count, backend="trio")


if __name__ == "__main__":
    main()
