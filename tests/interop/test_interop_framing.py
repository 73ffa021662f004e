"""iblutil sends several messages back to back; trio-rignet splits them.

Over TCP iblutil writes JSON arrays with no delimiter. Its ``send`` does not wait
for echoes, so several messages written in a row reach trio-rignet in whatever
pieces the stream delivers: ``joined`` writes them in one ``send`` (one read on
the other side, as a rule), otherwise one ``send`` each. trio-rignet must echo and
dispatch every one, in order. ``ibl_peer.py`` then checks that the echoes came
back byte for byte (and keeps iblutil from taking them for new messages).
"""

from __future__ import annotations

from typing import Any

import pytest
from interop_support import DATA, EXP_REF, next_message, open_link

from trio_rignet import ExpMessage, Message

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SIDES = [
    pytest.param(True, id="rignet-listens"),
    pytest.param(False, id="rignet-connects"),
]

MESSAGES: list[list[Any]] = [
    [1, DATA],
    [2, EXP_REF, {"brackets": "]][[", "quote": '"', "nested": [[[]]]}],
    [32, 20],
    [64, 30, DATA],
    [4, None],
]


LARGE: list[list[Any]] = [
    [32, 0],
    # About 400 kB: reaches trio-rignet in many reads, cut anywhere.
    [1, {"blob": "[Ω]" * 100_000, "list": list(range(20_000))}],
    [32, 10],
]


@pytest.mark.parametrize(
    ("scheme", "joined", "messages"),
    [
        pytest.param("ws", True, MESSAGES, id="tcp-one-write"),
        pytest.param("ws", False, MESSAGES, id="tcp-one-write-each"),
        pytest.param("ws", True, LARGE, id="tcp-large"),
        pytest.param("udp", False, MESSAGES, id="udp"),
    ],
)
@pytest.mark.parametrize("rignet_listens", SIDES)
async def test_back_to_back_messages_are_split_and_dispatched_in_order(
    open_ibl: Any, scheme: str, joined: bool, messages: list[list[Any]], rignet_listens: bool
) -> None:
    async with open_link(open_ibl, scheme, rignet_listens) as link:
        callback_order: list[ExpMessage] = []
        link.rig.assign_callback(ExpMessage.any(), lambda msg: callback_order.append(msg.event))
        echoed_before = link.rig.stats.echoed
        async with link.rig.subscribe(ExpMessage.any()) as received:
            result = await link.peer.send_many(
                link.ep, messages, joined=joined, addr=link.peer_addr
            )
            got: list[Message] = [await next_message(received) for _ in messages]
        assert result == {"sent": len(messages), "echoed": True}
        assert [[int(m.event), *m.data] for m in got] == messages
        assert callback_order == [m.event for m in got]
        assert link.rig.stats.echoed - echoed_before == len(messages)
        assert link.rig.stats.dropped == 0
        if link.rig_addr is not None:
            assert {m.addr for m in got} == {link.rig_addr}

        # The stream is still in step: a confirmed signal goes through both ways.
        await link.rig.init("après", addr=link.rig_addr)
        assert (await link.peer.expect_recv(link.ep, 1))["data"] == ["après"]
        await link.peer.call(link.ep, "cleanup", "fin", addr=link.peer_addr)
