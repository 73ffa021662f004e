"""An echo that never comes: EchoTimeout, and the endpoint stays open for a retry."""

import trio

from trio_rignet import EchoProtocol, EchoTimeout


async def echo_everything(sock: trio.socket.SocketType) -> None:
    """A peer that came back: send every datagram straight back."""
    while True:
        data, addr = await sock.recvfrom(65536)
        await sock.sendto(data, addr)


async def main() -> None:
    # A UDP socket that receives but never answers: a rig whose program hangs.
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as peer:
        await peer.bind(("127.0.0.1", 0))
        host, port = peer.getsockname()
        async with EchoProtocol.client(f"udp://{host}:{port}", echo_timeout=0.1) as rig:
            try:
                await rig.init({"subject": "mouse1"})
            except EchoTimeout as exc:
                print(f"no echo within {exc.timeout} s; endpoint open: {rig.is_connected}")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo_everything, peer)
                await rig.init({"subject": "mouse1"})  # the same endpoint, retried
                print(f"retry confirmed; timeouts so far: {rig.stats.timeouts}")
                nursery.cancel_scope.cancel()


trio.run(main)
