"""Trio/asyncio expert: close races and leftovers.
 A. blocking.Services.close() from another thread while init() blocks on a rig that never
    completes (ack=False): init must end promptly with a clear error, close must return.
 B. EchoProtocol/Services aclose twice and concurrently, and under cancellation.
 C. asyncio: tasks left after `async with Services.open` / RigService exits.
Usage: python attack/a4_close_races.py
"""
import asyncio, threading, time, traceback
import anyio
from trio_rignet import RigService, Services, EchoProtocol, blocking


def part_a():
    box = {}

    async def rig_main(ready, stop):
        async with RigService("udp://127.0.0.1:0", name="video", ack=False) as rig:
            box["uri"] = rig.local_uri
            ready.set()
            while not stop.is_set():
                await anyio.sleep(0.05)

    ready, stop = threading.Event(), threading.Event()

    async def runner():
        class E:  # thread-safe flag wrapper
            pass
        await rig_main(ready, stop)

    t = threading.Thread(target=lambda: anyio.run(runner), daemon=True)
    t.start()
    ready.wait(5)
    with blocking.Services.open({"video": box["uri"]}, timeout=20) as rigs:
        res = {}

        def caller():
            t0 = time.monotonic()
            try:
                res["r"] = rigs.init(None)
            except BaseException as e:  # noqa
                res["r"] = e
            res["dt"] = time.monotonic() - t0

        c = threading.Thread(target=caller)
        c.start()
        time.sleep(0.5)
        t0 = time.monotonic()
        rigs.close()
        print(f"A: close() returned after {time.monotonic()-t0:.2f}s")
        c.join(25)
        print("A: caller alive?", c.is_alive(), "result:", repr(res.get("r"))[:200], f"after {res.get('dt', -1):.2f}s")
        try:
            rigs.init(None)
        except BaseException as e:
            print("A: call after close ->", type(e).__name__, str(e)[:120])
    stop.set()
    t.join(5)


async def part_b():
    async with RigService("udp://127.0.0.1:0", name="video") as rig:
        async with EchoProtocol.client(rig.local_uri) as ep:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(ep.aclose)
            await ep.aclose()
        print("B: concurrent+double aclose inside the block ok")
        async with EchoProtocol.client(rig.local_uri) as ep2:
            with anyio.CancelScope() as cs:
                cs.cancel()
                await ep2.aclose()
            print("B: aclose under cancellation returned, cancelled_caught =", cs.cancelled_caught)
        print("B: block exit after cancelled aclose ok")
        async with Services.open({"video": rig.local_uri}) as srv:
            async with anyio.create_task_group() as tg:
                async def go():
                    try:
                        await srv.init(None)
                        print("B: init ok")
                    except BaseException as e:
                        print("B: init in flight during aclose ->", type(e).__name__, str(e)[:150])
                tg.start_soon(go)
                await anyio.sleep(0)
                await srv["video"].aclose()
            async with anyio.create_task_group() as tg:
                tg.start_soon(srv.aclose)
                tg.start_soon(srv.aclose)
        print("B: Services concurrent aclose ok")


async def part_c():
    before = set(asyncio.all_tasks())
    async with RigService("udp://127.0.0.1:0", name="video") as rig:
        async with Services.open({"video": rig.local_uri}, trio_rigs=True) as srv:
            await srv.init(None)
            await anyio.sleep(0.5)
        async with RigService("ws://127.0.0.1:0", name="v2") as rig2:
            async with Services.open({"v2": rig2.local_uri}, trio_rigs=True) as srv:
                await srv.init(None)
    await asyncio.sleep(0.05)
    left = [t for t in asyncio.all_tasks() if t not in before and t is not asyncio.current_task()]
    print("C: asyncio tasks left behind:", left)


part_a()
anyio.run(part_b)
anyio.run(part_b, backend="asyncio")
anyio.run(part_c, backend="asyncio")
