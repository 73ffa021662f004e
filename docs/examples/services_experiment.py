"""A whole experiment from the main PC: info, init, start, status, stop, cleanup."""

import trio

from trio_rignet import ExpStatus, Message, RigService, Services

handled: list[str] = []  # the order in which rigs handle signals


def simulated_rig(name: str) -> RigService:
    """A rig that answers each signal with a short text (and status with the status)."""

    async def handle(msg: Message) -> str:
        await trio.sleep(0.005)  # simulated hardware work
        handled.append(name)
        return f"{name} did {msg.event.name}"

    events = ("info", "init", "start", "stop", "cleanup")  # no handler for status
    return RigService("udp://127.0.0.1:0", dict.fromkeys(events, handle), name=name)


def show(step: str, responses: dict[str, list[object]]) -> None:
    print(f"{step}:")
    for name, data in responses.items():
        print(f"  {name}: {data}")


async def main() -> None:
    rigs_ = [simulated_rig(name) for name in ("timeline", "video", "ephys")]
    async with trio.open_nursery() as nursery:
        uris = {}
        for rig in rigs_:
            host, port = await nursery.start(rig.serve)
            uris[rig.name] = f"udp://{host}:{port}"

        async with Services.open(uris, timeout=5.0) as rigs:
            show("info", await rigs.info(ExpStatus.CONNECTED))
            show("init", await rigs.init({"subject": "mouse1"}))
            show("start", await rigs.start("2024-01-01_1_mouse1"))
            show("status", await rigs.status(ExpStatus.RUNNING))
            # One rig after another, so that the order is visible: stop and
            # cleanup address the rigs in reverse order.
            handled.clear()
            show("stop", await rigs.stop(concurrent=False))
            print("stop handled by:", handled)
            handled.clear()
            show("cleanup", await rigs.cleanup(concurrent=False))
            print("cleanup handled by:", handled)

        nursery.cancel_scope.cancel()  # stop the rigs


trio.run(main)
