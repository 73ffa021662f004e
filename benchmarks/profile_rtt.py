"""Where the time goes: cProfile of trio-rignet's confirmed-send round trip.

    python benchmarks/profile_rtt.py                 # UDP, both ends in-process, Trio and asyncio
    python benchmarks/profile_rtt.py --services 32   # also Services cycles with 32 rigs
    python benchmarks/profile_rtt.py --scheme ws     # the round trip over TCP

The Services profile runs the main side and the RigService rigs in one process
(one event loop), so it shows the cost of both ends of every signal.

Prints, per backend, the share of total time by package (trio-rignet, AnyIO,
Trio or asyncio, the rest of the standard library, C built-ins), the top
functions by own time, what trio-rignet's calls into other packages cost, and
the cumulative share of trio-rignet's functions, as markdown. cProfile inflates
the cost of many small Python calls, so read shares, not absolute times (the
timed benchmark is ``run.py``). cProfile counts every resumption of a
coroutine as a call, so "calls per op" of ``async def`` functions is higher
than the number of times they are awaited.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import defaultdict
from contextlib import AsyncExitStack
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import EXP_REF, PAYLOAD


def group_of(filename: str) -> str:
    f = filename.replace("\\", "/")
    if "trio_rignet" in f:
        return "trio-rignet"
    if "/anyio/" in f:
        return "AnyIO"
    if "/trio/" in f:
        return "Trio"
    if "/asyncio/" in f:
        return "asyncio"
    if f.startswith("~") or f == "":
        return "C built-ins (socket calls, epoll, ...)"
    if "/benchmarks/" in f:
        return "benchmark loop"
    return "other stdlib"


def short(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename.startswith("~"):
        return name
    parts = filename.replace("\\", "/").split("/")
    for anchor in ("trio_rignet", "anyio", "trio", "asyncio"):
        if anchor in parts:
            parts = parts[parts.index(anchor) :]
            break
    else:
        parts = parts[-1:]
    return f"{'/'.join(parts)}:{line} {name}"


def report(prof: cProfile.Profile, title: str, per: int, top: int) -> None:
    stats = pstats.Stats(prof)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    groups: dict[str, float] = defaultdict(float)
    for func, (_cc, _nc, tt, _ct, _callers) in raw.items():
        groups[group_of(func[0])] += tt
    print(f"\n### {title}\n")
    print(f"{per} operations profiled; shares of profiled time by package (own time):\n")
    print("| package | share |\n|---|---:|")
    for name, tt in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {tt / total:.0%} |")
    print(f"\nTop {top} functions by own time:\n")
    print("| function | calls per op | own time share | cumulative share |\n|---|---:|---:|---:|")
    rows = sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]
    for func, (_cc, nc, tt, ct, _callers) in rows:
        print(f"| `{short(func)}` | {nc / per:.1f} | {tt / total:.1%} | {ct / total:.0%} |")
    # What the library's calls into other code cost: for every function called
    # directly from trio-rignet code, the cumulative time of those calls.
    spent: dict[Any, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for func, (_cc, _nc, _tt, _ct, callers) in raw.items():
        if "trio_rignet" in func[0]:
            continue
        for caller, (_ccc, cnc, _ctt, cct) in callers.items():
            if "trio_rignet" in caller[0]:
                spent[func][0] += cnc
                spent[func][1] += cct
    print(
        "\nCalls from trio-rignet into AnyIO, Trio, asyncio and the standard library, by "
        "cumulative time:\n"
    )
    print("| callee | calls per op | cumulative share |\n|---|---:|---:|")
    for func, (nc, ct) in sorted(spent.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| `{short(func)}` | {nc / per:.1f} | {ct / total:.0%} |")
    # Cumulative view of the library's own entry points.
    print("\nCumulative share of trio-rignet functions (time in them and below):\n")
    print("| function | calls per op | cumulative share |\n|---|---:|---:|")
    mine = [(f, v) for f, v in raw.items() if "trio_rignet" in f[0]]
    for func, (_cc, nc, _tt, ct, _callers) in sorted(mine, key=lambda kv: -kv[1][3])[:top]:
        print(f"| `{short(func)}` | {nc / per:.1f} | {ct / total:.0%} |")


async def rtt_loop(n: int, scheme: str) -> cProfile.Profile:
    from trio_rignet import EchoProtocol

    async with (
        EchoProtocol.server(f"{scheme}://127.0.0.1:0") as server,
        EchoProtocol.client(f"{scheme}://127.0.0.1:{server.local_address[1]}") as client,
    ):
        for _ in range(200):
            await client.confirmed_send(PAYLOAD)
        t0 = time.perf_counter()
        for _ in range(n):
            await client.confirmed_send(PAYLOAD)
        plain = time.perf_counter() - t0
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(n):
            await client.confirmed_send(PAYLOAD)
        prof.disable()
        dt = time.perf_counter() - t0
    print(f"\n(without the profiler: {plain / n * 1e6:.1f} us per round trip)")
    print(f"(profiled: {dt / n * 1e6:.0f} us per round trip under cProfile)")
    return prof


async def services_loop(count: int, cycles: int) -> cProfile.Profile:
    from trio_rignet import RigService, Services

    async with AsyncExitStack() as stack:
        rigs = {}
        for i in range(count):
            rig = await stack.enter_async_context(RigService("udp://127.0.0.1:0", name=f"rig{i}"))
            rigs[f"rig{i}"] = rig.local_uri
        services = await stack.enter_async_context(Services.open(rigs))

        async def cycle() -> None:
            await services.init({"subject": "mouse1"})
            await services.start(EXP_REF)
            await services.stop()
            await services.cleanup()

        await cycle()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(cycles):
            await cycle()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(
            f"\n(without the profiler: {wall / cycles * 1e3:.1f} ms per cycle, "
            f"{cpu / cycles / 4 / count * 1e6:.0f} us of CPU per rig and signal, both ends)"
        )
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(cycles):
            await cycle()
        prof.disable()
        dt = time.perf_counter() - t0
    print(f"\n(profiled: {dt / cycles * 1e3:.1f} ms per cycle under cProfile)")
    return prof


async def iblutil_services_cpu(count: int, cycles: int) -> float:
    """CPU seconds per cycle of iblutil's Services with ``count`` iblutil rigs, one process."""
    from _common import quiet_logger
    from iblutil.io.net.app import EchoProtocol, Services
    from rigsim import open_iblutil_rigs

    rigs = await open_iblutil_rigs(count)
    log = quiet_logger()
    clients = [
        await EchoProtocol.client(f"udp://127.0.0.1:{port}", name=f"rig{i}", log=log)
        for i, (_, port) in enumerate(rigs)
    ]
    try:
        services = Services(clients)

        async def cycle() -> None:
            await services.init({"subject": "mouse1"})
            await services.start(EXP_REF)
            await services.stop()
            await services.cleanup()

        await cycle()
        c0 = time.process_time()
        for _ in range(cycles):
            await cycle()
        return (time.process_time() - c0) / cycles
    finally:
        for ep in clients + [com for com, _ in rigs]:
            ep.close()


def main() -> None:
    import anyio

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000, help="round trips profiled")
    parser.add_argument("--scheme", choices=["udp", "ws"], default="udp", help="ws: TCP")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--services", type=int, default=0, help="also profile N-rig cycles")
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()
    for backend in ("trio", "asyncio"):
        prof = anyio.run(rtt_loop, args.n, args.scheme, backend=backend)
        transport = "UDP" if args.scheme == "udp" else "TCP"
        report(prof, f"Round trip, {transport}, in-process, {backend}", args.n, args.top)
    if args.services:
        for backend in ("trio", "asyncio"):
            prof = anyio.run(services_loop, args.services, args.cycles, backend=backend)
            title = f"Services cycle, {args.services} RigService rigs in one process, {backend}"
            report(prof, title, args.cycles, args.top)
        try:
            import asyncio

            cpu = asyncio.run(iblutil_services_cpu(args.services, args.cycles))
        except ImportError:
            print("\n(iblutil not installed: no comparison)")
        else:
            print(
                f"\nFor comparison, iblutil's Services with {args.services} iblutil rigs in one "
                f"process: {cpu * 1e3:.1f} ms of CPU per cycle, "
                f"{cpu / 4 / args.services * 1e6:.0f} us per rig and signal, both ends."
            )


if __name__ == "__main__":
    main()
