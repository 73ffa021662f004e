"""Mixing trio-rignet with other asyncio code: tasks, queues and asyncio timeouts."""

import asyncio
import contextlib

from trio_rignet import EchoProtocol, ExpStatus, Message, RigService, Services

video = RigService("udp://127.0.0.1:0", name="video")


@video.handle("init")
async def open_camera(msg: Message) -> str:
    await asyncio.sleep(0.2)  # slow to open
    return "camera ready"


async def heartbeat(ticks: list[int]) -> None:
    """Unrelated asyncio work that keeps running alongside."""
    while True:
        ticks.append(len(ticks))
        await asyncio.sleep(0.01)


async def main() -> None:
    completions: asyncio.Queue[tuple[str, Message]] = asyncio.Queue()

    def on_completion(msg: Message, rig: EchoProtocol) -> None:
        completions.put_nowait((rig.name, msg))  # a plain callback feeding an asyncio.Queue

    ticks: list[int] = []
    beat = asyncio.create_task(heartbeat(ticks))
    async with video, Services.open({"video": video.local_uri}) as rigs:
        rigs.assign_callback("status", on_completion, return_service=True)
        await rigs.status(ExpStatus.CONNECTED)
        name, msg = await asyncio.wait_for(completions.get(), timeout=1)
        print(f"queue: {name} sent {msg.event.name} {msg.data}")
        try:
            await asyncio.wait_for(rigs.init(), timeout=0.05)  # asyncio cancels it
        except asyncio.TimeoutError:
            print("init timed out; endpoints open:", rigs.is_connected)
        print("cleanup:", await rigs.cleanup())
    beat.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await beat
    print("heartbeat ran meanwhile:", len(ticks) > 1)


asyncio.run(main())
