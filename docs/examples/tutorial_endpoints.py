"""Two bare endpoints: a rig that listens and a main PC that sends confirmed signals."""

import trio

from trio_rignet import EchoProtocol, ExpMessage


async def main() -> None:
    # The rig binds a local address; port 0 picks a free port.
    async with EchoProtocol.server("udp://127.0.0.1:0", name="video") as rig:
        host, port = rig.local_address
        # Registered on entry: nothing that arrives from now on is missed.
        async with rig.subscribe(ExpMessage.EXPINIT | ExpMessage.EXPSTART) as received:
            # The main PC talks to the one rig at this URI.
            async with EchoProtocol.client(f"udp://{host}:{port}", name="main") as main_pc:
                await main_pc.init({"subject": "mouse1"})  # returns once the rig echoed it
                await main_pc.start("2024-01-01_1_mouse1")
                print(f"main: {main_pc.stats.confirmed} signals confirmed")
            # The rig echoed both signals itself; its subscription holds them.
            count = 0
            async for msg in received:
                print(f"video: received {msg.event.name} {msg.data}")
                count += 1
                if count == 2:
                    break


trio.run(main)
