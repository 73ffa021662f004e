"""Flaky network: a `rignet serve` rig SIGSTOPped/SIGCONTed, then SIGKILLed and restarted on
the same port, while Services (heartbeat) watches. Reports watch() changes, call results and
how often the rig printed each signal. Usage: python attack/a3_stop_kill_restart.py [udp|ws] [trio|asyncio]
"""
import os, signal, socket, subprocess, sys, time
import anyio
from trio_rignet import Services, ServicesError

scheme = sys.argv[1] if len(sys.argv) > 1 else "udp"
backend = sys.argv[2] if len(sys.argv) > 2 else "trio"
RIGNET = os.path.join(os.path.dirname(sys.executable), "rignet")


def free_port():
    kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
uri = f"{scheme}://127.0.0.1:{port}"
logs = []


def start_rig(n):
    f = open(f"/tmp/a3_rig{n}_{scheme}.out", "w+")
    logs.append(f.name)
    p = subprocess.Popen([RIGNET, "serve", "--name", "video", uri], stdout=f, stderr=subprocess.STDOUT)
    time.sleep(1.0)
    return p


async def call(srv, label, data):
    t = anyio.current_time()
    try:
        r = await srv.init(data)
        print(f"{label}: ok {r} ({anyio.current_time()-t:.2f}s)")
    except ServicesError as e:
        print(f"{label}: FAIL {{k: type(v).__name__ for k, v in e.failures.items()}} = "
              f"{ {k: type(v).__name__ for k, v in e.failures.items()} } ({anyio.current_time()-t:.2f}s)")


async def main():
    rig = start_rig(1)
    changes = []
    try:
        with anyio.fail_after(45):
            async with Services.open({"video": uri}, timeout=2, echo_timeout=0.5, trio_rigs=True) as srv:
                async def watcher():
                    async with srv.watch() as ch:
                        async for c in ch:
                            print(f"  watch: {c.peer} {c.kind} restarted={c.restarted} t={c.at:.1f}")
                            changes.append((c.kind, c.restarted))
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watcher)
                    await anyio.sleep(0.6)
                    await call(srv, "init#1 healthy", "one")
                    os.kill(rig.pid, signal.SIGSTOP); print("SIGSTOP")
                    await anyio.sleep(1.5)
                    await call(srv, "init#2 while stopped", "two")
                    os.kill(rig.pid, signal.SIGCONT); print("SIGCONT")
                    await anyio.sleep(1.5)
                    await call(srv, "init#3 after SIGCONT", "three")
                    rig.kill(); rig.wait(); print("SIGKILL")
                    await anyio.sleep(1.5)
                    await call(srv, "init#4 while dead", "four")
                    rig = start_rig(2); print("restarted on same port")
                    await anyio.sleep(1.0)
                    await call(srv, "init#5 after restart", "five")
                    await anyio.sleep(0.5)
                    print("state:", srv.state["video"])
                    tg.cancel_scope.cancel()
    finally:
        rig.kill(); rig.wait()
    print("changes:", changes)
    for name in logs:
        text = open(name).read()
        print(f"--- {name}: init lines:", [l for l in text.splitlines() if "init" in l.lower()])

anyio.run(main, backend=backend)
