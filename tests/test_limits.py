"""Bounds that keep a flooding peer from growing memory or tasks (both backends)."""

from __future__ import annotations

import logging

import anyio
import pytest
from tests.helpers import uri_of

import trio_rignet._events
from trio_rignet import EchoProtocol, Message, PeerUnavailable

pytestmark = pytest.mark.anyio


async def test_full_subscriber_buffer_drops_new_messages(caplog: pytest.LogCaptureFixture) -> None:
    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        async with (
            rig.subscribe("init", max_buffer=2) as messages,
            EchoProtocol.client(uri_of(rig)) as main,
        ):
            with caplog.at_level(logging.WARNING, logger="trio_rignet"):
                for i in range(5):
                    await main.init(i)  # each is echoed, so the rig has dispatched it
            assert main.stats.confirmed == 5
            got = [messages.receive_nowait().data for _ in range(2)]  # type: ignore[attr-defined]
            assert got == [[0], [1]]
            with pytest.raises(anyio.WouldBlock):
                messages.receive_nowait()  # type: ignore[attr-defined]
        assert sum("subscriber buffer full" in r.message for r in caplog.records) == 3


async def test_async_callbacks_are_capped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(trio_rignet._events, "_MAX_CALLBACK_TASKS", 2)
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
            assert sum("async callbacks already running" in r.message for r in caplog.records) == 3
            release.set()
            await anyio.wait_all_tasks_blocked()
            assert rig._callback_tasks == 0  # type: ignore[attr-defined]
            await main.init("after")  # capacity is back
            await anyio.wait_all_tasks_blocked()
            assert started[-1].data == ["after"]


async def test_tcp_connections_beyond_the_cap_are_refused() -> None:
    async with (
        EchoProtocol.server("ws://127.0.0.1:0", max_connections=1) as rig,
        EchoProtocol.client(uri_of(rig)) as first,
    ):
        await first.init("first")
        async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as second:
            with anyio.fail_after(10), pytest.raises(PeerUnavailable):
                await second.init("second")  # the server hangs up at once
            assert not second.is_connected
        await first.init("first still served")
        assert first.stats.confirmed == 2
