"""Regressions found by the adversarial review (attack/ has the original repro scripts)."""

from __future__ import annotations

import socket

import anyio
import pytest

from trio_rignet import RigService, Services
from trio_rignet._extensions import parse_extension
from trio_rignet._tag import Tagger

BIG = b"1" + b"0" * 400  # an int JSON parses, too large for a float


@pytest.mark.parametrize(
    "body",
    [
        b'[{"rignet": "ping", "t": ' + BIG + b"}]",
        b'[{"rignet": "pong", "t1": 1, "t2": 2, "t3": ' + BIG + b"}]",
    ],
)
def test_extension_with_a_huge_integer_is_malformed_not_a_crash(body: bytes) -> None:
    assert parse_extension(body) is None


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_a_huge_integer_ping_does_not_kill_a_rig(scheme: str) -> None:
    evil = Tagger(0x12345678).tag(b'[{"rignet": "ping", "t": ' + BIG + b"}]", 1)
    with anyio.fail_after(10):
        async with RigService(f"{scheme}://127.0.0.1:0", name="video") as rig:
            port = rig.local_address[1]
            kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
            with socket.socket(socket.AF_INET, kind) as s:
                if scheme == "udp":
                    s.sendto(evil, ("127.0.0.1", port))
                else:
                    s.connect(("127.0.0.1", port))
                    s.sendall(evil)
                await anyio.sleep(0.2)
            async with Services.open({"video": rig.local_uri}, timeout=2, echo_timeout=1) as srv:
                assert await srv.init(None) == {"video": [None]}


@pytest.mark.anyio
async def test_cancelling_open_or_a_call_raises_the_cancellation_not_endpoint_closed() -> None:
    """A cancelled Services.open(wait=)/init() used to surface EndpointClosed or a
    ServicesError of closed endpoints (on Trio inside an ExceptionGroup) instead of the
    cancellation: the endpoints' own tasks, cancelled by the same scope, closed first."""
    import random

    rng = random.Random(7)
    with anyio.fail_after(40):
        async with (
            RigService("udp://127.0.0.1:0", name="u") as ru,
            RigService("ws://127.0.0.1:0", name="t") as rt,
        ):
            rigs = {"u": ru.local_uri, "t": rt.local_uri}
            for i in range(60):
                with anyio.move_on_after(rng.uniform(1e-3, 6e-3)):
                    async with Services.open(rigs, wait=2, heartbeat=0.01) as srv:
                        await srv.init({"i": i})
                        await srv.start("2024-01-01_1_m")
