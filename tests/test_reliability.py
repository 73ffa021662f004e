"""Reliability and security under injected faults (both backends)."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
import anyio.lowlevel
import pytest
from tests.helpers import raw_server, untag

from faults import Faults, TCPRelay, UDPRelay
from trio_rignet import (
    EchoProtocol,
    EchoTimeout,
    ExpMessage,
    Message,
    PeerNotAllowed,
    PeerUnavailable,
    RigService,
    Services,
    ServicesError,
)
from trio_rignet._tag import Tagger

pytestmark = pytest.mark.anyio


def _uri(scheme: str, addr: tuple[str, int]) -> str:
    return f"{scheme}://{addr[0]}:{addr[1]}"


def _lossy() -> tuple[Faults, Faults]:
    return (
        Faults(loss=0.10, duplicate=0.05, reorder=0.05, seed=11),
        Faults(loss=0.10, duplicate=0.05, reorder=0.05, seed=12),
    )


@asynccontextmanager
async def _through_relay(
    target: tuple[str, int], up: Faults, down: Faults
) -> AsyncIterator[tuple[str, int]]:
    async with anyio.create_task_group() as tg:
        relay = UDPRelay(target, up, down)
        address = await tg.start(relay.serve)
        try:
            yield address
        finally:
            tg.cancel_scope.cancel()


# --------------------------------------------------------------- reliable delivery


async def test_reliable_udp_loses_nothing_and_dispatches_once() -> None:
    # Enough traffic for every fault to strike many times; not so much that a loaded
    # two-core machine (debug mode, coverage) collapses under retransmissions.
    n, workers = 4_000, 20
    up, down = _lossy()
    dispatched: Counter[int] = Counter()
    spurious: list[Message] = []
    # Only the sender needs reliable=True (retransmission): the receiver always echoes a
    # repeat of a trio-rignet peer's message again without dispatching it again.
    # Echo timeouts far beyond any retransmission schedule: a loaded machine (debug
    # mode, coverage, two cores) slows every round trip, and the test is about losses.
    async with EchoProtocol.server("udp://127.0.0.1:0", echo_timeout=30) as rig:
        rig.assign_callback("info", lambda msg: dispatched.update([msg.data[1]]))
        async with (
            _through_relay(rig.local_address, up, down) as relay,
            EchoProtocol.client(_uri("udp", relay), reliable=True, echo_timeout=30) as main,
        ):
            main.assign_callback(ExpMessage.any(), spurious.append)

            async def worker(first: int) -> None:
                for i in range(first, n, workers):
                    await main.info("RUNNING", i)

            with anyio.fail_after(300):  # safety net only
                async with anyio.create_task_group() as tg:
                    for first in range(workers):
                        tg.start_soon(worker, first)
    # Every signal confirmed (no EchoTimeout was raised), each dispatched exactly once.
    assert sorted(dispatched) == list(range(n))
    assert set(dispatched.values()) == {1}
    assert spurious == []
    assert main.stats.confirmed == n
    assert main.stats.timeouts == 0
    # The faults really happened and were repaired.
    assert up.dropped > 0
    assert down.dropped > 0
    assert up.duplicated > 0
    assert up.reordered > 0
    assert main.stats.retransmits > 0
    assert rig.stats.duplicates > 0


async def test_unreliable_udp_surfaces_every_loss_as_timeout() -> None:
    n, workers = 400, 20
    up, down = _lossy()
    outcomes: Counter[str] = Counter()
    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        async with (
            _through_relay(rig.local_address, up, down) as relay,
            EchoProtocol.client(_uri("udp", relay), echo_timeout=0.3) as main,
        ):

            async def worker(first: int) -> None:
                for i in range(first, n, workers):
                    try:
                        await main.info("RUNNING", i)
                    except EchoTimeout:
                        outcomes["timeout"] += 1
                    else:
                        outcomes["confirmed"] += 1

            with anyio.fail_after(120):  # a hang would trip this, not a timing assertion
                async with anyio.create_task_group() as tg:
                    for first in range(workers):
                        tg.start_soon(worker, first)
            assert outcomes["confirmed"] + outcomes["timeout"] == n
            assert outcomes["timeout"] > 0
            assert main.stats.timeouts == outcomes["timeout"]
        # The endpoint keeps working afterwards.
        async with EchoProtocol.client(_uri("udp", rig.local_address)) as direct:
            await direct.init("still works")
            assert direct.stats.confirmed == 1


@pytest.mark.parametrize("reliable", [False, True], ids=["plain", "reliable"])
async def test_tagged_messages_are_valid_iblutil_json(reliable: bool) -> None:
    """The tag is JSON whitespace: every message parses as iblutil would, and distinct
    sends of equal content differ in bytes (so a retransmission is told from a new
    message), in either mode."""
    seen: list[bytes] = []
    async with (
        raw_server("udp") as peer,
        EchoProtocol.client(peer.uri, reliable=reliable, echo_timeout=10) as main,
        anyio.create_task_group() as tg,
    ):

        async def echo_everything() -> None:
            while True:
                raw = await peer.recv()
                seen.append(raw)
                await peer.send(raw)

        tg.start_soon(echo_everything)
        await main.init({"a": 1})
        await main.init({"a": 1})
        tg.cancel_scope.cancel()
    distinct = list(dict.fromkeys(seen))  # a retransmission repeats the same bytes
    assert len(distinct) == 2
    assert distinct[0] != distinct[1]
    for raw in distinct:
        assert raw.startswith(b'[1, {"a": 1}')
        assert untag(raw) == b'[1, {"a": 1}]'
        assert json.loads(raw) == [1, {"a": 1}]


# ------------------------------------------------------------------ TCP faults


async def test_tcp_split_and_coalesced_stream_through_relay() -> None:
    got: list[int] = []
    async with EchoProtocol.server("ws://127.0.0.1:0") as rig:
        rig.assign_callback("info", lambda msg: got.append(msg.data[1]))
        async with anyio.create_task_group() as tg:
            relay = TCPRelay(rig.local_address, seed=3, split=0.7, coalesce=0.5)
            address = await tg.start(relay.serve)
            async with EchoProtocol.client(_uri("ws", address), echo_timeout=5) as main:
                with anyio.fail_after(60):
                    async with anyio.create_task_group() as senders:
                        for k in range(10):

                            async def send_some(k: int = k) -> None:
                                for i in range(k, 300, 10):
                                    await main.info("RUNNING", {"i": i, "s": '[]{}\\"é' * (i % 7)})

                            senders.start_soon(send_some)
            tg.cancel_scope.cancel()
    assert sorted(d["i"] for d in got) == list(range(300))


async def test_tcp_cut_fails_pending_send_and_reconnect_recovers() -> None:
    async with EchoProtocol.server("ws://127.0.0.1:0") as rig, anyio.create_task_group() as tg:
        relay = TCPRelay(rig.local_address, split=0, coalesce=0)
        address = await tg.start(relay.serve)
        uri = _uri("ws", address)
        async with EchoProtocol.client(uri, reconnect=True, echo_timeout=30) as main:
            await main.init(1)
            relay.stall()
            failed = []

            async def pending_init() -> None:
                # Fails at once when the connection is cut, not after 30 s.
                with pytest.raises(PeerUnavailable):
                    await main.init(2)
                failed.append(True)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as inner:
                    inner.start_soon(pending_init)
                    await anyio.wait_all_tasks_blocked()
                    assert main.awaiting_response()
                    await relay.cut()
            assert failed == [True]
            relay.resume()
            with anyio.fail_after(10):
                await main.wait_connected()
            await main.init(3)
            assert main.stats.confirmed == 2
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------- bad input


def _garbage(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 1:
        return b"[" * rng.randrange(1, 2000)
    if kind == 2:
        return repr(rng.random()).encode()
    if kind == 3:
        return b'{"event": 1}'
    if kind == 4:
        code = rng.choice(["3", "256", "-1", "1.5", "true", '"x"', "null"])
        return f"[{code}, 1]".encode()
    if kind == 5:
        return b"[0, 1, 2]"
    if kind == 6:
        return b"[]"
    return '[1, "\udcff"]'.encode(errors="surrogatepass")


async def test_udp_fuzzed_datagrams_never_break_the_endpoint() -> None:
    rng = random.Random(2024)
    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        target = rig.local_address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for _ in range(2000):
                raw.sendto(_garbage(rng), target)
        # The burst may still fill the rig's socket buffer, so that the kernel drops the
        # next datagram (the asyncio backend reads one datagram per loop iteration):
        # reliable mode retransmits the init until the rig has caught up.
        async with EchoProtocol.client(_uri("udp", target), echo_timeout=5, reliable=True) as main:
            await main.init("after the fuzz")
            assert main.stats.confirmed == 1
        assert rig.stats.dropped > 0
        assert rig.stats.dropped + rig.stats.echoed <= rig.stats.received


async def test_tcp_fuzzed_streams_disconnect_only_the_bad_peer() -> None:
    rng = random.Random(7)
    async with (
        EchoProtocol.server("ws://127.0.0.1:0", max_message_size=4096) as rig,
        EchoProtocol.client(_uri("ws", rig.local_address)) as good,
    ):
        for _ in range(40):
            bad = await anyio.connect_tcp(*rig.local_address)
            async with bad:
                try:
                    for _ in range(5):
                        await bad.send(_garbage(rng))
                    await bad.send(b"[" * 5000)  # unframeable or oversized
                    with anyio.fail_after(10):
                        while True:
                            await bad.receive()  # echoes, until the server hangs up
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
            await good.init("still served")
        assert good.stats.confirmed == 40
        assert len(rig._transport._conns) == 1  # type: ignore[attr-defined]


async def test_memory_stays_bounded_under_a_flood() -> None:
    """A flood of tagged messages from ever new sessions: every table of the endpoint
    holds at most its capacity (the oldest entries evicted), nothing else piles up."""
    cap = 1000  # lowered so the flood certainly exceeds it
    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        core = rig._core
        core._windows.capacity = cap
        core._recent.capacity = cap
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.setblocking(False)
            for i in range(10 * cap):
                # A trio-rignet peer that restarts for every message: a new session each time.
                message = Tagger(session=i).tag(f"[64, 20, {i}]".encode(), seq=1)
                with contextlib.suppress(BlockingIOError):
                    raw.sendto(message, rig.local_address)
                # Let the rig read (the asyncio backend reads one datagram per loop
                # iteration); what overflows its socket buffer is dropped by the kernel.
                await anyio.lowlevel.checkpoint()
        async with EchoProtocol.client(
            _uri("udp", rig.local_address), echo_timeout=5, reliable=True
        ) as main:
            await main.init("after the flood")
        # Far more distinct messages were handled than the tables may hold: they hold
        # exactly their capacity, and nothing else piled up.
        assert rig.stats.echoed > 2 * cap
        assert core._windows.evicted > 0
        sizes = core.table_sizes()
        assert sizes["windows"] == cap
        assert sizes["recent"] == cap
        # One entry per peer (the flooder and main), whatever the number of sessions.
        assert sizes["peers"] == sizes["keys"] == 2
        assert sizes["pending"] == sizes["verified"] == 0
        assert rig._events._tasks == 0


# ---------------------------------------------------------------- cancellation


@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_cancelling_services_at_random_points_leaves_nothing(scheme: str) -> None:
    rng = random.Random(99)
    async with anyio.create_task_group() as tg:
        uris = {}
        for name in ("a", "b", "c"):
            rig = RigService(f"{scheme}://127.0.0.1:0", name=name)
            uris[name] = _uri(scheme, await tg.start(rig.serve))
        async with Services.open(uris, timeout=5, echo_timeout=5) as services:
            cancelled = 0
            for trial in range(200):
                with anyio.move_on_after(rng.uniform(0, 0.002)) as scope:
                    await services.init({"trial": trial})
                cancelled += scope.cancelled_caught
                for endpoint in services.values():
                    assert endpoint._core.table_sizes()["pending"] == 0
                    assert endpoint._events._subs == {}
                    assert not endpoint.awaiting_response()
            assert cancelled > 0
            result = await services.init("final")
            assert set(result) == {"a", "b", "c"}
        tg.cancel_scope.cancel()


# ------------------------------------------------------------------ rig crashes


@contextmanager
def _serve_process(uri: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_rignet", "serve", uri],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield proc, line.split("listening on ")[1].split()[0]
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_rig_killed_mid_experiment_then_restarted(scheme: str) -> None:
    async with anyio.create_task_group() as tg:
        uris = {}
        for name in ("video", "ephys"):
            rig = RigService(f"{scheme}://127.0.0.1:0", name=name)
            uris[name] = _uri(scheme, await tg.start(rig.serve))
        with _serve_process(f"{scheme}://127.0.0.1:0") as (proc, uri):
            uris["timeline"] = uri
            async with Services.open(uris, timeout=2, echo_timeout=1, reconnect=True) as services:
                assert set(await services.init()) == {"video", "ephys", "timeline"}
                proc.kill()
                proc.wait()
                with anyio.fail_after(10), pytest.raises(ServicesError) as err:
                    await services.start("2024-01-01_1_mouse")
                assert set(err.value.failures) == {"timeline"}
                assert isinstance(err.value.failures["timeline"], (PeerUnavailable, TimeoutError))
                assert set(err.value.responses) == {"video", "ephys"}
                port = int(uri.rsplit(":", 1)[1])
                with _serve_process(f"{scheme}://127.0.0.1:{port}"):
                    with anyio.fail_after(10):
                        await services["timeline"].wait_connected()
                    result = await services.stop()
                    assert set(result) == {"video", "ephys", "timeline"}
        tg.cancel_scope.cancel()


# ------------------------------------------------------------- untrusted peers


@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_allow_list_ignores_strangers(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    got: list[Message] = []
    async with EchoProtocol.server(f"{scheme}://127.0.0.1:0", allow=["10.0.0.0/8"]) as rig:
        rig.assign_callback(ExpMessage.any(), got.append)
        uri = _uri(scheme, rig.local_address)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                try:
                    async with EchoProtocol.client(uri, echo_timeout=0.2) as stranger:
                        await stranger.init("let me in")
                except (EchoTimeout, PeerUnavailable):
                    pass
                else:
                    pytest.fail("a stranger's signal was echoed")
        assert got == []
        refusals = [
            r for r in caplog.records if "allow list" in r.message or "refused" in r.message
        ]
        assert 1 <= len(refusals) <= 2  # rate limited, not one line per message
    async with EchoProtocol.server(f"{scheme}://127.0.0.1:0", allow=["127.0.0.1"]) as rig:
        rig.assign_callback("init", got.append)
        async with EchoProtocol.client(_uri(scheme, rig.local_address)) as friend:
            await friend.init("hello")
        # The rig dispatches inline right after echoing, before the echo can be read.
        assert [m.data for m in got] == [["hello"]]


class _Alyx:
    base_url = "https://alyx.example.org"
    user = "user"
    _token = "secret"
    is_logged_in = True


async def test_alyx_token_goes_only_to_known_peers() -> None:
    async with (
        EchoProtocol.server("udp://127.0.0.1:0") as main,
        EchoProtocol.client(_uri("udp", main.local_address)) as rig,
    ):
        if True:
            stranger = rig.local_address
            with pytest.raises(PeerNotAllowed):
                await main.alyx(_Alyx(), addr=stranger)
            async with rig.subscribe("alyx") as tokens:
                await rig.status("CONNECTED")  # now main knows this peer
                await main.alyx(_Alyx(), addr=stranger)
                msg = await tokens.__anext__()
            assert msg.data == ["https://alyx.example.org", {"user": "secret"}]
    async with EchoProtocol.server("udp://127.0.0.1:0", allow=["10.1.2.3"]) as main:
        with pytest.raises(PeerNotAllowed):
            await main.alyx(_Alyx(), addr=("127.0.0.1", 9))
