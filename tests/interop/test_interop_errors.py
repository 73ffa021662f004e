"""A callback that raises, on either side: the error report reaches the other side.

The report is ``[0, "ValueError: text", event]``, never echoed. trio-rignet
delivers a received report on ``subscribe(0)`` (and logs it); iblutil logs it and
calls its ``ExpMessage(0)`` callbacks, which ``ibl_peer.py`` records.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from interop_support import DATA, EXP_REF, WAIT, next_message, open_link

from trio_rignet import ExpMessage, ExpStatus, Message

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SCHEMES = [pytest.param("udp", id="udp"), pytest.param("ws", id="tcp")]
SIDES = [
    pytest.param(True, id="rignet-listens"),
    pytest.param(False, id="rignet-connects"),
]

IBL_TEXT = "ValueError: ibl refuses EXPINIT: caméra non prête ✗"
"""What ``ibl_peer.py``'s raising callback reports for an init."""


@pytest.mark.parametrize("rignet_listens", SIDES)
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblutil_callback_error_reaches_rignet(
    open_ibl: Any, scheme: str, rignet_listens: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="trio_rignet")
    async with open_link(open_ibl, scheme, rignet_listens, raise_on=[1]) as link:
        async with link.rig.subscribe(0) as errors:
            await link.rig.init(DATA, addr=link.rig_addr)  # echoed: confirmed
            report = await next_message(errors)
        assert report.is_error
        assert report.data == [IBL_TEXT, int(ExpMessage.EXPINIT)]
        if link.rig_addr is not None:
            assert report.addr == link.rig_addr

        # iblutil logged its callback's failure; trio-rignet logged the report.
        log = await link.peer.expect(type="log", level="ERROR")
        assert "caméra non prête" in log["msg"]
        assert any(
            "reported an error handling EXPINIT" in r.getMessage() and IBL_TEXT in r.getMessage()
            for r in caplog.records
        )

        # The report was not echoed, and both endpoints carry on.
        await link.rig.status(ExpStatus.RUNNING, addr=link.rig_addr)
        assert (await link.peer.expect_recv(link.ep, 32))["data"] == [20]
        assert not link.peer.find(type="recv", ep=link.ep, event=0)


@pytest.mark.parametrize("rignet_listens", SIDES)
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_rignet_callback_error_reaches_iblutil(
    open_ibl: Any, scheme: str, rignet_listens: bool
) -> None:
    async with open_link(open_ibl, scheme, rignet_listens) as link:
        calls: list[Message] = []
        if scheme == "udp":
            # A plain function: runs inline right after the echo is sent.
            def refuse(msg: Message) -> None:
                calls.append(msg)
                raise ValueError("Kamera nicht bereit ✗")

        else:
            # Over TCP iblutil's confirmed send fails if the report arrives in
            # the same read as the echo (its fault 1): raise once it has the echo.
            async def refuse(msg: Message) -> None:  # type: ignore[misc]
                calls.append(msg)
                await link.peer.expect(type="confirmed", ep=link.ep, event=2)
                raise ValueError("Kamera nicht bereit ✗")

        link.rig.assign_callback("start", refuse)
        await link.peer.call(link.ep, "start", EXP_REF, DATA, addr=link.peer_addr)  # confirmed

        report = await link.peer.expect_recv(link.ep, 0, timeout=WAIT)
        assert report["data"] == ["ValueError: Kamera nicht bereit ✗", int(ExpMessage.EXPSTART)]
        assert [(m.event, m.data) for m in calls] == [(ExpMessage.EXPSTART, [EXP_REF, DATA])]
        log = await link.peer.expect(type="log", level="ERROR")
        assert "EXPSTART" in log["msg"]
        assert "Kamera nicht bereit" in log["msg"]

        # Other callbacks and events are unaffected; iblutil did not echo the report.
        await link.peer.call(link.ep, "init", DATA, addr=link.peer_addr)
        assert link.rig.stats.dropped == 0
        assert link.rig.stats.received == link.rig.stats.echoed + (not rignet_listens)
