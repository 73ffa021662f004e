"""A main PC and two auxiliary rigs: RigService on the rigs, Services on the main PC."""

from typing import Any

import trio

from trio_rignet import Message, RemoteError, RigService, Services, ServicesError

# --- the rigs (each would normally be its own program on its own PC) ---
video = RigService("udp://127.0.0.1:0", name="video")
ephys = RigService("ws://127.0.0.1:0", name="ephys")  # ws:// is plain TCP


@video.handle("init")
async def open_camera(msg: Message) -> dict[str, Any]:
    (settings,) = msg.data  # an init message is [1, data]
    await trio.sleep(0.01)  # async handlers may wait without blocking the rig
    return {"camera": "ready", "subject": settings["subject"]}  # the completion data


@video.handle("start")
async def record(msg: Message) -> str:
    exp_ref, _data = msg.data  # a start message is [2, exp_ref, data]
    return f"recording {exp_ref}"


@ephys.handle("init")
def count_probes(msg: Message) -> dict[str, int]:  # plain functions work too
    return {"probes": 2}


@ephys.handle("start")
def start_ephys(msg: Message) -> None:
    raise RuntimeError("probe01 is not connected")  # becomes an error report


# --- the main PC ---
async def main() -> None:
    async with video, ephys:  # both rigs listen until the block ends
        uris = {"video": video.local_uri, "ephys": ephys.local_uri}
        async with Services.open(uris, timeout=2.0) as rigs:
            print("init:", await rigs.init({"subject": "mouse1"}))
            try:
                await rigs.start("2024-01-01_1_mouse1")
            except ServicesError as err:
                print("start succeeded on:", err.responses)
                failure = err.failures["ephys"]
                if isinstance(failure, RemoteError):  # the rig reported an error
                    print("start failed on ephys:", failure.text)
            print("stop:", await rigs.stop())  # no stop handler: null completion data
            print("cleanup:", await rigs.cleanup())


trio.run(main)
