"""Live endpoints fuzzed with Hypothesis, and a flooding peer that cannot starve the others."""

from __future__ import annotations

import json
import socket
from contextlib import suppress

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import uri_of

from trio_rignet import EchoProtocol, Message
from trio_rignet._transport import _asyncio as asyncio_transport

pytestmark = pytest.mark.anyio

# One backend parameter per test is fine across examples: suppress the check
# against function-scoped fixtures with @given.
_live = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
# Near-valid messages (any code, any shape) mixed with raw bytes.
_near_messages = st.lists(st.integers(-2, 300) | _json, min_size=0, max_size=4).map(
    lambda xs: json.dumps(xs).encode()
)
_datagrams = st.lists(st.binary(max_size=600) | _near_messages, max_size=15)


@_live
@given(datagrams=_datagrams)
async def test_udp_endpoint_survives_any_datagrams(datagrams: list[bytes]) -> None:
    got: list[Message] = []
    async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
        rig.assign_callback("init", got.append)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            for datagram in datagrams:
                raw.sendto(datagram, rig.local_address)
        async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as main:
            await main.init("valid")
        stats = rig.stats
        assert stats.received == len(datagrams) + 1
        assert stats.dropped + stats.echoed <= stats.received
        assert got[-1].data == ["valid"]


@_live
@given(chunks=st.lists(st.binary(min_size=1, max_size=300) | _near_messages, max_size=10))
async def test_tcp_endpoint_survives_any_stream(chunks: list[bytes]) -> None:
    async with EchoProtocol.server("ws://127.0.0.1:0", max_message_size=1024) as rig:
        async with await anyio.connect_tcp(*rig.local_address) as raw:
            try:
                for chunk in chunks:
                    await raw.send(chunk)
            except (anyio.BrokenResourceError, OSError):
                pass  # the server hung up on an unframeable stream: allowed
        async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as main:
            await main.init("valid")
            assert main.stats.confirmed == 1


async def test_a_peer_that_never_reads_is_disconnected_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Echoes to a peer that does not read back up on its own connection only, up to a
    bound: then that peer is disconnected, and the other peers are served throughout."""
    async with (
        # A small message limit keeps the echo backlog's bound (the outbox limit plus
        # eight of the largest messages) near 1.5 MiB, so the flood reaches it fast.
        EchoProtocol.server("ws://127.0.0.1:0", max_message_size=65536) as rig,
        anyio.create_task_group() as tg,
    ):
        flooder = await anyio.connect_tcp(*rig.local_address)
        cut = anyio.Event()

        async def flood() -> None:
            # Distinct messages: the same bytes over and over would be cut short as an
            # echo ping-pong instead (see the echo core's rules).
            # About 1 KB each, so the backlog grows fast without millions of messages.
            pad = b"x" * 1000
            chunk = b"".join(b'[1, %d, "%s"]' % (i, pad) for i in range(1000))
            try:
                while True:
                    await flooder.send(chunk)  # never reads the echoes
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                cut.set()  # the server hung up

        async with flooder:
            tg.start_soon(flood)
            async with EchoProtocol.client(uri_of(rig), echo_timeout=5) as good:
                for i in range(20):
                    await good.init(i)
                with anyio.fail_after(30):  # a safety net, not a measurement
                    await cut.wait()
                for i in range(20, 40):
                    await good.init(i)
                assert good.stats.confirmed == 40
            tg.cancel_scope.cancel()
        assert rig.stats.received > 1000  # it really flooded
        assert "(it is not reading)" in caplog.text


async def _received_in_order(bursts: list[int]) -> None:
    """Send ``bursts`` of datagrams to a UDP endpoint, each burst once the last is in."""
    got: list[int] = []
    sent = 0
    with anyio.fail_after(20):
        async with (
            EchoProtocol.server("udp://127.0.0.1:0") as rig,
            rig.subscribe("info") as messages,
        ):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                for size in bursts:
                    for _ in range(size):
                        raw.sendto(b"[64, %d]" % sent, rig.local_address)
                        sent += 1
                    while len(got) < sent:
                        got.append((await messages.receive()).data[0])
    assert got == list(range(sent))


_bursts = st.lists(st.integers(1, 60), min_size=1, max_size=8)
_few = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_few
@given(bursts=_bursts)
async def test_udp_datagrams_in_any_bursts_are_all_received_in_order(bursts: list[int]) -> None:
    """However datagrams bunch up (single ones between bursts, bursts after a
    quiet spell), an endpoint receives every one, once, in order. (It reads
    one datagram per wake-up while they come one by one, and until the socket
    is empty once they bunch up.)"""
    await _received_in_order(bursts)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@_few
@given(bursts=_bursts)
async def test_udp_bursts_where_the_loop_keeps_the_socket(
    bursts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a proactor loop (Windows) asyncio keeps a receive pending on the
    socket, so only asyncio reads it (and a client's transport is made from
    the peer's address): the same property holds."""
    monkeypatch.setattr(asyncio_transport, "_reads_sockets", lambda loop: False)
    await _received_in_order(bursts)


async def test_nothing_is_handled_once_an_endpoint_closes_during_a_burst() -> None:
    """An endpoint closed while a burst waits in its socket (here by a task that a
    callback woke, the usual "wait for END, then close") handles none of the rest:
    no callbacks, no echoes (it reads the burst in one pass, see UDP's drain)."""
    after_close: list[int] = []
    closing = False
    tenth = anyio.Event()

    def on_info(msg: Message) -> None:
        if closing:
            after_close.append(msg.data[0])
        if msg.data[0] == 10:
            tenth.set()

    with anyio.fail_after(20), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        raw.setblocking(False)
        async with EchoProtocol.server("udp://127.0.0.1:0") as rig:
            rig.assign_callback("info", on_info)
            for i in range(300):
                raw.sendto(b"[64, %d]" % i, rig.local_address)
            await tenth.wait()
            closing = True
            await rig.aclose()
        echoes = 0
        with suppress(BlockingIOError):
            while raw.recv(100):
                echoes += 1
    assert after_close == []
    assert echoes <= rig.stats.received
