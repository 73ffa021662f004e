"""Echo timeouts on virtual time: Trio only, with pytest-trio's ``autojump_clock``.

Requesting ``autojump_clock`` runs the test under
``trio.testing.MockClock(autojump_threshold=0)``: whenever every task is
blocked, the clock jumps to the next deadline. Loopback sockets deliver data
within the sending system call, so real exchanges still complete before any
jump, and a timeout costs no real time. Durations below are exact virtual
seconds.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import anyio
import pytest
import trio
import trio.testing
from tests.helpers import LOCALHOST, raw_server, untag

from trio_rignet import EchoProtocol, EchoTimeout, ExpMessage, Message, RignetError

Address = tuple[str, int]


@pytest.fixture
def silent_peer() -> Iterator[Address]:
    """The address of a bound UDP socket that never reads: nothing is ever echoed."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCALHOST, 0))
        yield sock.getsockname()


@pytest.mark.trio
async def test_client_times_out_after_exact_virtual_timeout(
    autojump_clock: trio.testing.MockClock, silent_peer: Address
) -> None:
    host, port = silent_peer
    async with EchoProtocol.client(f"udp://{host}:{port}", name="video-rig") as cli:
        start = trio.current_time()
        with pytest.raises(EchoTimeout) as exc_info:
            await cli.confirmed_send([1, None], timeout=7.5)
        assert trio.current_time() - start == pytest.approx(7.5, rel=1e-12)
        exc = exc_info.value
        assert isinstance(exc, TimeoutError)
        assert isinstance(exc, RignetError)
        assert exc.endpoint == "video-rig"
        assert exc.peer == (LOCALHOST, port)
        assert exc.timeout == 7.5
        assert str(exc).startswith(f"video-rig: no echo from 127.0.0.1:{port} within 7.5 s")
        assert cli.stats.timeouts == 1
        assert cli.stats.sent == 1
        assert cli.stats.confirmed == 0
        assert cli.stats.rtt_count == 0
        assert not cli.awaiting_response()
        assert cli.is_connected  # a timeout does not close the endpoint (iblutil's does)

        # Still usable: a second timeout, with its own duration.
        start = trio.current_time()
        with pytest.raises(EchoTimeout):
            await cli.status("running", addr=(host, port))
        assert trio.current_time() - start == pytest.approx(cli.default_echo_timeout, rel=1e-12)
        assert cli.stats.timeouts == 2


@pytest.mark.trio
async def test_server_times_out_then_talks_to_a_live_peer(
    autojump_clock: trio.testing.MockClock, silent_peer: Address
) -> None:
    async with (
        EchoProtocol.server("udp://127.0.0.1:0", name="main") as main,
        EchoProtocol.server("udp://127.0.0.1:0", name="rig") as rig,
        rig.subscribe(ExpMessage.EXPINIT) as at_rig,
    ):
        start = trio.current_time()
        with pytest.raises(EchoTimeout, match=f"^main: no echo from 127.0.0.1:{silent_peer[1]} "):
            await main.init({"n": 1}, addr=silent_peer)
        assert trio.current_time() - start == pytest.approx(1.0, rel=1e-12)
        assert main.stats.timeouts == 1

        # The endpoint still works: a real peer echoes at once, no virtual time passes.
        start = trio.current_time()
        await main.init({"n": 2}, addr=rig.local_address)
        assert trio.current_time() == start
        assert await at_rig.receive() == Message(ExpMessage.EXPINIT, [{"n": 2}], main.local_address)
        assert main.stats.confirmed == 1
        assert main.stats.rtt_count == 1
        assert main.stats.rtt_total == 0.0  # virtual time stood still
        assert main.stats.timeouts == 1


@pytest.mark.trio
@pytest.mark.parametrize(("option", "expected"), [(None, 1.0), (2.5, 2.5), (30, 30.0)])
async def test_default_echo_timeout_option(
    autojump_clock: trio.testing.MockClock,
    silent_peer: Address,
    option: float | None,
    expected: float,
) -> None:
    host, port = silent_peer
    async with EchoProtocol.client(f"udp://{host}:{port}", echo_timeout=option) as cli:
        assert cli.default_echo_timeout == expected
        start = trio.current_time()
        with pytest.raises(EchoTimeout) as exc_info:
            await cli.init()
        assert trio.current_time() - start == pytest.approx(expected, rel=1e-12)
        assert exc_info.value.timeout == expected
        # An explicit timeout overrides the default.
        start = trio.current_time()
        with pytest.raises(EchoTimeout):
            await cli.confirmed_send([1, None], timeout=0.25)
        assert trio.current_time() - start == pytest.approx(0.25, rel=1e-12)
    assert EchoProtocol.default_echo_timeout == 1.0  # the option set only this endpoint's


@pytest.mark.trio
async def test_concurrent_sends_time_out_independently(
    autojump_clock: trio.testing.MockClock, silent_peer: Address
) -> None:
    host, port = silent_peer
    failed_at: dict[float, float] = {}
    async with EchoProtocol.client(f"udp://{host}:{port}") as cli:
        start = trio.current_time()

        async def send(timeout: float) -> None:
            with pytest.raises(EchoTimeout):
                await cli.confirmed_send([32, 20], timeout=timeout)  # identical payloads
            failed_at[timeout] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for timeout in (3.0, 1.0, 2.0):
                nursery.start_soon(send, timeout)
        assert failed_at == {
            1.0: pytest.approx(1.0, rel=1e-12),
            2.0: pytest.approx(2.0, rel=1e-12),
            3.0: pytest.approx(3.0, rel=1e-12),
        }
        assert cli.stats.timeouts == 3
        assert not cli.awaiting_response()


@pytest.mark.trio
async def test_cancelled_send_is_unregistered(
    autojump_clock: trio.testing.MockClock, silent_peer: Address
) -> None:
    host, port = silent_peer
    async with EchoProtocol.client(f"udp://{host}:{port}") as cli:
        with trio.move_on_after(2) as scope:
            await cli.confirmed_send([1, None], timeout=10)
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(2.0, rel=1e-12)
        assert not cli.awaiting_response()
        assert cli.stats.timeouts == 0


@pytest.mark.trio
async def test_echo_timeout_escapes_the_endpoint_block_unwrapped(
    autojump_clock: trio.testing.MockClock, silent_peer: Address
) -> None:
    host, port = silent_peer
    with pytest.raises(EchoTimeout):  # not an ExceptionGroup from the endpoint's task group
        async with EchoProtocol.client(f"udp://{host}:{port}") as cli:
            await cli.init()


@pytest.mark.trio
@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_late_echo_is_swallowed(autojump_clock: trio.testing.MockClock, scheme: str) -> None:
    """An echo arriving after the timeout is neither echoed back nor dispatched, and
    does not confirm a later send of the same content."""
    async with (
        raw_server(scheme) as peer,
        EchoProtocol.client(peer.uri) as cli,
        cli.subscribe(ExpMessage.any()) as at_client,
    ):
        with pytest.raises(EchoTimeout):
            await cli.confirmed_send([1, "first"], timeout=5)
        first = await peer.recv()
        assert untag(first) == b'[1, "first"]'
        await peer.send(first)  # the late echo
        await peer.send(b"[32, 20]")  # then a message of the peer's own
        # The first thing the client sends back is the echo of [32, 20]: the late echo
        # was not taken for a new message (no endless echo ping-pong).
        assert await peer.recv() == b"[32, 20]"
        assert await at_client.receive() == Message(
            ExpMessage.EXPSTATUS, [20], (LOCALHOST, peer.port)
        )
        assert cli.stats.echoed == 1
        assert cli.stats.dropped == 0
        assert cli.stats.late == 1

        # A second send of the same content is a new message, confirmed by its own
        # echo only: another late copy of the first echo does not confirm it.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cli.init, "first")
            again = await peer.recv()
            assert untag(again) == untag(first)
            assert again != first
            await peer.send(first)
            await peer.send(b"[32, 30]")
            assert await peer.recv() == b"[32, 30]"
            assert cli.awaiting_response()
            assert cli.stats.late == 2
            await peer.send(again)
        assert cli.stats.confirmed == 1
        assert cli.stats.timeouts == 1
        # Nothing else was dispatched: only the peer's own messages.
        assert await at_client.receive() == Message(
            ExpMessage.EXPSTATUS, [30], (LOCALHOST, peer.port)
        )
        with pytest.raises(anyio.WouldBlock):
            at_client.receive_nowait()


@pytest.mark.trio
async def test_echo_of_unconfirmed_send_is_recognised_however_late(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The echo of a ``send`` is recognised as the endpoint's own however late it comes,
    and never swallows the peer's own message with the same content."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind((LOCALHOST, 0))
        host, port = peer.getsockname()

        async def recv() -> tuple[bytes, Address]:
            with trio.fail_after(5):  # loopback delivers at once: a safety net only
                await trio.lowlevel.wait_readable(peer)
            return peer.recvfrom(100)

        async with (
            EchoProtocol.client(f"udp://{host}:{port}", echo_timeout=1.0) as cli,
            cli.subscribe("init") as messages,
        ):
            await cli.send(b"[1, null]")  # the peer does not echo it (yet)
            sent, client_addr = await recv()
            assert untag(sent) == b"[1, null]"
            # The peer's own message, same content: a new message, at once.
            peer.sendto(b"[1, null]", client_addr)
            assert await recv() == (b"[1, null]", client_addr)  # echoed
            assert (await messages.receive()).data == [None]
            # The echo, 1000 echo timeouts late (virtual time): dropped, not echoed back.
            await trio.sleep(1000)
            peer.sendto(sent, client_addr)
            peer.sendto(b"[32, 20]", client_addr)
            assert (await recv())[0] == b"[32, 20]"  # the next datagram back
            assert cli.stats.late == 1
            with pytest.raises(anyio.WouldBlock):
                messages.receive_nowait()
