"""IPv6 end to end (iblutil cannot parse IPv6 URIs; trio-rignet must work over [::1])."""

from __future__ import annotations

import socket

import anyio
import pytest

from trio_rignet import EchoProtocol, RigService, Services


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback"),
]


@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_round_trip_and_reply_over_ipv6(scheme: str) -> None:
    async with EchoProtocol.server(f"{scheme}://[::1]:0") as rig:
        assert rig.local_address[0] == "::1"
        uri = rig.uri_of(rig.local_address)
        assert uri.startswith(f"{scheme}://[::1]:")
        async with EchoProtocol.client(uri) as main, rig.subscribe("init") as signals:
            assert main.hostname == "::1"
            await main.init({"v": 6})
            msg = await signals.__anext__()
            assert msg.data == [{"v": 6}]
            assert msg.addr is not None
            assert msg.addr[0] == "::1"
            async with main.subscribe("init") as replies:
                await rig.init("done", addr=msg.addr)
                reply = await replies.__anext__()
            assert reply.data == ["done"]


@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_services_over_ipv6(scheme: str) -> None:
    async with anyio.create_task_group() as tg:
        rig = RigService(f"{scheme}://[::1]:0", name="video")
        rig.handle("init")(lambda msg: "ready")
        await tg.start(rig.serve)
        async with Services.open({"video": rig.local_uri}) as services:
            assert await services.init() == {"video": ["ready"]}
        tg.cancel_scope.cancel()
