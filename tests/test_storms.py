"""Regression tests, on real loopback sockets, for the storms and leaks of issue 11.

Each case reproduces what was observed with the first version (one signal
dispatched thousands of times, memory growing by the size of what strangers
send) and checks the bound that now holds. The simulated-network properties
(``test_core_sim.py``) cover the same rules over generated scenarios.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import anyio
import pytest
from tests.helpers import FakeAlyx

from trio_rignet import EchoProtocol, PeerNotAllowed, RigService, Services
from trio_rignet._tag import Tagger

pytestmark = pytest.mark.anyio

SAFETY = 20  # seconds: a safety net against hangs, never an assertion


def _has_dual_stack() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", 0))
            port = sock.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
                v4.sendto(b"x", ("127.0.0.1", port))
            sock.settimeout(1)
            sock.recvfrom(10)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("scheme", ["udp", "ws"])
@pytest.mark.skipif(not _has_dual_stack(), reason="no dual-stack IPv6 socket on this machine")
async def test_dual_stack_rig_answers_an_ipv4_main_pc_once(scheme: str) -> None:
    """A rig on ``[::]`` sees the IPv4 main PC as ``::ffff:127.0.0.1``: one init, one handler run.

    Observed before: the rig's completion never matched its echo (the address
    was compared as ``::ffff:7f00:1``) and one init ran the handler 12,642 times.
    """
    calls: list[object] = []
    with anyio.fail_after(SAFETY):
        async with anyio.create_task_group() as tg:
            rig = RigService(f"{scheme}://[::]:0", name="video")
            rig.handle("init")(lambda msg: calls.append(msg.addr) or "ready")
            _, port = await tg.start(rig.serve)
            async with Services.open(
                {"video": f"{scheme}://127.0.0.1:{port}"}, timeout=2, heartbeat=None
            ) as main:
                assert await main.init() == {"video": ["ready"]}
                assert await main.init() == {"video": ["ready"]}
                await anyio.sleep(0.2)  # anything that would bounce would bounce now
                stats = main["video"].stats
                rig_stats = rig.endpoint.stats
            tg.cancel_scope.cancel()
    assert calls == [("127.0.0.1", calls[0][1])] * 2  # canonical IPv4 form, twice
    assert stats.timeouts == rig_stats.timeouts == 0
    # Per init: signal, echo, completion, echo. Nothing else.
    assert stats.received == rig_stats.received == 4


def _serve(scheme: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_rignet", "serve", f"{scheme}://127.0.0.1:0", "--name", "rig"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    uri = next(word for word in line.split() if "://" in word)
    return proc, uri


@pytest.mark.parametrize("scheme", ["udp", "ws"])
@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP does not exist on Windows")
async def test_rig_stalled_past_the_timeout_answers_late_without_a_storm(scheme: str) -> None:
    """A rig stopped (SIGSTOP) for 6 echo timeouts answers late: its echo is dropped, once.

    Observed before: the late echo was taken for a new message and bounced
    between the two ends forever (about 25,000 dispatches in 3 s at each end).
    """
    proc, uri = _serve(scheme)
    try:
        with anyio.fail_after(SAFETY):
            async with EchoProtocol.client(uri, echo_timeout=0.1) as main:
                if scheme == "ws":
                    await main.wait_connected()
                got: list[object] = []
                main.assign_callback("init", lambda msg: got.append(msg.data))
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    with pytest.raises(TimeoutError):
                        await main.init({"n": 1})
                    await anyio.sleep(0.5)
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                await anyio.sleep(1.0)  # the rig echoes late, then completes
                assert main.stats.late == 1  # the late echo, recognised and dropped
                assert got == [[{"rig": "rig", "done": "init"}]]  # its completion, once
                # The signal, its late echo, the completion: the main PC received 2 and
                # sent 2 (signal, echo of the completion). Nothing bounced.
                assert main.stats.received == 2
                assert main.stats.sent == 2
    finally:
        proc.terminate()
        proc.wait(timeout=SAFETY)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_whitespace_framed_messages_are_confirmed_once_over_tcp() -> None:
    """A payload ending in a newline is framed without it; its echo still matches.

    Observed before: the echo never matched the bytes sent (``[...]\\n``) and the
    message was dispatched over 35,000 times.
    """
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("ws://127.0.0.1:0") as rig,
            EchoProtocol.client(rig.uri_of(rig.local_address)) as main,
        ):
            got: list[object] = []
            rig.assign_callback("init", lambda msg: got.append(msg.data))
            await main.confirmed_send(b"  [1, null]\n")
            await main.confirmed_send(b"[1, null]\r\n\r\n")
            await anyio.sleep(0.2)
            assert got == [[None], [None]]
            assert main.stats.received == 2
            assert rig.stats.received == 2


async def test_strangers_flooding_large_datagrams_leave_memory_flat() -> None:
    """Strangers send 60 KB tagged datagrams from 5,000 sessions: the tables keep digests only.

    Observed before: reliable mode kept every received datagram whole for 30 s,
    and one neighbour grew the process by over 1 GB.
    """
    payload = json.dumps([64, 10, "x" * 60_000]).encode()
    n = 2_000
    with anyio.fail_after(SAFETY * 3):
        async with EchoProtocol.server("udp://127.0.0.1:0", reliable=True) as rig:
            target = rig.local_address
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:

                def send_all(start: int, count: int) -> None:
                    # From a thread, paced: asyncio reads one datagram per loop turn.
                    for i in range(start, start + count):
                        flood.sendto(Tagger(i).tag(payload, 1), target)
                        time.sleep(0.0003)

                await anyio.to_thread.run_sync(send_all, 0, 200)  # warm up every table
                await anyio.sleep(0.1)
                tracemalloc.start()
                try:
                    before = tracemalloc.get_traced_memory()[0]
                    await anyio.to_thread.run_sync(send_all, 200, n)
                    await anyio.sleep(0.2)
                    grown = tracemalloc.get_traced_memory()[0] - before
                finally:
                    tracemalloc.stop()
            received = rig.stats.received
    assert received > n // 2  # most of the flood was handled
    # 2,000 x 60 KB went through; what stays is a few hundred bytes per session.
    assert grown < 4 * 1024 * 1024, grown


def _strangers(addr: tuple[str, int], first: int, count: int) -> None:
    """``count`` strangers (127.0.x.y, one socket each) send one status message each."""
    for i in range(first, first + count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((f"127.0.{1 + i // 250}.{1 + i % 250}", 0))
            s.sendto(b"[32, 0]", addr)


async def test_a_peer_that_talked_still_gets_a_token_after_a_flood_of_strangers() -> None:
    """After 5,000 strangers, a peer that talks is known; one that answered us stays known.

    Observed before: the known-peer table stopped adding at 4,096 and never
    evicted, so a real peer that talked after a flood was refused an Alyx token.
    """
    with anyio.fail_after(SAFETY * 3):
        # Generous echo timeouts: the main PC works through thousands of strangers'
        # datagrams queued before the rig's (asyncio reads one per loop turn). Reliable
        # mode: while the flood fills the main PC's socket buffer, the kernel drops
        # datagrams, the rig's and its echoes included; retransmission repairs that.
        options: dict[str, Any] = {"echo_timeout": 20, "reliable": True}
        async with EchoProtocol.server("udp://127.0.0.1:0", **options) as main:
            addr = main.local_address
            await anyio.to_thread.run_sync(_strangers, addr, 0, 5_000)
            async with (
                EchoProtocol.client(main.uri_of(addr), **options) as rig,
                rig.subscribe("alyx") as tokens,
            ):
                await rig.status("CONNECTED")  # the rig talks after the flood: known
                await main.alyx(FakeAlyx(), addr=rig.local_address)
                assert (await tokens.__anext__()).data[1] == {FakeAlyx.user: FakeAlyx._token}
                # A peer that echoed one of our signals is remembered apart from the
                # peers merely heard from: another flood does not make it a stranger.
                await main.init(addr=rig.local_address)
                await anyio.to_thread.run_sync(_strangers, addr, 5_000, 5_000)
                await anyio.sleep(0.2)
                await main.alyx(FakeAlyx(), addr=rig.local_address)
                assert (await tokens.__anext__()).data[1] == {FakeAlyx.user: FakeAlyx._token}
            with pytest.raises(PeerNotAllowed):
                await main.alyx(FakeAlyx(), addr=("127.0.200.200", 9))
