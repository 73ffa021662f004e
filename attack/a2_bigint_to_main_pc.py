"""Hostile neighbour vs the MAIN PC: the same 400-digit-integer ping, sent to the UDP port
of a Services client endpoint (the main PC's ephemeral port, learnt from any signal it sends
or by scanning). Does a UDP client accept datagrams from strangers, and does one kill
Services mid-experiment? Usage: python attack/a2_bigint_to_main_pc.py [trio|asyncio]
"""
import socket, sys
import anyio
from trio_rignet import RigService, Services
from trio_rignet._tag import Tagger

backend = sys.argv[1] if len(sys.argv) > 1 else "trio"
evil = Tagger(0x12345678).tag(b'[{"rignet": "ping", "t": 1' + b"0" * 400 + b"}]", 1)


async def main():
    with anyio.fail_after(30):
        async with RigService("udp://127.0.0.1:0", name="video") as rig:
            try:
                async with Services.open({"video": rig.local_uri}, timeout=2, echo_timeout=1) as srv:
                    await srv.init(None)
                    port = srv["video"].local_address[1]
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.sendto(evil, ("127.0.0.1", port))  # from a stranger's address
                    await anyio.sleep(0.3)
                    print("start after attack:", await srv.start("2024-01-01_1_mouse"))
            except BaseException as exc:  # noqa
                print("MAIN PC DIED:", type(exc).__name__, repr(exc)[:300])
                raise SystemExit(1)
    print("held")

anyio.run(main, backend=backend)
