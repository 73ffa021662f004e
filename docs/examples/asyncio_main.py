"""The same API in a plain asyncio program: AnyIO runs it on asyncio, Trio is not needed."""

import asyncio
import sys
from typing import Any

from trio_rignet import Message, RigService, Services

video = RigService("udp://127.0.0.1:0", name="video")


@video.handle("init")
async def open_camera(msg: Message) -> dict[str, Any]:
    await asyncio.sleep(0.01)  # handlers may use asyncio directly
    return {"camera": "ready"}


async def main() -> None:
    async with video, Services.open({"video": video.local_uri}) as rigs:
        print("init:", await rigs.init())
        print("start:", await rigs.start("2024-01-01_1_mouse1"))
        print("stop:", await rigs.stop())
    print("trio imported:", "trio" in sys.modules)


asyncio.run(main())
