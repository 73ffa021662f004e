"""Every signal between trio-rignet and iblutil 1.20.0, both ways, either side listening.

Each test runs over UDP and TCP (``ws://``), with trio-rignet listening (iblutil
connects as ``EchoProtocol.client``) and connecting (iblutil listens as
``EchoProtocol.server``), on Trio (iblutil in a subprocess) and asyncio
(iblutil in the same loop). A signal counts as confirmed when the sender's
confirmed send returns, i.e. the other library echoed it byte for byte.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from interop_support import (
    SIGNALS,
    WAIT,
    FakeAlyx,
    Link,
    next_message,
    open_link,
)

from trio_rignet import ExpMessage

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SCHEMES = [pytest.param("udp", id="udp"), pytest.param("ws", id="tcp")]
SIDES = [
    pytest.param(True, id="rignet-listens"),
    pytest.param(False, id="rignet-connects"),
]


@pytest.mark.parametrize("rignet_listens", SIDES)
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblutil_signals_reach_rignet(
    open_ibl: Any, scheme: str, rignet_listens: bool
) -> None:
    async with open_link(open_ibl, scheme, rignet_listens) as link:
        async with link.rig.subscribe(ExpMessage.any()) as received:
            for signal in SIGNALS:
                # Returns once trio-rignet's echo matched: confirmed.
                await link.peer.call(
                    link.ep, signal.method, *signal.args, addr=link.peer_addr, **signal.kwargs
                )
                msg = await next_message(received)
                assert (msg.event, msg.data) == (signal.event, signal.data), signal.label
                assert msg.addr == link.rig_addr or not rignet_listens

            alyx = FakeAlyx()
            await link.peer.call(link.ep, "alyx", alyx.as_command(), addr=link.peer_addr)
            msg = await next_message(received)
            assert msg.event == ExpMessage.ALYX
            assert msg.data == [alyx.base_url, {alyx.user: alyx._token}]
        # and the opening status when iblutil is the connecting side
        assert link.rig.stats.echoed == len(SIGNALS) + 1 + rignet_listens
        confirmed = [r["event"] for r in link.peer.find(type="confirmed", ep=link.ep)]
        assert confirmed[-len(SIGNALS) - 1 :] == [int(s.event) for s in SIGNALS] + [128]


@pytest.mark.parametrize("rignet_listens", SIDES)
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_rignet_signals_reach_iblutil(
    open_ibl: Any, scheme: str, rignet_listens: bool
) -> None:
    async with open_link(open_ibl, scheme, rignet_listens) as link:
        for signal in SIGNALS:
            # Returns once iblutil's echo matched: confirmed.
            await getattr(link.rig, signal.method)(
                *signal.args, addr=link.rig_addr, **signal.kwargs
            )
            record = await link.peer.expect_recv(link.ep, signal.event)
            assert record["data"] == signal.data, signal.label

        alyx = FakeAlyx()
        assert await link.rig.alyx(alyx, addr=link.rig_addr) is None
        record = await link.peer.expect_recv(link.ep, ExpMessage.ALYX)
        assert record["data"] == [alyx.base_url, {alyx.user: alyx._token}]
        assert link.rig.stats.confirmed == len(SIGNALS) + 1 + (not rignet_listens)
        assert link.rig.stats.timeouts == 0


@pytest.mark.parametrize("rignet_listens", SIDES)
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_rignet_requests_alyx_token_from_iblutil(
    open_ibl: Any, scheme: str, rignet_listens: bool
) -> None:
    alyx = FakeAlyx()
    async with open_link(open_ibl, scheme, rignet_listens) as link:
        token: list[Any] = []

        async def ask() -> None:
            token.append(await link.rig.alyx(None, addr=link.rig_addr))

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask)
                request = await link.peer.expect_recv(link.ep, ExpMessage.ALYX)
                assert request["data"] == [None, {}]
                # iblutil has no request/answer call: send its token with alyx().
                await link.peer.call(link.ep, "alyx", alyx.as_command(), addr=link.peer_addr)
        assert token == [(alyx.base_url, {alyx.user: alyx._token})]


@pytest.mark.parametrize("rignet_listens", SIDES)
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblutil_requests_alyx_token_from_rignet(
    open_ibl: Any, scheme: str, rignet_listens: bool
) -> None:
    alyx = FakeAlyx()
    async with open_link(open_ibl, scheme, rignet_listens) as link:
        token: list[Any] = []

        async def ask(link: Link) -> None:
            token.append(await link.peer.call(link.ep, "alyx", addr=link.peer_addr))

        with anyio.fail_after(WAIT):
            async with (
                link.rig.subscribe(ExpMessage.ALYX) as requests,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(ask, link)
                request = await next_message(requests)
                assert request.data == [None, {}]
                # iblutil's confirmed send fails if anything but its echo arrives
                # while it waits (its fault 1 over TCP): answer once it has its echo.
                await link.peer.expect(type="confirmed", ep=link.ep, event=128)
                await link.rig.alyx(alyx, addr=request.addr if rignet_listens else None)
        assert token == [[alyx.base_url, {alyx.user: alyx._token}]]
