"""``EchoProtocol`` over real loopback sockets, UDP and TCP (``ws://``), on Trio and asyncio.

Every test binds port 0 and waits for what it needs through subscriptions,
events or raw socket reads, never by sleeping; ``anyio.fail_after(SAFETY)`` is
only a safety net so that a bug fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from tests.helpers import (
    LOCALHOST,
    FakeAlyx,
    free_port,
    raw_client,
    raw_server,
    raw_tcp_client,
    raw_udp,
    untag,
    uri_of,
)

from trio_rignet import (
    EchoProtocol,
    EchoStats,
    EchoTimeout,
    EndpointClosed,
    ExpMessage,
    ExpStatus,
    Message,
    PeerUnavailable,
    RignetError,
)
from trio_rignet._tag import Tagger
from trio_rignet._transport import _asyncio as asyncio_transport

pytestmark = pytest.mark.anyio

SAFETY = 5  # seconds: a safety net against hangs, never an assertion
LONG = 60  # an echo timeout that must never be reached in a passing test

INIT = ExpMessage.EXPINIT
START = ExpMessage.EXPSTART
END = ExpMessage.EXPEND
CLEANUP = ExpMessage.EXPCLEANUP
INTERRUPT = ExpMessage.EXPINTERRUPT
STATUS = ExpMessage.EXPSTATUS
INFO = ExpMessage.EXPINFO
ALYX = ExpMessage.ALYX
ERROR = ExpMessage(0)


@pytest.fixture(params=["udp", "ws"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport under test: UDP, or plain TCP under iblutil's ``ws://`` scheme."""
    return str(request.param)


@asynccontextmanager
async def server_and_client(
    scheme: str, **server_options: Any
) -> AsyncIterator[tuple[EchoProtocol, EchoProtocol]]:
    """A server on a free loopback port and a client talking to it."""
    async with (
        EchoProtocol.server(f"{scheme}://{LOCALHOST}:0", name="srv", **server_options) as srv,
        EchoProtocol.client(uri_of(srv), name="cli") as cli,
    ):
        yield srv, cli


# ------------------------------------------------------------------------ round trips

Signal = Callable[[EchoProtocol], Awaitable[Any]]

SIGNALS: list[Any] = [
    pytest.param(
        lambda e: e.init({"subject": "mouse1"}),
        Message(INIT, [{"subject": "mouse1"}]),
        b'[1, {"subject": "mouse1"}]',
        id="init",
    ),
    pytest.param(lambda e: e.init(), Message(INIT, [None]), b"[1, null]", id="init-none"),
    pytest.param(
        lambda e: e.start("2022-01-01_1_mouse1", {"trial": 3}),
        Message(START, ["2022-01-01_1_mouse1", {"trial": 3}]),
        b'[2, "2022-01-01_1_mouse1", {"trial": 3}]',
        id="start-str",
    ),
    pytest.param(
        lambda e: e.start({"date": "2022-01-01", "sequence": "2", "subject": "mouse1"}),
        Message(START, ["2022-01-01_2_mouse1", None]),
        b'[2, "2022-01-01_2_mouse1", null]',
        id="start-dict",
    ),
    pytest.param(
        lambda e: e.stop({"reason": "done"}),
        Message(END, [{"reason": "done"}]),
        b'[4, {"reason": "done"}]',
        id="stop",
    ),
    pytest.param(
        lambda e: e.stop(immediately=True),
        Message(INTERRUPT, [None]),
        b"[16, null]",
        id="stop-immediately",
    ),
    pytest.param(
        lambda e: e.cleanup([1, 2]), Message(CLEANUP, [[1, 2]]), b"[8, [1, 2]]", id="cleanup"
    ),
    pytest.param(
        lambda e: e.status(ExpStatus.RUNNING), Message(STATUS, [20]), b"[32, 20]", id="status"
    ),
    pytest.param(
        lambda e: e.status("stopped"), Message(STATUS, [30]), b"[32, 30]", id="status-name"
    ),
    pytest.param(
        lambda e: e.info(ExpStatus.INITIALIZED, {"rig": "video"}),
        Message(INFO, [10, {"rig": "video"}]),
        b'[64, 10, {"rig": "video"}]',
        id="info",
    ),
]


@pytest.mark.parametrize(("signal", "expected", "wire"), SIGNALS)
async def test_signal_round_trip(
    scheme: str, signal: Signal, expected: Message, wire: bytes
) -> None:
    with anyio.fail_after(SAFETY):
        async with (
            server_and_client(scheme) as (srv, cli),
            srv.subscribe(expected.event) as messages,
        ):
            assert await signal(cli) is None
            msg = await messages.receive()
            # The server saw exactly the message, from the client's own address.
            assert msg == Message(expected.event, expected.data, cli.local_address)
            assert cli.stats.sent == 1
            assert cli.stats.confirmed == 1
            assert cli.stats.rtt_count == 1
            assert cli.stats.timeouts == 0
            assert cli.stats.received == 1  # the echo
            assert cli.stats.echoed == 0
            assert 0 <= cli.stats.rtt_min <= cli.stats.rtt_mean <= cli.stats.rtt_max
            assert srv.stats.received == 1
            assert srv.stats.echoed == 1
            assert srv.stats.sent == 1
            assert srv.stats.confirmed == 0
            assert not cli.awaiting_response()


@pytest.mark.parametrize(("signal", "expected", "wire"), SIGNALS)
async def test_signal_wire_bytes(
    scheme: str, signal: Signal, expected: Message, wire: bytes
) -> None:
    """The bytes on the wire are exactly iblutil's (plus the tag, JSON whitespace), and
    the echo of those bytes is accepted as confirmation."""
    with anyio.fail_after(SAFETY):
        async with raw_server(scheme) as peer, EchoProtocol.client(peer.uri) as cli:
            async with anyio.create_task_group() as tg:
                tg.start_soon(signal, cli)
                raw = await peer.recv()
                assert untag(raw) == wire
                assert json.loads(raw) == json.loads(wire)
                await peer.send(raw)
            assert cli.stats.confirmed == 1


async def test_server_replies_to_msg_addr(scheme: str) -> None:
    """A server answers the peer at ``msg.addr``; the client receives and echoes the reply."""
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            async with (
                srv.subscribe(INIT) as at_server,
                cli.subscribe(STATUS | INFO | INIT) as at_client,
            ):
                await cli.init({"subject": "mouse1"})
                msg = await at_server.receive()
                await srv.status(ExpStatus.INITIALIZED, addr=msg.addr)
                await srv.info(ExpStatus.RUNNING, {"frames": 10}, addr=msg.addr)
                await srv.init("done", addr=msg.addr)  # a completion update
                replies = [await at_client.receive() for _ in range(3)]
            assert replies == [
                Message(STATUS, [10], srv.local_address),
                Message(INFO, [20, {"frames": 10}], srv.local_address),
                Message(INIT, ["done"], srv.local_address),
            ]
            assert srv.stats.confirmed == 3
            assert srv.stats.rtt_count == 3
            assert cli.stats.echoed == 3
            assert cli.stats.confirmed == 1


async def test_unconfirmed_send(scheme: str) -> None:
    """``send`` does not wait; the echo that comes back is swallowed, not echoed again.

    (Taking it for a new message would start an endless echo ping-pong.)
    """
    with anyio.fail_after(SAFETY):
        async with (
            server_and_client(scheme) as (srv, cli),
            srv.subscribe(CLEANUP | INIT) as messages,
            cli.subscribe(ExpMessage.any()) as at_client,
        ):
            await cli.send([8, {"now": True}])
            assert await messages.receive() == Message(CLEANUP, [{"now": True}], cli.local_address)
            assert cli.stats.sent == 1
            assert cli.stats.confirmed == 0
            # Messages arrive in order: once init is confirmed, the echo of the cleanup
            # has been handled by the client too.
            await cli.init()
            assert await messages.receive() == Message(INIT, [None], cli.local_address)
            assert cli.stats.received == 2
            assert cli.stats.echoed == 0
            assert cli.stats.late == 1  # the echo of the cleanup, recognised as its own
            assert cli.stats.sent == 2
            assert srv.stats.received == 2
            assert srv.stats.echoed == 2
            with pytest.raises(anyio.WouldBlock):
                at_client.receive_nowait()  # the echo was not dispatched either


async def test_repeats_are_echoed_each_time_and_dispatched_once(scheme: str) -> None:
    """A repeat of a message tagged by a trio-rignet peer (a retransmission) is echoed
    again, at most 16 times, but dispatched once; every copy of an untagged (iblutil)
    message is a new message, as in iblutil."""
    tagged = Tagger(session=0x1234).tag(b'[1, "tagged"]', seq=7)
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server(f"{scheme}://127.0.0.1:0") as srv,
            srv.subscribe(INIT) as messages,
            raw_client(srv) as peer,
        ):
            for _ in range(1 + 16):
                await peer.send(tagged)
                assert await peer.recv() == tagged
            await peer.send(tagged)  # echoed too often already: dropped
            for _ in range(2):
                await peer.send(b'[1, "untagged"]')
                assert await peer.recv() == b'[1, "untagged"]'  # the next thing echoed
            got = [await messages.receive() for _ in range(3)]
            assert [m.data for m in got] == [["tagged"], ["untagged"], ["untagged"]]
            assert [m.tag for m in got] == [(0x1234, 7, None), None, None]
            with pytest.raises(anyio.WouldBlock):
                messages.receive_nowait()
            assert srv.stats.duplicates == 16
            assert srv.stats.stale == 1
            assert srv.stats.echoed == 19
            assert srv.is_trio_peer(peer.address)


async def test_subscribe_by_name_and_on_event(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli), anyio.create_task_group() as tg:
            got: list[Message] = []

            async def wait_for_start() -> None:
                got.append(await srv.on_event("start"))

            tg.start_soon(wait_for_start)
            await anyio.wait_all_tasks_blocked()  # on_event is registered
            async with srv.subscribe("EXPSTART") as by_name:
                await cli.start("2022-01-01_1_mouse1")
                assert (await by_name.receive()).data == ["2022-01-01_1_mouse1", None]
        assert got == [Message(START, ["2022-01-01_1_mouse1", None], cli.local_address)]


async def test_compound_subscription_gets_each_message_once(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with (
            server_and_client(scheme) as (srv, cli),
            srv.subscribe(START | END) as messages,
            srv.subscribe(STATUS) as statuses,
        ):
            await cli.start("2022-01-01_1_mouse1")
            await cli.init()
            await cli.stop()
            await cli.status(ExpStatus.STOPPED)
            assert await statuses.receive() == Message(STATUS, [30], cli.local_address)
            # Everything before the status was dispatched: exactly start and stop, once each.
            assert [m.event for m in [messages.receive_nowait(), messages.receive_nowait()]] == [
                START,
                END,
            ]
            with pytest.raises(anyio.WouldBlock):
                messages.receive_nowait()


# ------------------------------------------------------------------------- callbacks


async def test_sync_and_async_callbacks(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            sync_got: list[Message] = []
            async_got: list[Message] = []
            sync_done, async_done = anyio.Event(), anyio.Event()

            def on_init(msg: Message) -> None:
                sync_got.append(msg)
                sync_done.set()

            async def on_init_async(msg: Message) -> None:
                await anyio.lowlevel.checkpoint()
                async_got.append(msg)
                async_done.set()

            srv.assign_callback(INIT, on_init)
            srv.assign_callback("init", on_init_async)
            await cli.init({"n": 1})
            await sync_done.wait()
            await async_done.wait()
            expected = Message(INIT, [{"n": 1}], cli.local_address)
            assert sync_got == [expected]
            assert async_got == [expected]


async def test_async_callback_does_not_block_receiving(scheme: str) -> None:
    """An async callback that waits does not delay echoes or later callbacks."""
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            release = anyio.Event()
            finished: list[Any] = []

            async def slow(msg: Message) -> None:
                await release.wait()
                finished.append(msg.data[0])

            srv.assign_callback(INIT, slow)
            async with srv.subscribe(INIT) as messages:
                await cli.init("first")
                await cli.init("second")  # confirmed while the first callback still waits
                assert [(await messages.receive()).data for _ in range(2)] == [
                    ["first"],
                    ["second"],
                ]
            assert finished == []
            release.set()
            async with srv.subscribe(INIT) as messages:
                await cli.init("third")
                await messages.receive()
        # Leaving the blocks waited for every callback task.
        assert sorted(finished) == ["first", "second", "third"]


@pytest.mark.parametrize("kind", ["sync", "async", "returns-awaitable"])
async def test_raising_callback_reports_error_to_sender(
    scheme: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            ran: list[str] = []
            others_done = anyio.Event()

            def before(msg: Message) -> None:
                ran.append("before")

            def after(msg: Message) -> None:
                ran.append("after")
                others_done.set()

            def bad_sync(msg: Message) -> None:
                raise ValueError(f"bad data {msg.data[0]!r}")

            async def bad_async(msg: Message) -> None:
                await anyio.lowlevel.checkpoint()
                raise ValueError(f"bad data {msg.data[0]!r}")

            def bad_returns_awaitable(msg: Message) -> Awaitable[None]:
                return bad_async(msg)

            bad = {"sync": bad_sync, "async": bad_async, "returns-awaitable": bad_returns_awaitable}
            srv.assign_callback(START, before)
            srv.assign_callback(START, bad[kind])
            srv.assign_callback(START, after)

            async with cli.subscribe(0) as errors:
                await cli.start("2022-01-01_1_mouse1")
                report = await errors.receive()
            await others_done.wait()
            assert report == Message(
                ERROR, ["ValueError: bad data '2022-01-01_1_mouse1'", 2], srv.local_address
            )
            assert report.is_error
            assert ran == ["before", "after"]
            # The sender logged the report, the receiver logged the failure.
            assert "reported an error handling EXPSTART: ValueError: bad data" in caplog.text
            assert "failed: ValueError: bad data" in caplog.text
            # The report was not echoed: the next thing the server receives is the status.
            async with srv.subscribe(STATUS) as statuses:
                await cli.status(ExpStatus.RUNNING)
                await statuses.receive()
            assert srv.stats.received == 2
            assert cli.stats.echoed == 0
            assert cli.stats.confirmed == 2


async def test_error_report_on_on_event_zero(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):

            def refuse(msg: Message) -> None:
                raise RuntimeError("not ready")

            srv.assign_callback(CLEANUP, refuse)
            async with anyio.create_task_group() as tg:
                reports: list[Message] = []

                async def wait_error() -> None:
                    reports.append(await cli.on_event(0))

                tg.start_soon(wait_error)
                await anyio.wait_all_tasks_blocked()
                await cli.cleanup()
            assert reports == [Message(ERROR, ["RuntimeError: not ready", 8], srv.local_address)]


async def test_clear_callbacks_counts(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            calls: list[str] = []

            def f(msg: Message) -> None:
                calls.append("f")

            def g(msg: Message) -> None:
                calls.append("g")

            srv.assign_callback(INIT, f)
            srv.assign_callback(INIT, g)
            srv.assign_callback(INIT, f)
            srv.assign_callback(START | END, f)
            srv.assign_callback("cleanup", g)
            assert srv.clear_callbacks(STATUS) == 0
            assert srv.clear_callbacks(INIT, f) == 2
            assert srv.clear_callbacks(INIT, f) == 0
            assert srv.clear_callbacks(START | END) == 2
            assert srv.clear_callbacks("expcleanup", f) == 0
            # g is still there for INIT and CLEANUP.
            async with srv.subscribe(INIT) as messages:
                await cli.init()
                await messages.receive()
            assert calls == ["g"]
            assert srv.clear_callbacks(INIT | CLEANUP) == 2
            assert srv.clear_callbacks(INIT | CLEANUP) == 0
            async with srv.subscribe(INIT | START | CLEANUP) as messages:
                await cli.init()
                await cli.start("2022-01-01_1_mouse1")
                await cli.cleanup()
                for _ in range(3):
                    await messages.receive()
            assert calls == ["g"]


async def test_compound_event_callback(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            got: list[Message] = []
            two = anyio.Event()

            def on_start_or_end(msg: Message) -> None:
                got.append(msg)
                if len(got) == 2:
                    two.set()

            srv.assign_callback(START | END, on_start_or_end)
            await cli.start("2022-01-01_1_mouse1")
            await cli.init()  # not START or END: no call
            await cli.stop(immediately=True)  # EXPINTERRUPT: no call
            await cli.stop({"n": 5})
            await two.wait()
            assert got == [
                Message(START, ["2022-01-01_1_mouse1", None], cli.local_address),
                Message(END, [{"n": 5}], cli.local_address),
            ]


async def test_assign_callback_validation() -> None:
    async with EchoProtocol.server("udp://127.0.0.1:0") as srv:
        with pytest.raises(TypeError, match="callback must be"):
            srv.assign_callback(INIT, "not callable")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="Unrecognized event"):
            srv.assign_callback("nonsense", print)
        with pytest.raises(ValueError, match="Unrecognized event code 256"):
            srv.assign_callback(256, print)
        with pytest.raises(TypeError, match="event must be"):
            srv.assign_callback(1.5, print)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ alyx


async def test_alyx_send(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli), srv.subscribe(ALYX) as messages:
            alyx = FakeAlyx()
            assert await cli.alyx(alyx) is None
            msg = await messages.receive()
            assert msg == Message(
                ALYX,
                ["https://alyx.example.org", {"experimenter": "0123456789abcdef"}],
                cli.local_address,
            )
            assert cli.stats.confirmed == 1


@pytest.mark.parametrize(
    ("requester", "request_data"),
    [
        pytest.param(None, [None, {}], id="no-client"),
        pytest.param(
            FakeAlyx(is_logged_in=False), ["https://alyx.example.org", {}], id="logged-out"
        ),
    ],
)
async def test_alyx_request(scheme: str, requester: FakeAlyx | None, request_data: list) -> None:
    """A token request is answered by the peer's own ``alyx(...)`` send."""
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            requests: list[Message] = []
            answered = anyio.Event()

            async def answer(msg: Message) -> None:
                requests.append(msg)
                if not msg.data[1]:  # a request, not a token
                    await srv.alyx(
                        FakeAlyx(base_url="https://alyx.lab", user="bob", _token="t0k"),
                        addr=msg.addr,
                    )
                    answered.set()

            srv.assign_callback(ALYX, answer)
            result = await cli.alyx(requester)
            await answered.wait()  # the server's answer was confirmed too
            assert result == ("https://alyx.lab", {"bob": "t0k"})
            assert requests == [Message(ALYX, request_data, cli.local_address)]
            assert cli.stats.confirmed == 1  # the request
            assert cli.stats.echoed == 1  # the answer
            assert srv.stats.confirmed == 1


async def test_server_alyx_request_to_one_client() -> None:
    """A server's request waits for the answer of the peer it asked, not another peer's."""
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("udp://127.0.0.1:0") as srv,
            EchoProtocol.client(uri_of(srv)) as asked,
            EchoProtocol.client(uri_of(srv)) as other,
            asked.subscribe(ALYX) as requests,
            anyio.create_task_group() as tg,
        ):
            result: list[Any] = []

            async def request() -> None:
                result.append(await srv.alyx(addr=asked.local_address))

            tg.start_soon(request)
            assert (await requests.receive()).data == [None, {}]
            await other.alyx(FakeAlyx(user="mallory", _token="forged"))
            await asked.alyx(FakeAlyx(user="alice", _token="real"))
        assert result == [("https://alyx.example.org", {"alice": "real"})]


# ------------------------------------------------------------------------ validation


async def test_server_send_without_addr_is_type_error(scheme: str) -> None:
    async with EchoProtocol.server(f"{scheme}://127.0.0.1:0") as srv:
        for call in (
            srv.init(),
            srv.status(ExpStatus.RUNNING),
            srv.confirmed_send([1, None]),
            srv.send([1, None]),
        ):
            with pytest.raises(TypeError, match="pass addr"):
                await call
        with pytest.raises(TypeError, match="addr must be a"):
            await srv.init(addr=("not an ip", 1))
        assert srv.stats.sent == 0


@pytest.mark.parametrize(
    "data", [{"event": 1}, b'{"event": 1}', b"42", b'"text"', b"", b"[1, null"], ids=repr
)
async def test_message_must_be_a_json_array(scheme: str, data: Any) -> None:
    """Whatever is sent must be a JSON array (``[event, ...]``): anything else is a
    ValueError, and nothing is sent."""
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli), srv.subscribe(INIT) as messages:
            with pytest.raises(ValueError, match="JSON array"):
                await cli.confirmed_send(data)
            assert not cli.awaiting_response()
            with pytest.raises(ValueError, match="JSON array"):
                await cli.send(data)
            with pytest.raises(ValueError, match="JSON array"):
                cli.send_nowait(data)
            await cli.confirmed_send(b" [1, null]\n")  # whitespace around an array is fine
            assert (await messages.receive()).data == [None]
            assert srv.stats.received == 1  # the server got that one message only
            assert cli.stats.confirmed == 1


async def test_unknown_option_is_type_error() -> None:
    with pytest.raises(TypeError, match=r"unknown endpoint option\(s\) \['bogus'\]"):
        async with EchoProtocol.client("udp://127.0.0.1:9", bogus=1):  # type: ignore[call-arg]
            pass  # pragma: no cover


async def test_client_with_other_addr_is_value_error(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli):
            host, port = srv.local_address
            with pytest.raises(ValueError, match="Unexpected remote address"):
                await cli.init(addr=(host, port + 1))
            with pytest.raises(ValueError, match="Unexpected remote address"):
                await cli.send([1, None], addr=("127.0.0.2", port))
            assert cli.stats.sent == 0
            await cli.init(addr=(host, port))  # its own peer is fine
            assert cli.stats.confirmed == 1


@pytest.mark.parametrize("timeout", [0, -1, 0.0, True, "1"])
async def test_timeout_must_be_positive(scheme: str, timeout: Any) -> None:
    async with server_and_client(scheme) as (_, cli):
        with pytest.raises(ValueError, match="Timeout must be a positive number"):
            await cli.confirmed_send([1, None], timeout=timeout)
        assert cli.stats.sent == 0
        assert not cli.awaiting_response()


async def test_echo_timeout_option_must_be_positive(scheme: str) -> None:
    with pytest.raises(ValueError, match="Timeout must be a positive number"):
        async with EchoProtocol.server(f"{scheme}://127.0.0.1:0", echo_timeout=0):
            pass  # pragma: no cover


@pytest.mark.parametrize("method", ["send", "confirmed_send"])
async def test_large_payload(scheme: str, method: str) -> None:
    """More than fits a datagram (65507 bytes, less room for the tag) is refused for UDP
    with a hint to use TCP, and works over TCP."""
    payload = [INIT, "x" * 70_000]
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli), srv.subscribe(INIT) as messages:
            if scheme == "udp":
                with pytest.raises(ValueError, match="TCP") as exc_info:
                    await getattr(cli, method)(payload)
                assert "65507" in str(exc_info.value)
                assert cli.stats.sent == 0
                assert not cli.awaiting_response()
                # The largest message that fits one datagram with its tag still goes
                # through; one byte more is refused before anything is sent.
                assert cli.max_message_size < 65507
                text = "y" * (cli.max_message_size - len(b'[1, ""]'))
                with pytest.raises(ValueError, match="TCP"):
                    await getattr(cli, method)([INIT, text + "y"])
                assert cli.stats.sent == 0
                await cli.confirmed_send([INIT, text])
                assert (await messages.receive()).data == [text]
            else:
                await getattr(cli, method)(payload)
                assert (await messages.receive()).data == payload[1:]


async def test_bad_uri() -> None:
    with pytest.raises(ValueError, match="Unsupported scheme"):
        async with EchoProtocol.client("http://127.0.0.1:9000"):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="Invalid port"):
        async with EchoProtocol.server("udp://127.0.0.1:70000"):
            pass  # pragma: no cover


# ------------------------------------------------------------------------ properties


async def test_properties(scheme: str) -> None:
    async with (
        EchoProtocol.server(f"{scheme}://127.0.0.1:0", name="main", echo_timeout=2.5) as srv,
        EchoProtocol.client(uri_of(srv)) as cli,
    ):
        host, port = srv.local_address
        assert host == LOCALHOST
        assert port > 0
        assert srv.role == "server"
        assert srv.name == "main"
        assert srv.server_uri == f"{scheme}://127.0.0.1:0"
        assert srv.hostname == LOCALHOST
        assert srv.port == 0
        assert srv.protocol == scheme
        assert srv.is_connected
        assert srv.default_echo_timeout == 2.5
        assert srv.stats == EchoStats()

        assert cli.role == "client"
        assert cli.name == f"{scheme}://127.0.0.1:{port}"  # defaults to the URI
        assert cli.server_uri == f"{scheme}://127.0.0.1:{port}"
        assert cli.hostname == LOCALHOST
        assert cli.port == port
        assert cli.protocol == scheme
        assert cli.local_address[0] == LOCALHOST
        assert cli.local_address[1] not in (0, port)
        assert cli.is_connected
        assert cli.default_echo_timeout == EchoProtocol.default_echo_timeout == 1.0
        assert not cli.awaiting_response()
        assert repr(cli) == f"<EchoProtocol client '{cli.name}' {cli.server_uri}>"
        assert srv.uri_of(cli.local_address) == f"{scheme}://127.0.0.1:{cli.local_address[1]}"


async def test_tcp_scheme_is_plain_tcp() -> None:
    with anyio.fail_after(SAFETY):
        async with server_and_client("tcp") as (srv, cli), srv.subscribe(INIT) as messages:
            assert srv.protocol == cli.protocol == "tcp"
            await cli.init("over tcp")
            assert (await messages.receive()).data == ["over tcp"]


async def test_awaiting_response(scheme: str) -> None:
    with anyio.fail_after(SAFETY):
        async with raw_server(scheme) as peer, EchoProtocol.client(peer.uri) as cli:
            assert not cli.awaiting_response()
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: cli.confirmed_send([1, "pending"], timeout=LONG))
                raw = await peer.recv()  # the send is out and waiting: the peer stays silent
                assert cli.awaiting_response()
                assert cli.awaiting_response((LOCALHOST, peer.port))
                assert not cli.awaiting_response((LOCALHOST, peer.port + 1))
                await peer.send(raw)
            assert not cli.awaiting_response()
            assert cli.stats.confirmed == 1


async def test_server_awaiting_response_per_peer() -> None:
    with anyio.fail_after(SAFETY):
        async with (
            raw_udp() as silent,
            raw_udp() as bystander,
            EchoProtocol.server("udp://127.0.0.1:0") as srv,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(lambda: srv.confirmed_send([1, None], silent.address, LONG))
            raw, sender = await silent.recv()
            assert srv.awaiting_response()
            assert srv.awaiting_response(silent.address)
            assert not srv.awaiting_response(bystander.address)
            await silent.send(raw, sender)
        assert not srv.awaiting_response()


# ------------------------------------------------------------------------------ close


async def test_leaving_block_closes(scheme: str) -> None:
    async with server_and_client(scheme) as (srv, cli):
        await cli.init()
        assert srv.is_connected
        assert cli.is_connected
    assert not srv.is_connected
    assert not cli.is_connected
    assert cli.stats.confirmed == 1  # still readable
    with pytest.raises(EndpointClosed):
        await cli.init()


async def test_aclose_is_idempotent_and_final(scheme: str) -> None:
    async with server_and_client(scheme) as (srv, cli):
        await cli.aclose()
        await cli.aclose()
        assert not cli.is_connected
        assert srv.is_connected
        with pytest.raises(EndpointClosed, match="cli"):
            await cli.confirmed_send([1, None])
        with pytest.raises(EndpointClosed):
            await cli.init()
        with pytest.raises(EndpointClosed):
            await cli.send([1, None])
        with pytest.raises(EndpointClosed):
            await cli.on_event(INIT)
        with pytest.raises(EndpointClosed):
            async with cli.subscribe(INIT):
                pass  # pragma: no cover
        assert issubclass(EndpointClosed, ConnectionError)
        assert issubclass(EndpointClosed, RignetError)
    await cli.aclose()
    await srv.aclose()


async def test_pending_waits_end_when_endpoint_closes(scheme: str) -> None:
    """Pending on_event, subscriptions and confirmed sends all end at close."""
    with anyio.fail_after(SAFETY):
        async with raw_server(scheme) as peer, EchoProtocol.client(peer.uri, name="cli") as cli:
            outcomes: dict[str, Any] = {}

            async def wait_event() -> None:
                try:
                    await cli.on_event(INIT)
                except EndpointClosed as exc:
                    outcomes["on_event"] = exc

            async def iterate() -> None:
                async with cli.subscribe(START | END) as messages:
                    outcomes["subscription"] = [m async for m in messages]

            async def send() -> None:
                try:
                    await cli.confirmed_send([32, 20], timeout=LONG)
                except EndpointClosed as exc:
                    outcomes["send"] = exc

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_event)
                tg.start_soon(iterate)
                tg.start_soon(send)
                assert untag(await peer.recv()) == b"[32, 20]"
                await anyio.wait_all_tasks_blocked()
                await cli.aclose()
            assert outcomes["subscription"] == []
            assert "cli" in str(outcomes["on_event"])
            assert "cli" in str(outcomes["send"])
            assert not cli.awaiting_response()


# --------------------------------------------------------------------- concurrency


async def test_many_peers_each_get_their_reply(scheme: str) -> None:
    n = 5
    with anyio.fail_after(SAFETY):
        async with EchoProtocol.server(f"{scheme}://127.0.0.1:0") as srv:
            confirmed: list[int] = []
            all_confirmed = anyio.Event()

            async def reply(msg: Message) -> None:
                await srv.info(ExpStatus.INITIALIZED, msg.data[0], addr=msg.addr)
                confirmed.append(msg.data[0]["rig"])
                if len(confirmed) == n:
                    all_confirmed.set()

            srv.assign_callback(INIT, reply)
            replies: dict[int, Message] = {}
            addresses: dict[int, tuple[str, int]] = {}

            async def rig(i: int) -> None:
                async with (
                    EchoProtocol.client(uri_of(srv), name=f"rig{i}") as cli,
                    cli.subscribe(INFO) as messages,
                ):
                    addresses[i] = cli.local_address
                    await cli.init({"rig": i})
                    replies[i] = await messages.receive()

            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(rig, i)
            await all_confirmed.wait()  # the server saw the echo of every reply
            assert sorted(confirmed) == list(range(n))
            assert replies == {
                i: Message(INFO, [10, {"rig": i}], srv.local_address) for i in range(n)
            }
            assert len(set(addresses.values())) == n
            assert srv.stats.confirmed == n
            assert srv.stats.echoed == n


async def test_concurrent_confirmed_sends(scheme: str) -> None:
    n = 50
    with anyio.fail_after(SAFETY):
        async with server_and_client(scheme) as (srv, cli), srv.subscribe(INFO) as messages:
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    # Ten distinct payloads, each sent five times concurrently.
                    tg.start_soon(cli.confirmed_send, [INFO, 20, {"k": i % 10}], None, LONG)
            assert cli.stats.confirmed == n
            assert cli.stats.sent == n
            assert cli.stats.timeouts == 0
            assert not cli.awaiting_response()
            received = [(await messages.receive()).data[1]["k"] for _ in range(n)]
            assert sorted(received) == sorted(i % 10 for i in range(n))
            assert srv.stats.echoed == n


async def test_peer_message_while_echo_pending(scheme: str) -> None:
    """The peer sends a message of its own before echoing: it is dispatched, the echo confirms.

    Over TCP both arrive in one write (iblutil's framing fault).
    """
    with anyio.fail_after(SAFETY):
        async with (
            raw_server(scheme) as peer,
            EchoProtocol.client(peer.uri) as cli,
            cli.subscribe(STATUS) as statuses,
        ):
            async with anyio.create_task_group() as tg:
                tg.start_soon(cli.init, {"subject": "mouse1"})
                raw = await peer.recv()
                assert untag(raw) == b'[1, {"subject": "mouse1"}]'
                if scheme == "udp":
                    await peer.send(b"[32, 20]")
                    await peer.send(raw)
                else:
                    await peer.send(b"[32, 20]" + raw)
                assert await peer.recv() == b"[32, 20]"  # the client echoed the peer's message
            assert cli.stats.confirmed == 1
            assert await statuses.receive() == Message(STATUS, [20], (LOCALHOST, peer.port))
            assert cli.stats.echoed == 1


async def test_same_bytes_from_another_peer_are_not_an_echo(scheme: str) -> None:
    """Bytes equal to a pending send, but from another peer, do not confirm it.

    The exact bytes (tag included) are this endpoint's own message: wherever they come
    from, they are dropped as such (never dispatched, never echoed). The same content
    sent by another peer is that peer's new message.
    """
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server(f"{scheme}://127.0.0.1:0") as srv,
            raw_client(srv) as asked,
            raw_client(srv) as replayer,
            EchoProtocol.client(uri_of(srv)) as other,
            srv.subscribe(INIT | STATUS) as at_srv,
        ):
            for raw_peer in (asked, replayer):
                # introduce itself (a TCP server needs the connection)
                await raw_peer.send(b"[32, 0]")
                assert await raw_peer.recv() == b"[32, 0]"
                assert await at_srv.receive() == Message(STATUS, [0], raw_peer.address)
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: srv.confirmed_send([1, "same"], asked.address, LONG))
                raw = await asked.recv()  # pending: the raw peer holds the echo back
                assert untag(raw) == b'[1, "same"]'
                # The very bytes, from another address: not the echo, not a new message.
                await replayer.send(raw)
                await replayer.send(b"[32, 10]")  # arrives after it: when echoed, raw was handled
                assert await replayer.recv() == b"[32, 10]"
                assert await at_srv.receive() == Message(STATUS, [10], replayer.address)
                assert srv.stats.late == 1
                # The same content from another trio-rignet peer: its own new message.
                await other.init("same")
                assert await at_srv.receive() == Message(INIT, ["same"], other.local_address)
                assert srv.awaiting_response(asked.address)
                assert srv.stats.confirmed == 0
                await asked.send(raw)
            assert srv.stats.confirmed == 1
            assert other.stats.confirmed == 1
            with pytest.raises(anyio.WouldBlock):
                at_srv.receive_nowait()


# ------------------------------------------------------------------- TCP stream framing


async def test_tcp_coalesced_and_split_messages() -> None:
    messages = [
        b'[1, {"a": "]"}]',
        b"[32, 20]",
        b'[2, "2022-01-01_1_s[", null]',
        b'[64, 10, {"k": "v\\"]", "\xc3\xa9": [1, [2]]}]',
        b"[8, null]",
    ]
    expected = [
        Message(INIT, [{"a": "]"}]),
        Message(STATUS, [20]),
        Message(START, ["2022-01-01_1_s[", None]),
        Message(INFO, [10, {"k": 'v"]', "\u00e9": [1, [2]]}]),
        Message(CLEANUP, [None]),
    ]
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("ws://127.0.0.1:0") as srv,
            srv.subscribe(ExpMessage.any()) as received,
            raw_tcp_client(srv.local_address[1]) as peer,
        ):
            await peer.send(b"".join(messages[:3]))  # three messages in one write
            for byte in messages[3]:  # one message in 1-byte writes
                await peer.send(bytes([byte]))
            await peer.send(b" \n" + messages[4] + b"\r\n")  # whitespace between is allowed
            echoed = await peer.recv_exactly(sum(map(len, messages)))
            assert echoed == b"".join(messages)  # every byte back, in order
            got = [await received.receive() for _ in expected]
            assert got == [Message(m.event, m.data, peer.address) for m in expected]
            # Each was dispatched exactly once: the next one is the next message sent.
            await peer.send(b"[4, null]")
            assert await peer.recv_exactly(9) == b"[4, null]"
            assert await received.receive() == Message(END, [None], peer.address)
            assert srv.stats.received == srv.stats.echoed == 6
            assert srv.stats.dropped == 0


# ------------------------------------------------------------------------- bad input

UDP_GARBAGE = [
    b"\xff\xfe\x00garbage",
    b"hello",
    b"",
    b'{"event": 1}',
    b'"text"',
    b"42",
    b"[1, nul",
    b"[256, null]",
    b"[3, null]",
    b"[-1, null]",
    b'["EXPINIT", null]',
    b"[true, null]",
    b"[1.0, null]",
    b"[]",
    b"[0, 1, 2]",
    b'[0, "text"]',
]


@pytest.mark.parametrize("garbage", UDP_GARBAGE)
async def test_udp_bad_datagram_is_dropped(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("udp://127.0.0.1:0") as srv,
            srv.subscribe(ExpMessage.any() | 0) as received,
            raw_udp() as peer,
        ):
            srv.assign_callback(ExpMessage.any(), lambda msg: None)
            await peer.send(garbage, srv.local_address)
            await peer.send(b"[1, null]", srv.local_address)
            # The first datagram back is the echo of the valid message: nothing else was echoed.
            assert await peer.recv() == (b"[1, null]", srv.local_address)
            assert await received.receive() == Message(INIT, [None], peer.address)
            assert srv.stats.dropped == 1
            assert srv.stats.received == 2
            assert srv.stats.echoed == 1
            assert "dropped a malformed message" in caplog.text
            # And a real client still works.
            async with EchoProtocol.client(uri_of(srv)) as cli:
                await cli.status(ExpStatus.RUNNING)
            assert srv.stats.echoed == 2


TCP_FRAMED_GARBAGE = [
    b"[256, null]",
    b"[3, null]",
    b"[]",
    b"[1, nul]",
    b'["EXPINIT", null]',
    b'[0, "text"]',
    b'[{"a": 1}]',
]


@pytest.mark.parametrize("garbage", TCP_FRAMED_GARBAGE)
async def test_tcp_bad_message_is_dropped_connection_kept(garbage: bytes) -> None:
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("ws://127.0.0.1:0") as srv,
            srv.subscribe(ExpMessage.any() | 0) as received,
            raw_tcp_client(srv.local_address[1]) as peer,
        ):
            await peer.send(garbage)
            await peer.send(b"[1, null]")
            assert await peer.recv_exactly(9) == b"[1, null]"
            assert await received.receive() == Message(INIT, [None], peer.address)
            assert srv.stats.dropped == 1
            assert srv.stats.echoed == 1


TCP_UNFRAMEABLE = [
    pytest.param(b"hello", id="text"),
    pytest.param(b'{"event": 1}', id="object"),
    pytest.param(b"[1, null]]", id="unbalanced"),
    pytest.param(b'[1, "' + b"x" * 100 + b'"]', id="oversized"),
    pytest.param(b"[1, " + b"[" * 100, id="oversized-unterminated"),
]


@pytest.mark.parametrize("garbage", TCP_UNFRAMEABLE)
async def test_tcp_unframeable_stream_closes_only_that_connection(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("ws://127.0.0.1:0", max_message_size=64) as srv,
            EchoProtocol.client(uri_of(srv)) as good,
            srv.subscribe(INIT) as received,
        ):
            await good.init("before")
            async with raw_tcp_client(srv.local_address[1]) as bad:
                await bad.send(garbage)
                await bad.wait_closed()  # the server hung up on it
            assert "cannot be framed" in caplog.text
            await good.init("after")
            assert good.is_connected
            assert [(await received.receive()).data for _ in range(2)] == [["before"], ["after"]]
            assert srv.stats.echoed == 2
            # A new connection is accepted and works.
            async with raw_tcp_client(srv.local_address[1]) as peer:
                await peer.send(b"[8, null]")
                assert await peer.recv_exactly(9) == b"[8, null]"


async def test_tcp_message_at_size_limit_is_accepted() -> None:
    message = b'[1, "' + b"x" * (64 - 7) + b'"]'
    assert len(message) == 64
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("ws://127.0.0.1:0", max_message_size=64) as srv,
            raw_tcp_client(srv.local_address[1]) as peer,
        ):
            await peer.send(message)
            assert await peer.recv_exactly(64) == message


async def test_tcp_stream_ending_inside_a_message(caplog: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(SAFETY):
        async with (
            EchoProtocol.server("ws://127.0.0.1:0") as srv,
            EchoProtocol.client(uri_of(srv)) as good,
        ):
            async with raw_tcp_client(srv.local_address[1]) as bad:
                await bad.send(b'[1, "unfinished')
            async with srv.subscribe(INIT) as received:
                await good.init()
                assert (await received.receive()).data == [None]
            assert srv.stats.dropped == 0


# ------------------------------------------------------------------- unreachable peers


async def test_tcp_disconnect_fails_pending_send_at_once() -> None:
    with anyio.fail_after(SAFETY):
        async with raw_server("ws") as peer, EchoProtocol.client(peer.uri, name="cli") as cli:
            assert cli.is_connected

            async def hang_up() -> None:
                assert untag(await peer.recv()) == b"[1, null]"
                await peer.disconnect()

            async with anyio.create_task_group() as tg:
                tg.start_soon(hang_up)
                with pytest.raises(PeerUnavailable) as exc_info:
                    await cli.confirmed_send([1, None], timeout=LONG)  # not an EchoTimeout
            assert exc_info.value.peer == (LOCALHOST, peer.port)
            assert isinstance(exc_info.value, ConnectionError)
            assert not cli.is_connected
            assert not cli.awaiting_response()
            assert cli.stats.timeouts == 0
            # Later sends fail too. Which ConnectionError depends on whether the client
            # endpoint has already closed itself (its only receive task ended).
            with pytest.raises((PeerUnavailable, EndpointClosed)):
                await cli.init()


async def test_tcp_server_send_to_unknown_peer() -> None:
    async with EchoProtocol.server("ws://127.0.0.1:0") as srv:
        with pytest.raises(PeerUnavailable, match="not connected"):
            await srv.init(addr=(LOCALHOST, free_port()))
        assert not srv.awaiting_response()


async def test_tcp_client_connection_refused() -> None:
    port = free_port(socket.SOCK_STREAM)
    with pytest.raises(PeerUnavailable, match="cannot connect"):
        async with EchoProtocol.client(f"ws://127.0.0.1:{port}"):
            pass  # pragma: no cover


async def test_udp_nothing_listening_then_live_server() -> None:
    port = free_port()
    with anyio.fail_after(SAFETY):
        async with EchoProtocol.client(f"udp://127.0.0.1:{port}") as cli:
            with pytest.raises((PeerUnavailable, EchoTimeout)):
                await cli.confirmed_send([1, None], timeout=1)
            assert not cli.awaiting_response()
            assert cli.is_connected  # a UDP client stays open
        async with server_and_client("udp") as (srv, cli2), srv.subscribe(INIT) as messages:
            await cli2.init("alive")
            assert (await messages.receive()).data == ["alive"]


async def test_echo_content_mismatch_is_not_a_confirmation(scheme: str) -> None:
    """A reply that differs from what was sent does not confirm it (it is a new message)."""
    with anyio.fail_after(SAFETY):
        async with (
            raw_server(scheme) as peer,
            EchoProtocol.client(peer.uri) as cli,
            cli.subscribe(INIT) as at_client,
        ):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: cli.confirmed_send(b'[1, "a"]', timeout=LONG))
                raw = await peer.recv()
                await peer.send(b'[1,"a"]')  # same JSON, other bytes: not the echo
                assert await peer.recv() == b'[1,"a"]'  # echoed back as a new message
                assert cli.awaiting_response()
                await peer.send(raw)
            assert await at_client.receive() == Message(INIT, ["a"], (LOCALHOST, peer.port))
            assert cli.stats.confirmed == 1


def test_signal_table_is_consistent() -> None:
    """Sanity check of the table above: the expected wire bytes decode to the messages."""
    for param in SIGNALS:
        _, expected, wire = param.values
        assert json.loads(wire) == [int(expected.event), *expected.data]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("reads_sockets", [True, False], ids=["selector", "proactor"])
async def test_asyncio_udp_with_or_without_reading_the_socket_directly(
    reads_sockets: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A selector loop's UDP sockets are read by the endpoint as well (bursts in one
    pass); a proactor loop's only by asyncio, with the client's transport made from
    the peer's address. Either way: round trips, in order, and a port with nothing
    listening fails the send."""
    monkeypatch.setattr(asyncio_transport, "_reads_sockets", lambda loop: reads_sockets)
    with anyio.fail_after(SAFETY):
        async with EchoProtocol.client(f"udp://127.0.0.1:{free_port()}") as cli:
            with pytest.raises((PeerUnavailable, EchoTimeout)):
                await cli.confirmed_send([1, None], timeout=1)
        async with server_and_client("udp") as (srv, cli2), srv.subscribe(INIT) as messages:
            async with anyio.create_task_group() as tg:
                for i in range(40):  # many in flight: bursts at both ends
                    tg.start_soon(cli2.init, i)
            assert sorted([(await messages.receive()).data[0] for _ in range(40)]) == list(
                range(40)
            )
            assert cli2.stats.confirmed == 40


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("reads_sockets", [True, False], ids=["selector", "proactor"])
async def test_asyncio_takes_a_waiting_burst_in_one_pass_where_it_may_read_the_socket(
    reads_sockets: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio hands a protocol one datagram per pass of its loop. Where the endpoint may
    read the socket itself (selector loops) a burst already waiting takes a few passes,
    not one each; where it may not (proactor loops) each datagram takes its own."""
    burst = 50
    passes = 0
    hand_over = asyncio_transport._DatagramProtocol.datagram_received

    def counted(self: Any, data: bytes, addr: Any) -> None:
        nonlocal passes
        passes += 1
        hand_over(self, data, addr)

    monkeypatch.setattr(asyncio_transport._DatagramProtocol, "datagram_received", counted)
    monkeypatch.setattr(asyncio_transport, "_reads_sockets", lambda loop: reads_sockets)
    with anyio.fail_after(SAFETY), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
        async with (
            EchoProtocol.server("udp://127.0.0.1:0") as rig,
            rig.subscribe("info") as messages,
        ):
            for i in range(burst):  # all waiting before the endpoint's loop runs again
                raw.sendto(b"[64, %d]" % i, rig.local_address)
            assert [(await messages.receive()).data[0] for _ in range(burst)] == list(range(burst))
    if reads_sockets:
        assert passes < burst // 2
    else:
        assert passes == burst
