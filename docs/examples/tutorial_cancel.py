"""Cancelling a signal with trio.move_on_after, and what that leaves behind."""

import trio

from trio_rignet import Message, RigService, Services

video = RigService("udp://127.0.0.1:0", name="video")


@video.handle("init")
async def open_camera(msg: Message) -> str:
    await trio.sleep(0.2)  # a camera that is slow to open
    return "camera ready"


async def main() -> None:
    async with video, Services.open({"video": video.local_uri}) as rigs:
        # Subscribed before sending, so that the late completion cannot be missed.
        async with rigs["video"].subscribe("init") as completions:
            with trio.move_on_after(0.05) as scope:
                await rigs.init()  # echoed at once, but the completion takes 0.2 s
            print("init cancelled:", scope.cancelled_caught)
            print("main PC awaiting an echo:", rigs["video"].awaiting_response())
            print("endpoints open:", rigs.is_connected)
            # The rig never heard of the cancellation: its handler runs to the end
            # and its completion update arrives later. Nothing else waits for it.
            with trio.fail_after(5):
                async for msg in completions:
                    print("late completion:", msg.data)
                    break
        print("cleanup:", await rigs.cleanup())  # the endpoints work as before


trio.run(main)
