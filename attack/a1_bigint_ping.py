"""Hostile neighbour: one tagged extension datagram whose number is a 400-digit integer.

json.loads gives an int; _extensions._number calls math.isfinite(int) -> OverflowError,
which nothing catches on the receive path. Expected: dropped with a log line, rig keeps
serving. Usage: python attack/a1_bigint_ping.py [trio|asyncio] [udp|ws]
"""
import socket, sys
import anyio
from trio_rignet import RigService, Services
from trio_rignet._tag import Tagger

backend = sys.argv[1] if len(sys.argv) > 1 else "trio"
scheme = sys.argv[2] if len(sys.argv) > 2 else "udp"
kind = sys.argv[3] if len(sys.argv) > 3 else "ping"

BIG = "1" + "0" * 400
if kind == "ping":
    body = b'[{"rignet": "ping", "t": ' + BIG.encode() + b"}]"
else:
    body = b'[{"rignet": "pong", "t1": 1, "t2": 2, "t3": ' + BIG.encode() + b"}]"
evil = Tagger(0x12345678).tag(body, 1)


async def main():
    with anyio.fail_after(30):
        rig = RigService(f"{scheme}://127.0.0.1:0", name="video")
        try:
            async with rig:
                port = rig.local_address[1]
                fam = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
                s = socket.socket(socket.AF_INET, fam)
                if scheme == "udp":
                    s.sendto(evil, ("127.0.0.1", port))
                else:
                    s.connect(("127.0.0.1", port)); s.sendall(evil)
                await anyio.sleep(0.3)
                async with Services.open({"video": rig.local_uri}, timeout=2, echo_timeout=1) as srv:
                    print("init after attack:", await srv.init(None))
        except BaseException as exc:  # noqa
            print("RIG DIED:", type(exc).__name__, repr(exc)[:300])
            raise SystemExit(1)
    print("held")

anyio.run(main, backend=backend)
