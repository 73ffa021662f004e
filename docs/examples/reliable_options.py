"""Reliability and security options: a rig that accepts loopback only, reliable UDP."""

import trio

from trio_rignet import RigService, Services


async def main() -> None:
    # The rig accepts signals from loopback only, and de-duplicates retransmissions.
    rig = RigService("udp://127.0.0.1:0", name="video", reliable=True, allow=["127.0.0.0/8"])
    rig.handle("init")(lambda msg: "ready")
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(rig.serve)
        # Options after `timeout` pass through to every rig's endpoint.
        async with Services.open({"video": f"udp://{host}:{port}"}, reliable=True) as rigs:
            print(await rigs.init())
            print("retransmits:", rigs["video"].stats.retransmits)
        nursery.cancel_scope.cancel()


trio.run(main)
