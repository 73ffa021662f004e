"""Worker: a full experiment cycle through Services against N simulated rigs.

    python services_cycle.py --lib rignet --backend trio --rigs iblutil --count 32 --relay-ms 1

Starts :mod:`rigsim` (``--count`` rigs of kind ``--rigs``) in a subprocess,
and with ``--relay-ms`` the :mod:`relay` in front of them, then opens one
client endpoint per rig and runs cycles of ``init``, ``start``, ``stop``,
``cleanup`` over UDP, each awaiting every rig's echo and completion update.
iblutil's Services run in their default concurrent mode. Each repetition runs
cycles for at least ``--min-time`` seconds and reports the mean milliseconds
per cycle (``values``) and this process's CPU time per rig and signal, in µs
(``cpu``: ``time.process_time()``, so the rigs and the relay, which run in
other processes, are not counted). The first failure ends the case:
``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import EXP_REF, emit, quiet_logger, repetitions, set_stepped, spawn, stop

INIT_DATA = {"subject": "mouse1"}


Measured = tuple[list[float], list[float]]


async def measure(
    cycle: Callable[[], Awaitable[None]], reps: int, min_time: float, rigs: int
) -> Measured:
    """Per repetition: ms per cycle, and µs of this process's CPU per rig and signal."""
    await cycle()  # warm-up (and proves every rig answers)
    values = []
    cpu = []
    for _ in repetitions(reps):
        count = 0
        c0 = time.process_time()
        t0 = time.perf_counter()
        while True:
            await cycle()
            count += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        used = time.process_time() - c0
        values.append(elapsed / count * 1e3)
        cpu.append(used / (count * 4 * rigs) * 1e6)
    return values, cpu


def check(responses: dict[str, Any], count: int, what: str) -> None:
    if len(responses) != count:
        raise RuntimeError(f"{what}: {len(responses)} of {count} rigs answered")


async def rignet_main(args: argparse.Namespace, ports: list[int]) -> Measured:
    from trio_rignet import Services

    rigs = {f"rig{i}": f"udp://127.0.0.1:{port}" for i, port in enumerate(ports)}
    heartbeat = None if args.no_heartbeat else 0.2
    async with Services.open(rigs, timeout=args.timeout, heartbeat=heartbeat) as services:

        async def cycle() -> None:
            check(await services.init(INIT_DATA), args.count, "init")
            check(await services.start(EXP_REF), args.count, "start")
            check(await services.stop(), args.count, "stop")
            check(await services.cleanup(), args.count, "cleanup")

        return await measure(cycle, args.reps, args.min_time, args.count)


async def iblutil_main(args: argparse.Namespace, ports: list[int]) -> Measured:
    from iblutil.io.net.app import EchoProtocol, Services

    log = quiet_logger()
    clients = []
    try:
        for i, port in enumerate(ports):
            clients.append(
                await EchoProtocol.client(f"udp://127.0.0.1:{port}", name=f"rig{i}", log=log)
            )
        services = Services(clients, timeout=args.timeout)

        async def cycle() -> None:
            check(await services.init(INIT_DATA), args.count, "init")
            check(await services.start(EXP_REF), args.count, "start")
            check(await services.stop(), args.count, "stop")
            check(await services.cleanup(), args.count, "cleanup")

        return await measure(cycle, args.reps, args.min_time, args.count)
    finally:
        for client in clients:
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", choices=["rignet", "iblutil"], required=True)
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument("--rigs", choices=["rignet", "iblutil"], required=True)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--relay-ms", type=float, default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.3)
    parser.add_argument("--timeout", type=float, default=5.0, help="completion timeout, s")
    parser.add_argument(
        "--no-heartbeat", action="store_true", help="trio-rignet: no heartbeats to the rigs"
    )
    parser.add_argument("--stepped", action="store_true", help="one repetition per 'go'")
    args = parser.parse_args()
    set_stepped(args.stepped)
    rigsim = relay = None
    try:
        rigsim, info = spawn(
            [sys.executable, "rigsim.py", "--kind", args.rigs, "--count", str(args.count)],
            timeout=60,
        )
        ports = info["ports"]
        if args.relay_ms is not None:
            relay, info = spawn(
                [
                    sys.executable,
                    "relay.py",
                    "--delay-ms",
                    str(args.relay_ms),
                    "--targets",
                    ",".join(map(str, ports)),
                ]
            )
            ports = info["ports"]
        if args.lib == "rignet":
            import anyio

            values, cpu = anyio.run(rignet_main, args, ports, backend=args.backend)
        else:
            values, cpu = asyncio.run(iblutil_main(args, ports))
        emit({"ok": True, "values": values, "cpu": cpu})
    except Exception as exc:
        emit({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        stop(relay)
        stop(rigsim)


if __name__ == "__main__":
    main()
