"""Bounds that keep a flooding peer from growing memory or tasks (both backends)."""

from __future__ import annotations

import logging

import anyio
import pytest
from tests.helpers import raw_tcp_client, uri_of

import trio_rignet._events
from trio_rignet import EchoProtocol, Message, PeerUnavailable

pytestmark = pytest.mark.anyio


async def test_full_subscriber_buffer_drops_new_messages(caplog: pytest.LogCaptureFixture) -> None:
    """Beyond ``max_buffer`` new messages are dropped, counted, and logged at a limited
    rate (one line for a burst, not one per message)."""
    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        async with (
            rig.subscribe("init", max_buffer=2) as messages,
            EchoProtocol.client(uri_of(rig)) as main,
        ):
            with caplog.at_level(logging.WARNING, logger="trio_rignet"):
                for i in range(5):
                    await main.init(i)  # each is echoed, so the rig has dispatched it
            assert main.stats.confirmed == 5
            got = [messages.receive_nowait().data for _ in range(2)]
            assert got == [[0], [1]]
            with pytest.raises(anyio.WouldBlock):
                messages.receive_nowait()
            assert messages.dropped == 3
        assert sum("subscriber is not keeping up" in r.message for r in caplog.records) == 1


async def test_async_callbacks_are_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond the cap, async callbacks are dropped, logged at a limited rate (one line
    for a burst); once they finish, there is capacity again."""
    monkeypatch.setattr(trio_rignet._events, "MAX_CALLBACK_TASKS", 2)
    release = anyio.Event()
    started: list[Message] = []

    async def slow(msg: Message) -> None:
        started.append(msg)
        await release.wait()

    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        rig.assign_callback("init", slow)
        async with EchoProtocol.client(uri_of(rig)) as main:
            with caplog.at_level(logging.WARNING, logger="trio_rignet"):
                for i in range(5):
                    await main.init(i)
            await anyio.wait_all_tasks_blocked()
            assert [m.data for m in started] == [[0], [1]]
            assert sum("async callbacks already running" in r.message for r in caplog.records) == 1
            release.set()
            await anyio.wait_all_tasks_blocked()
            assert rig._events._tasks == 0
            await main.init("after")  # capacity is back
            await anyio.wait_all_tasks_blocked()
            assert started[-1].data == ["after"]


async def test_tcp_connections_beyond_the_cap_evict_an_idle_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At ``max_connections`` a new connection closes an idle one (so a stale or
    never-talking peer cannot lock real rigs out); only if every connection is busy is
    the new one refused."""
    async with EchoProtocol.server("ws://127.0.0.1:0", max_connections=1) as rig:
        async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as first:
            await first.init("first")
            async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as second:
                await second.init("second")  # admitted: the idle first connection made room
                with anyio.fail_after(10), pytest.raises(PeerUnavailable):
                    await first.init("first again")  # its connection was closed
                assert not first.is_connected
                await second.init("second still served")
                assert second.stats.confirmed == 2
        # A connection with a message half-received is busy: it is never evicted.
        async with raw_tcp_client(rig.local_address[1]) as busy:
            await busy.send(b'[32, 20][1, "unfinis')
            assert await busy.recv_exactly(8) == b"[32, 20]"  # the rest is buffered by now
            with caplog.at_level(logging.WARNING, logger="trio_rignet"):
                async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as third:
                    with anyio.fail_after(10), pytest.raises(PeerUnavailable):
                        await third.init("third")  # the server hangs up at once
                    assert not third.is_connected
            assert "all busy" in caplog.text
            await busy.send(b'hed"]')
            assert await busy.recv_exactly(17) == b'[1, "unfinished"]'
