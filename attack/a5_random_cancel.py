"""Cancel Services.open(wait=...)/init()/start() at random points (TCP and UDP, heartbeat on),
on trio and asyncio; any exception other than the cancellation (e.g. an ExceptionGroup) or a
later failing call is a bug. Usage: python attack/a5_random_cancel.py [trio|asyncio]
"""
import asyncio, random, sys
import anyio
from trio_rignet import RigService, Services

backend = sys.argv[1] if len(sys.argv) > 1 else "trio"
rng = random.Random(7)
problems = []


async def main():
    with anyio.fail_after(50):
        async with RigService("udp://127.0.0.1:0", name="u") as ru, RigService("ws://127.0.0.1:0", name="t") as rt:
            rigs = {"u": ru.local_uri, "t": rt.local_uri}
            for i in range(120):
                delay = rng.choice([0, 0, 1e-4, 5e-4, 1e-3, 3e-3, 1e-2]) if len(sys.argv) < 3 else rng.uniform(1e-3, 6e-3)
                try:
                    with anyio.move_on_after(delay) as outer:
                        async with Services.open(rigs, wait=2, trio_rigs=bool(i % 2), heartbeat=0.01) as srv:
                            await srv.init({"i": i})
                            await srv.start("2024-01-01_1_m")
                except BaseException as e:  # noqa
                    problems.append((i, delay, repr(e)[:200]))
                    if len(problems) == 1: import traceback; traceback.print_exc()
                # a fresh, uncancelled experiment must still work
                try:
                    async with Services.open(rigs, wait=2) as srv:
                        r = await srv.status("RUNNING")
                        assert set(r) == {"u", "t"}, r
                except BaseException as e:  # noqa
                    problems.append((i, "after", repr(e)[:200]))
    if backend == "asyncio":
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        print("tasks left:", left)
    print("problems:", problems[:10], "count", len(problems))

anyio.run(main, backend=backend)
