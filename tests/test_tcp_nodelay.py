"""A rig's completion update written just after its echo is not held back by Nagle.

A TCP rig writes two messages in a row for every signal: the echo, then (as
soon as its handler returns) the completion update. With Nagle's algorithm on,
the second write waits until the first is acknowledged, and the main PC
acknowledges late (delayed ACK: 40 ms on Linux, up to 200 ms on Windows): every
signal took that long. Both backends turn Nagle off on every connection, the
accepted ones included (asyncio does so only for sockets it creates itself).
"""

from __future__ import annotations

import statistics
import time

import anyio
import pytest

from trio_rignet import Message, RigService, Services

pytestmark = pytest.mark.anyio


async def test_completion_right_after_echo_is_not_delayed() -> None:
    rig = RigService("ws://127.0.0.1:0", name="video")

    @rig.handle("init")
    async def init(msg: Message) -> str:
        return "ready"

    async with anyio.create_task_group() as tg:
        await tg.start(rig.serve)
        async with Services.open({"video": rig.local_uri}, reconnect=False) as services:
            await services.init()  # connect and learn each other first
            rounds = []
            for _ in range(25):
                began = time.perf_counter()
                assert await services.init() == {"video": ["ready"]}
                rounds.append(time.perf_counter() - began)
        tg.cancel_scope.cancel()
    # A delayed ACK costs at least 40 ms per round; a round is ~1 ms without it.
    assert statistics.median(rounds) < 0.02, rounds
