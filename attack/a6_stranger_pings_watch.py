"""Hostile neighbour: 200 strangers (distinct source ports) each send one tagged ping to a
rig. Each gets a pong (no allow list), and rig.watch() reports each as a main PC "up".
Usage: python attack/a6_stranger_pings_watch.py
"""
import socket
import anyio
from trio_rignet import RigService
from trio_rignet._tag import Tagger


async def main():
    with anyio.fail_after(20):
        async with RigService("udp://127.0.0.1:0", name="video") as rig:
            port = rig.local_address[1]
            ups, pongs = [], 0
            async with rig.watch() as changes:
                socks = []
                for i in range(200):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.bind(("127.0.0.1", 0)); s.setblocking(False)
                    s.sendto(Tagger(1000 + i).tag(b'[{"rignet": "ping", "t": 1.5}]', 1), ("127.0.0.1", port))
                    socks.append(s)
                with anyio.move_on_after(1.5):
                    async for c in changes:
                        ups.append(c)
                for s in socks:
                    try:
                        s.recv(2048); pongs += 1
                    except BlockingIOError:
                        pass
                    s.close()
            print(f"pongs sent to strangers: {pongs}/200; rig.watch() changes: {len(ups)}; first: {ups[:1]}")

anyio.run(main)
