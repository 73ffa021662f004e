"""Services built from endpoints you opened yourself, each with its own options."""

import trio

from trio_rignet import EchoProtocol, RigService, Services


async def main() -> None:
    async with (
        RigService("udp://127.0.0.1:0", name="video") as video_rig,
        RigService("ws://127.0.0.1:0", name="ephys") as ephys_rig,
        # Your endpoints, your options: a longer echo timeout for the TCP rig.
        EchoProtocol.client(video_rig.local_uri, name="video") as video,
        EchoProtocol.client(ephys_rig.local_uri, name="ephys", echo_timeout=3.0) as ephys,
    ):
        rigs = Services([video, ephys], timeout=5.0)  # keyed by endpoint name
        print("rigs:", list(rigs))
        print("init:", await rigs.init())
        # Services is immutable; a new one can address a subset of the endpoints.
        only_video = Services({"video": rigs["video"]})
        print("status:", await only_video.status("RUNNING"))
        # The endpoints stay yours: they close when their `async with` ends.
        print("video still open:", video.is_connected)


trio.run(main)
