"""``trio_rignet.compat.iblutil``: iblutil 1.20.0's ``app`` and ``base`` API on trio-rignet.

Written from iblutil's documented behaviour (its API reference and docstrings),
against trio-rignet peers; ``tests/interop/test_interop_compat.py`` runs the same
API against the real iblutil. asyncio only: iblutil's API is asyncio's.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import logging
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from unittest import mock

import anyio
import pytest
from tests.compat_scripts import load_script

import trio_rignet
from trio_rignet import Message, RigService
from trio_rignet.compat import iblutil as net
from trio_rignet.compat.iblutil import app, base

pytestmark = pytest.mark.anyio

SCHEMES = [pytest.param("udp", id="udp"), pytest.param("ws", id="tcp")]
LOOPBACK = "127.0.0.1"
WAIT = 5.0


@pytest.fixture
def anyio_backend() -> object:
    """asyncio only (iblutil's API is asyncio's), under ProactorEventLoop's rules."""
    from tests.conftest import proactor_loop

    return ("asyncio", {"loop_factory": proactor_loop})


@pytest.fixture
def log(request: pytest.FixtureRequest) -> logging.Logger:
    """A logger for communicators (iblutil's default one writes DEBUG lines to stdout)."""
    logger = logging.getLogger(f"compat.{request.node.name}")
    logger.setLevel(logging.DEBUG)
    return logger


class Alyx:
    """A logged-in stand-in for ``one.webclient.AlyxClient``."""

    base_url = "https://alyx.example.org"
    user = "experimenter"
    _token = "token-Ω"
    is_logged_in = True


@asynccontextmanager
async def rignet_server(scheme: str) -> AsyncIterator[trio_rignet.EchoProtocol]:
    async with trio_rignet.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", name="peer") as ep:
        yield ep


def uri_of(ep: trio_rignet.EchoProtocol) -> str:
    return ep.uri_of(ep.local_address)


async def next_message(sub: Any) -> Message:
    with anyio.fail_after(WAIT):
        msg: Message = await sub.get()
        return msg


@asynccontextmanager
async def link(
    scheme: str, log: logging.Logger
) -> AsyncIterator[tuple[app.EchoProtocol, trio_rignet.EchoProtocol, Any]]:
    """A compat client and the trio-rignet server it talks to (which knows its address)."""
    async with rignet_server(scheme) as peer:
        com = await app.EchoProtocol.client(uri_of(peer), name="main", log=log)
        try:
            with peer.subscription("status") as hello:
                await com.status(0)
                addr = (await next_message(hello)).addr
            yield com, peer, addr
        finally:
            com.close()
            await com._wait_closed()


async def until(predicate: Any) -> None:
    """Wait until ``predicate()`` is true (callbacks append to lists; polling them is simplest)."""
    with anyio.fail_after(WAIT):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def silent_udp() -> socket.socket:
    """A bound UDP socket that never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    return sock


# ====================================================================== base


def test_base_constants_and_versions() -> None:
    assert base.LISTEN_PORT == 11001
    assert base.PROTOCOL_VERSION == "1.0.0"
    assert base.ExpMessage.__version__ == "1.0.0"
    assert base.ExpStatus.__version__ == "1.0.0"
    assert base.Service.__version__ == "1.0.0"
    assert [(m.name, int(m)) for m in base.ExpMessage] == [
        ("EXPINIT", 1),
        ("EXPSTART", 2),
        ("EXPEND", 4),
        ("EXPCLEANUP", 8),
        ("EXPINTERRUPT", 16),
        ("EXPSTATUS", 32),
        ("EXPINFO", 64),
        ("ALYX", 128),
    ]
    assert [(s.name, int(s)) for s in base.ExpStatus] == [
        ("CONNECTED", 0),
        ("INITIALIZED", 10),
        ("RUNNING", 20),
        ("STOPPED", 30),
    ]
    # Members equal trio-rignet's as integers.
    assert base.ExpMessage.EXPEND == trio_rignet.ExpMessage.EXPEND
    assert net.app is app
    assert net.base is base


def test_exp_message_validate_as_iblutil() -> None:
    E = base.ExpMessage
    assert E.any() == 255
    assert E.any() not in list(E)
    assert E.validate("expstart") is E.EXPSTART
    assert E.validate(" EXPEND ") is E.EXPEND
    assert E.validate(4) is E.EXPEND
    assert E.validate(E.ALYX) is E.ALYX
    assert E.validate(10) == E.EXPSTART | E.EXPCLEANUP  # a combination, as iblutil's
    with pytest.raises(ValueError, match="Unrecognized event"):
        E.validate("start")  # full member names only
    with pytest.raises(ValueError, match="Unrecognized event"):
        E.validate("STOP")
    with pytest.raises(ValueError, match="Compound"):
        E.validate(3, allow_bitwise=False)
    with pytest.raises(TypeError, match="Unknown event type"):
        E.validate(1.0)
    # Iterating an event yields its bits as ints (iblutil's back-port of 3.11's Flag iteration).
    assert list(E.EXPINIT | E.EXPEND) == [1, 4]
    assert list(E(0)) == []
    assert all(type(b) is int for b in E.any())


def test_service_messages() -> None:
    class Rig(base.Service):
        def init(self, data: Any = None) -> Any:
            return super().init(data)

        def start(self, exp_ref: Any, data: Any = None) -> Any:
            return super().start(exp_ref, data)

        def stop(self, data: Any = None, immediately: bool = False) -> Any:
            return super().stop(data, immediately)

        def status(self, status: Any) -> Any:
            return super().status(status)

        def info(self, status: Any, data: Any = None) -> Any:
            return super().info(status, data)

        def cleanup(self, data: Any = None) -> Any:
            return super().cleanup(data)

        def alyx(self, alyx: Any) -> Any:
            return super().alyx(alyx)

    rig = Rig()
    E, S = base.ExpMessage, base.ExpStatus
    assert rig.init({"a": 1}) == (E.EXPINIT, {"a": 1})
    ref = {"date": "2024-01-02", "sequence": "3", "subject": "m"}
    assert rig.start(ref) == (E.EXPSTART, "2024-01-02_3_m", None)
    assert rig.start("") == (E.EXPSTART, None, None)
    assert rig.stop(1, immediately=True) == (E.EXPINTERRUPT, 1)
    assert rig.status("RUNNING") == (E.EXPSTATUS, S.RUNNING)
    with pytest.raises(KeyError):
        rig.status("running")  # exact member names, as iblutil
    assert rig.info(30, "x") == (E.EXPINFO, S.STOPPED, "x")
    assert rig.cleanup() == (E.EXPCLEANUP, None)
    assert rig.alyx(None) == (E.ALYX, None, {})
    assert rig.alyx(Alyx()) == (E.ALYX, Alyx.base_url, {Alyx.user: Alyx._token})
    with pytest.raises(TypeError):
        base.Service()  # type: ignore[abstract]


async def test_is_success() -> None:
    loop = asyncio.get_running_loop()
    done, failed, cancelled, pending = (loop.create_future() for _ in range(4))
    done.set_result(1)
    failed.set_exception(RuntimeError())
    cancelled.cancel()
    assert base.is_success(done)
    assert not base.is_success(failed)
    assert not base.is_success(cancelled)
    assert not base.is_success(pending)


def test_addresses() -> None:
    assert base.validate_uri("127.0.0.1") == "udp://127.0.0.1:11001"
    assert base.validate_uri("ws://127.0.0.1:9998") == "ws://127.0.0.1:9998"
    assert base.validate_uri(ipaddress.ip_address("10.0.0.2")) == "udp://10.0.0.2:11001"
    assert base.validate_uri("localhost:9000") == "udp://127.0.0.1:9000"
    assert base.validate_uri("rig-1", resolve_host=False) == "udp://rig-1:11001"
    with pytest.raises(ValueError, match="Invalid port"):
        base.validate_uri("127.0.0.1:70000")
    with pytest.raises(TypeError):
        base.validate_uri(11001)
    assert base.is_valid_ip("::1")
    assert not base.is_valid_ip("rig")
    assert base.hostname2ip("localhost") == ipaddress.ip_address("127.0.0.1")
    with pytest.raises(ValueError, match="Failed to resolve"):
        base.hostname2ip("no-such-host.invalid")
    response = mock.MagicMock()
    response.__enter__.return_value.read.return_value = b"203.0.113.7"
    with mock.patch("urllib.request.urlopen", return_value=response) as urlopen:
        assert base.external_ip() == ipaddress.ip_address("203.0.113.7")
    urlopen.assert_called_once_with("https://ident.me")


def test_communicator_encode_decode() -> None:
    C = base.Communicator
    assert C.encode([1, None]) == b"[1, null]"
    assert C.encode("[1]") == b"[1]"
    assert C.encode(b"x") == b"x"
    assert app.EchoProtocol.encode(bytearray(b"[2]")) == b"[2]"
    assert C.decode(b'[2, "x"]') == [2, "x"]
    with pytest.warns(UserWarning, match="Failed to decode as JSON"):
        assert C.decode(b"not json") == "not json"


# ============================================================ EchoProtocol


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_client_signals(scheme: str, log: logging.Logger) -> None:
    async with link(scheme, log) as (com, peer, _):
        assert com.role == "client"
        assert com.is_connected
        assert com.protocol == scheme
        assert (com.hostname, com.port) == peer.local_address
        assert com.server_uri == uri_of(peer)
        assert com.Server is None
        ref = {"date": "2024-01-02", "sequence": 3, "subject": "souris"}
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any], list[Any]]] = [
            ("init", ({"n": 1},), {}, [1, {"n": 1}]),
            ("start", ("2024-01-01_1_m", "d"), {}, [2, "2024-01-01_1_m", "d"]),
            ("start", (ref,), {}, [2, "2024-01-02_3_souris", None]),
            ("stop", ("s",), {}, [4, "s"]),
            ("stop", (), {"immediately": True}, [16, None]),
            ("cleanup", (), {}, [8, None]),
            ("status", (base.ExpStatus.RUNNING,), {}, [32, 20]),
            ("status", ("STOPPED",), {}, [32, 30]),
            ("info", (10, {"x": [1]}), {}, [64, 10, {"x": [1]}]),
            ("confirmed_send", ([32, 0],), {"timeout": 0.5}, [32, 0]),
        ]
        with peer.subscription(trio_rignet.ExpMessage.any()) as received:
            for method, args, kwargs, wire in calls:
                assert await getattr(com, method)(*args, **kwargs) is None
                msg = await next_message(received)
                assert [int(msg.event), *msg.data] == wire, method
        assert not com.awaiting_response()
        assert not com.awaiting_response(peer.local_address)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_server_signals_name_the_peer(scheme: str, log: logging.Logger) -> None:
    com = await app.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", name="rig", log=log)
    try:
        assert com.role == "server"
        assert com.port != 0  # the bound port, written into server_uri
        assert com.server_uri == f"{scheme}://{LOOPBACK}:{com.port}"
        assert (com.Server is not None) == (scheme == "ws")
        async with trio_rignet.EchoProtocol.client(com.server_uri, name="main") as main:
            got: list[Any] = []
            com.assign_callback("EXPSTATUS", lambda data, addr: got.append((data, addr)))
            await main.status(20)
            await until(lambda: got)
            data, addr = got[0]
            assert data == [20]
            assert addr == main.local_address
            with main.subscription(trio_rignet.ExpMessage.any()) as received:
                await com.init("a", addr=addr)
                await com.start("2024-01-01_1_m", addr=addr)
                await com.confirmed_send([64, 30, None], addr=list(addr))
                com.send([8, "no echo awaited"], addr)
                events = [(await next_message(received)).event for _ in range(4)]
            assert events == [1, 2, 64, 8]
            with pytest.raises(TypeError, match="missing 1 required argument: 'addr'"):
                await com.init("a")
            with pytest.raises(TypeError):
                com.send([1, None])
    finally:
        com.close()
        await com._wait_closed()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_argument_checks(scheme: str, log: logging.Logger) -> None:
    async with link(scheme, log) as (com, _, _):
        with pytest.raises(ValueError, match="Unexpected remote address"):
            await com.init(addr=("127.0.0.1", 1))
        with pytest.raises(ValueError, match="Timeout must be non-zero number"):
            await com.confirmed_send([1, None], timeout=-1)
        await com.confirmed_send([1, None], timeout=0)  # 0: the default, as iblutil
        with pytest.raises(ValueError, match="JSON array"):
            await com.confirmed_send("not an array")
    with pytest.raises(ValueError, match="role"):
        app.EchoProtocol(f"{scheme}://{LOOPBACK}:1", "peer")
    with pytest.raises(TypeError, match="unsupported argument"):
        await app.EchoProtocol.client(f"{scheme}://{LOOPBACK}:1", log=log, reuse_port=True)


async def test_role_is_read_only_and_unopened_communicator(log: logging.Logger) -> None:
    com = app.EchoProtocol("udp://127.0.0.1:9", "Client", name="x", logger=log)
    assert com.role == "client"
    with pytest.raises(AttributeError):
        com.role = "server"
    assert not com.is_connected
    assert not com.awaiting_response()
    with pytest.raises(TimeoutError):  # never opened: as iblutil, it times out, at once here
        await com.init()
    com.close()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_events_callbacks_and_futures(scheme: str, log: logging.Logger) -> None:
    E = base.ExpMessage
    async with link(scheme, log) as (com, peer, addr):
        plain: list[Any] = []
        compound: list[Any] = []
        async_calls: list[Any] = []

        async def async_callback(data: Any, addr: Any) -> None:
            await asyncio.sleep(0)
            async_calls.append(data)

        def on_plain(data: Any, addr: Any) -> None:
            plain.append((data, addr))

        com.assign_callback("expinit", on_plain)
        com.assign_callback(E.EXPEND | E.EXPINTERRUPT, lambda *args: compound.append(args))
        com.assign_callback(1, async_callback)
        future = asyncio.get_running_loop().create_future()
        com.assign_callback(E.EXPINIT, future)
        waiter = asyncio.ensure_future(com.on_event("EXPINIT"))
        either = asyncio.ensure_future(com.on_event(E.EXPEND | E.EXPINTERRUPT))
        await asyncio.sleep(0)

        sender = peer.local_address
        await peer.confirmed_send([1, {"k": "v"}], addr)
        data, where = await asyncio.wait_for(waiter, WAIT)
        assert (data, where) == ([{"k": "v"}], sender)
        assert future.result() == ([{"k": "v"}], sender)
        assert plain == [([{"k": "v"}], sender)]
        await peer.confirmed_send([16, "now"], addr)
        data, where, event = await asyncio.wait_for(either, WAIT)
        assert (data, event) == (["now"], E.EXPINTERRUPT)
        assert isinstance(event, base.ExpMessage)
        assert compound == [(["now"], sender, E.EXPINTERRUPT)]
        await until(lambda: async_calls)
        assert async_calls == [[{"k": "v"}]]

        # Futures were resolved once and removed; callbacks stay.
        await peer.confirmed_send([1, 2], addr)
        await peer.confirmed_send([4, 3], addr)
        await until(lambda: len(compound) >= 2 and len(plain) >= 2)
        assert com.clear_callbacks("EXPINIT", on_plain) == 1
        assert com.clear_callbacks(E.EXPINIT) == 1  # the async callback
        assert com.clear_callbacks(E.EXPEND | E.EXPINTERRUPT) == 2
        pending = asyncio.get_running_loop().create_future()
        com.assign_callback("ALYX", pending)
        assert com.clear_callbacks("ALYX") == 1
        assert pending.cancelled()
        with pytest.raises(TypeError, match="callable or a Future"):
            com.assign_callback("EXPINIT", 3)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_on_event_cancelled_leaves_nothing_behind(scheme: str, log: logging.Logger) -> None:
    async with link(scheme, log) as (com, _, _):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(com.on_event("EXPSTART"), 0.01)
        assert com.clear_callbacks("EXPSTART") == 0
        # A task waiting for any event, cancelled by the caller (iblrig's camera loop).
        task = asyncio.ensure_future(com.on_event(base.ExpMessage.any()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert com.clear_callbacks(base.ExpMessage.any()) == 0


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_await_after_send_gets_an_instant_reply(scheme: str, log: logging.Logger) -> None:
    """``await com.init()`` then ``await com.on_event("EXPINIT")`` (iblutil's documented
    example) gets the completion even when it arrives right behind the echo, before the
    ``on_event`` call: iblutil drops such a message (no callback yet)."""
    async with rignet_server(scheme) as peer:

        def complete_at_once(msg: Message) -> None:  # runs right after the echo went out
            peer.send_nowait([1, {"done": msg.data[0]}], msg.addr)

        peer.assign_callback("init", complete_at_once)
        com = await app.EchoProtocol.client(uri_of(peer), log=log)
        try:
            for i in range(30):
                await com.init(i)
                data, addr = await asyncio.wait_for(com.on_event("EXPINIT"), WAIT)
                assert data == [{"done": i}]
                assert addr == peer.local_address
        finally:
            com.close()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_a_loop_that_awaits_each_message_misses_none(
    scheme: str, log: logging.Logger
) -> None:
    """iblrig's camera loop: ``on_event(ExpMessage.any())`` again after handling each message;
    messages that arrive while it is busy are not lost."""
    async with link(scheme, log) as (com, peer, addr):
        got: list[Any] = []

        async def loop() -> None:
            while len(got) < 6:
                data, _, event = await com.on_event(base.ExpMessage.any())
                got.append((int(event), data))
                await asyncio.sleep(0.01)  # busy handling it (iblrig: starting the cameras)

        task = asyncio.ensure_future(loop())
        await asyncio.sleep(0.01)
        for code in (1, 32, 2, 32, 4, 8):
            await peer.send([code, code], addr)
        await asyncio.wait_for(task, WAIT)
        assert got == [(code, [code]) for code in (1, 32, 2, 32, 4, 8)]


async def test_only_expected_replies_are_kept(
    log: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with link("udp", log) as (com, peer, addr):
        # Nothing sent or awaited for EXPINFO: a message now is not kept (on_event waits for
        # the next one, as iblutil's).
        await peer.confirmed_send([64, 0, "early"], addr)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(com.on_event("EXPINFO"), 0.05)
        # A reply kept too long is dropped.
        monkeypatch.setattr(app, "_KEEP_FOR", 0.05)
        waiter = asyncio.ensure_future(com.on_event("EXPSTART"))
        await asyncio.sleep(0)
        await peer.confirmed_send([2, "a", None], addr)
        assert (await asyncio.wait_for(waiter, WAIT))[0] == ["a", None]
        await peer.confirmed_send([2, "b", None], addr)  # kept for 0.05 s
        await asyncio.sleep(0.1)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(com.on_event("EXPSTART"), 0.05)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_failing_callback_reports_and_the_rest_still_run(
    scheme: str, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    async with link(scheme, log) as (com, peer, addr):
        later: list[Any] = []

        def broken(data: Any, addr: Any) -> None:
            raise ValueError("caméra non prête")

        async def broken_async(data: Any, addr: Any) -> None:
            raise RuntimeError("async failure")

        com.assign_callback("EXPSTART", broken)
        com.assign_callback("EXPSTART", broken)  # a second failure: still one report
        com.assign_callback("EXPSTART", lambda data, addr: later.append(data))
        waiter = asyncio.ensure_future(com.on_event("EXPSTART"))
        await asyncio.sleep(0)
        with peer.subscription(0) as reports:
            await peer.confirmed_send([2, "ref", None], addr)
            report = await next_message(reports)
            assert report.data == ["ValueError: caméra non prête", 2]
            assert (await asyncio.wait_for(waiter, WAIT))[0] == ["ref", None]
            assert later == [["ref", None]]
            com.clear_callbacks("EXPSTART")
            com.assign_callback("EXPCLEANUP", broken_async)
            await peer.confirmed_send([8, None], addr)
            report = await next_message(reports)
            assert report.data == ["RuntimeError: async failure", 8]
        errors = [
            r.getMessage() for r in caplog.records if r.name == log.name and r.levelname == "ERROR"
        ]
        assert any('failed with error "caméra non prête"' in e for e in errors)
        assert any('failed with error "async failure"' in e for e in errors)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_error_report_received(
    scheme: str, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    async with link(scheme, log) as (com, peer, addr):
        reports = asyncio.ensure_future(com.on_event(0))
        await asyncio.sleep(0)
        await peer.send([0, "ValueError: no subject", 1], addr)
        data, _ = await asyncio.wait_for(reports, WAIT)
        assert data == ["ValueError: no subject", 1]
        host, port = addr
        expected = (
            f"Callback for EXPINIT on {scheme}://{host}:{port} failed with ValueError: no subject"
        )
        assert expected.replace(f"{host}:{port}", f"{com.hostname}:{com.port}") in [
            r.getMessage() for r in caplog.records if r.name == log.name
        ]


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_logging_as_iblutil(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with rignet_server(scheme) as peer:
        name = f"video-{scheme}-{time.monotonic_ns()}"
        com = await app.EchoProtocol.client(uri_of(peer), name=name)
        try:
            logger = logging.getLogger(name)
            assert com.logger is logger
            assert logger.level == logging.DEBUG
            assert [h.name for h in logger.handlers] == [f"{name}_auto"]
            assert logger.handlers[0].stream is sys.stdout  # type: ignore[attr-defined]
            with peer.subscription("init") as inits:
                await com.init()
                addr = (await next_message(inits)).addr
            await peer.confirmed_send([32, 10], addr)
            await until(
                lambda: [r for r in caplog.records if r.getMessage().startswith("Received")]
            )
        finally:
            com.close()
            await com._wait_closed()
        server = await app.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", name=name + "-s")
        server.close()
        await server._wait_closed()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith(name)]
    assert "Confirmation received" in lines
    assert f"Received '[32, 10]' from {scheme}://{com.hostname}:{com.port}" in lines
    assert f"Listening on {server.server_uri}" in lines
    assert "Connection closed" in lines
    for handler in logging.getLogger(name).handlers + logging.getLogger(name + "-s").handlers:
        handler.close()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_alyx(scheme: str, log: logging.Logger) -> None:
    async with link(scheme, log) as (com, peer, addr):
        with peer.subscription("alyx") as tokens:
            assert await com.alyx(Alyx()) is None
            msg = await next_message(tokens)
            assert msg.data == [Alyx.base_url, {Alyx.user: Alyx._token}]

            async def answer() -> None:
                request = await next_message(tokens)
                assert request.data == [None, {}]
                await peer.confirmed_send([128, "https://other", {"u": "t"}], addr)

            task = asyncio.ensure_future(answer())
            assert await asyncio.wait_for(com.alyx(), WAIT) == ["https://other", {"u": "t"}]
            await task
    server = await app.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", log=log)
    try:
        with pytest.raises(trio_rignet.PeerNotAllowed):  # a token to a stranger
            await server.alyx(Alyx(), addr=("127.0.0.1", 9))
    finally:
        server.close()


async def test_echo_timeout_keeps_the_communicator_open(log: logging.Logger) -> None:
    sock = silent_udp()
    port = sock.getsockname()[1]
    com = await app.EchoProtocol.client(f"udp://{LOOPBACK}:{port}", name="cam", log=log)
    try:
        com.default_echo_timeout = 0.05
        began = time.monotonic()
        with pytest.raises(TimeoutError) as caught:
            await com.init()
        assert time.monotonic() - began < 1
        assert str(caught.value) == (
            f"Failed to receive client response in time (cam: udp://{LOOPBACK}:{port})"
        )
        assert isinstance(caught.value, trio_rignet.EchoTimeout)
        assert com.is_connected  # iblutil would have closed it

        async def echo_once() -> None:
            data, addr = await asyncio.get_running_loop().sock_recvfrom(sock, 65536)
            await asyncio.get_running_loop().sock_sendto(sock, data, addr)

        sock.setblocking(False)
        while True:  # drop the first, unanswered datagram
            try:
                sock.recvfrom(65536)
            except BlockingIOError:
                break
        echo = asyncio.ensure_future(echo_once())
        await com.status(
            20,
        )
        await echo
        assert not com.awaiting_response()
    finally:
        com.close()
        sock.close()


async def test_peer_unreachable(log: logging.Logger) -> None:
    sock = silent_udp()
    port = sock.getsockname()[1]
    sock.close()
    com = await app.EchoProtocol.client(f"udp://{LOOPBACK}:{port}", log=log)
    try:
        with pytest.raises(TimeoutError) as caught:
            await com.init()
        assert isinstance(caught.value, trio_rignet.PeerUnavailable)
        assert isinstance(com.on_error_received.result(), ConnectionRefusedError)
        assert com.is_connected
    finally:
        com.close()
    with pytest.raises(ConnectionRefusedError):
        await app.EchoProtocol.client(f"ws://{LOOPBACK}:{port}", log=log)


def silent_peer(scheme: str) -> socket.socket:
    """A peer that never echoes: a bound UDP socket, or a TCP listener that never accepts
    (the kernel completes the connection all the same)."""
    if scheme == "udp":
        return silent_udp()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_close(scheme: str, log: logging.Logger) -> None:
    sock = silent_peer(scheme)
    com = await app.EchoProtocol.client(f"{scheme}://{LOOPBACK}:{sock.getsockname()[1]}", log=log)
    try:
        com.default_echo_timeout = WAIT
        pending = asyncio.ensure_future(com.init())
        event = asyncio.ensure_future(com.on_event("EXPSTART"))
        callback_future = asyncio.get_running_loop().create_future()
        com.assign_callback("EXPEND", callback_future)
        await asyncio.sleep(0.01)
        assert com.awaiting_response()
        com.close()
        assert not com.is_connected  # at once
        com.close()  # twice: nothing more
        assert com.on_connection_lost.result() == "Close called on communicator"
        assert com.on_eof_received.cancelled()
        assert com.on_error_received.cancelled()
        assert callback_future.cancelled()
        with pytest.raises(asyncio.CancelledError):  # as iblutil
            await pending
        with pytest.raises(asyncio.CancelledError):
            await event
        await asyncio.wait_for(com._wait_closed(), WAIT)
        with pytest.raises(TimeoutError) as caught:
            await com.init()
        assert isinstance(caught.value, trio_rignet.EndpointClosed)
        com.send([1, None])  # logged, not raised
    finally:
        sock.close()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_close_frees_the_port(scheme: str, log: logging.Logger) -> None:
    com = await app.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", log=log)
    uri = com.server_uri
    if scheme == "ws":
        assert com.Server.is_serving()
        serving = asyncio.ensure_future(com.Server.serve_forever())
        await asyncio.sleep(0)
        com.Server.close()
        await asyncio.wait_for(serving, WAIT)
        await com.Server.wait_closed()
        assert not com.Server.is_serving()
    else:
        com.close()
        await com._wait_closed()
    again = await app.EchoProtocol.server(uri, log=log)
    assert again.server_uri == uri
    if scheme == "ws":  # cancelling serve_forever closes the server, as asyncio's
        serving = asyncio.ensure_future(again.Server.serve_forever())
        await asyncio.sleep(0)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert not again.is_connected
    again.close()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_close_from_a_callback(scheme: str, log: logging.Logger) -> None:
    async with link(scheme, log) as (com, peer, addr):
        seen: list[Any] = []

        def closing(data: Any, addr: Any) -> None:
            com.close()
            com.send([32, 0])  # after close: not sent, no exception

        com.assign_callback("EXPCLEANUP", closing)
        com.assign_callback("EXPCLEANUP", lambda data, addr: seen.append(data))
        await peer.confirmed_send([8, None], addr)
        await asyncio.wait_for(com._wait_closed(), WAIT)
        assert not com.is_connected
        assert seen == [[None]]  # the callbacks copied before close still run, as iblutil


async def test_tcp_peer_disconnects(log: logging.Logger) -> None:
    async with rignet_server("ws") as peer:
        com = await app.EchoProtocol.client(uri_of(peer), log=log)
        await com.status(0)
    with anyio.fail_after(WAIT):
        assert await com.on_eof_received is True
        assert await com.on_connection_lost is None
    assert not com.is_connected
    with pytest.raises(TimeoutError) as caught:
        await com.init()
    assert isinstance(caught.value, trio_rignet.PeerUnavailable)
    com.close()


@pytest.mark.parametrize(
    "ending",
    [
        pytest.param("return", id="asyncio.run-ends"),
        pytest.param("close-then-return", id="close-then-asyncio.run-ends"),
        pytest.param("run_until_complete", id="loop-closed-by-hand"),
    ],
)
def test_loop_ends_without_close(ending: str) -> None:
    """Communicators left open when the loop ends close quietly (nothing on stderr)."""
    script = textwrap.dedent(
        f"""
        import asyncio, logging
        from trio_rignet.compat.iblutil import app

        quiet = logging.getLogger("quiet")
        quiet.setLevel(logging.WARNING)
        coms = []

        async def main():
            for scheme in ("udp", "ws"):
                server = await app.EchoProtocol.server(f"{{scheme}}://127.0.0.1:0", log=quiet)
                client = await app.EchoProtocol.client(server.server_uri, log=quiet)
                await client.init("x")
                coms.extend((server, client))
            if "{ending}" == "close-then-return":
                for com in coms:
                    com.close()

        if "{ending}" == "run_until_complete":
            loop = asyncio.new_event_loop()
            loop.run_until_complete(main())
            loop.close()
        else:
            asyncio.run(main())
        print("connected after the loop:", [com.is_connected for com in coms])
        """
    )
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::RuntimeWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    if ending != "run_until_complete":
        assert "connected after the loop: [False, False, False, False]" in result.stdout
    for sign in ("Traceback", "Task was destroyed", "never retrieved", "Exception", "Error"):
        assert sign not in result.stderr, result.stderr


# ================================================================== Services


def _rig(name: str, scheme: str, order: list[str] | None = None, **behaviour: Any) -> RigService:
    rig = RigService(f"{scheme}://{LOOPBACK}:0", name=name)

    async def handler(msg: Message) -> Any:
        if order is not None:
            order.append(f"{name}:{msg.event.name}")
        if msg.event in behaviour.get("fail", ()):
            raise ValueError(f"{name} refuses {msg.event.name}")
        if msg.event in behaviour.get("slow", ()):
            await anyio.sleep(WAIT)
        if msg.event == trio_rignet.ExpMessage.EXPSTATUS:
            return msg.data[0]
        return {"rig": name, "got": msg.data[-1]}

    for event in ("init", "start", "stop", "interrupt", "cleanup", "status", "info"):
        rig.handle(event)(handler)
    return rig


@asynccontextmanager
async def rigs_and_services(
    rigs: list[RigService], log: logging.Logger, timeout: float = WAIT
) -> AsyncIterator[app.Services]:
    async with anyio.create_task_group() as tg:
        for rig in rigs:
            await tg.start(rig.serve)
        clients = [await app.EchoProtocol.client(rig.local_uri, rig.name, log=log) for rig in rigs]
        services = app.Services(clients, timeout=timeout)
        try:
            yield services
        finally:
            services.close()
            for com in clients:
                await com._wait_closed()
            tg.cancel_scope.cancel()


async def test_services_signals_mixed_udp_and_tcp(log: logging.Logger) -> None:
    order: list[str] = []
    rigs = [_rig("video", "udp", order), _rig("ephys", "ws", order), _rig("sync", "udp", order)]
    async with rigs_and_services(rigs, log) as services:
        assert list(services) == ["video", "ephys", "sync"]
        assert services.is_connected
        names = list(services)

        def expect(got: Any) -> dict[str, Any]:
            return {name: [{"rig": name, "got": got}] for name in names}

        assert await services.init({"s": 1}) == expect({"s": 1})
        assert await services.start("2024-01-01_1_m", "d") == {
            name: ["2024-01-01_1_m", {"rig": name, "got": "d"}] for name in names
        }
        assert await services.status(base.ExpStatus.RUNNING) == {name: [20] for name in names}
        assert await services.info("RUNNING", "i") == {
            name: [20, {"rig": name, "got": "i"}] for name in names
        }
        assert await services.stop("x", immediately=True) == expect("x")
        assert await services.stop() == expect(None)
        assert await services.cleanup() == expect(None)
        # Sequential: one rig after the other, stop and cleanup in reverse order.
        order.clear()
        assert await services.init(concurrent=False) == expect(None)
        assert await services.cleanup(concurrent=False) == expect(None)
        assert await services.stop(concurrent=False) == expect(None)
        assert await services.status(0, concurrent=False) == {name: [0] for name in names}
        assert order == [
            "video:EXPINIT",
            "ephys:EXPINIT",
            "sync:EXPINIT",
            "sync:EXPCLEANUP",
            "ephys:EXPCLEANUP",
            "video:EXPCLEANUP",
            "sync:EXPEND",
            "ephys:EXPEND",
            "video:EXPEND",
            "video:EXPSTATUS",
            "ephys:EXPSTATUS",
            "sync:EXPSTATUS",
        ]
        # iblrig calls the private _signal with confirmed_send.
        info = [base.ExpMessage.EXPINFO, 10, {"n": 1}]
        assert await services._signal(base.ExpMessage.EXPINFO, "confirmed_send", info) == {
            name: [10, {"rig": name, "got": {"n": 1}}] for name in names
        }


async def test_services_sequential_with_rigs_that_answer_at_once(log: logging.Logger) -> None:
    """iblutil registers the wait after the echo and misses a fast rig (its fault 2)."""
    rigs = [_rig(f"rig{i}", "udp") for i in range(3)]
    async with rigs_and_services(rigs, log, timeout=WAIT) as services:
        began = time.monotonic()
        for _ in range(20):
            await services.init(concurrent=False)
        assert time.monotonic() - began < WAIT


async def test_services_mapping(log: logging.Logger) -> None:
    rigs = [_rig("video", "udp"), _rig("ephys", "ws")]
    async with rigs_and_services(rigs, log) as services:
        assert len(services) == 2
        assert services["video"].name == "video"
        assert [rig.name for rig in services.values()] == ["video", "ephys"]
        assert dict(services.items()).keys() == {"video", "ephys"}
        with pytest.raises(TypeError):
            services["other"] = services["video"]
        with pytest.raises(TypeError):
            del services["video"]
        with pytest.raises(TypeError, match="Remote services must be of type"):
            app.Services([object()])
        assert services.timeout == WAIT
        services.close()
        assert not services.is_connected
    assert not app.Services([]).is_connected


async def test_services_callbacks(log: logging.Logger) -> None:
    rigs = [_rig("video", "udp"), _rig("ephys", "ws")]
    async with rigs_and_services(rigs, log) as services:
        plain: list[Any] = []
        with_service: list[Any] = []

        def on_start(data: Any, addr: Any) -> None:
            plain.append(addr)

        def on_start_service(data: Any, addr: Any, service: Any) -> None:
            with_service.append(service.name)

        services.assign_callback("EXPSTART", on_start)
        services.assign_callback("EXPSTART", on_start_service, return_service=True)
        await services.start("2024-01-01_1_m")
        assert sorted(plain) == sorted(rig.local_address for rig in rigs)
        assert sorted(with_service) == ["ephys", "video"]
        assert services.clear_callbacks("EXPSTART", on_start_service) == {"video": 1, "ephys": 1}
        assert services.clear_callbacks("EXPSTART") == {"video": 1, "ephys": 1}


async def test_services_await_all(log: logging.Logger) -> None:
    rigs = [_rig("video", "udp"), _rig("ephys", "ws")]
    async with rigs_and_services(rigs, log, timeout=0.2) as services:
        addrs = {}
        for rig in rigs:
            with rig.endpoint.subscription("status") as hello:
                await services.status(0)  # answered by every rig
                addrs[rig.name] = (await next_message(hello)).addr
        waiting = asyncio.ensure_future(services.await_all("EXPINFO"))
        await asyncio.sleep(0)
        for rig in reversed(rigs):
            await rig.endpoint.confirmed_send([64, 20, rig.name], addrs[rig.name])
        assert await waiting == {"ephys": [20, "ephys"], "video": [20, "video"]}
        assert list(await_order(waiting.result())) == ["ephys", "video"]  # order of arrival
        with pytest.raises(asyncio.TimeoutError) as caught:
            await services.await_all("EXPEND")
        assert str(caught.value).startswith("The following services failed to respond in time: {")
        assert isinstance(caught.value, trio_rignet.ServicesError)
        assert services.clear_callbacks("EXPEND") == {"video": 0, "ephys": 0}


async def test_services_failures(log: logging.Logger) -> None:
    rigs = [
        _rig("video", "udp"),
        _rig("ephys", "ws", fail={trio_rignet.ExpMessage.EXPINIT}),
        _rig("sync", "udp", slow={trio_rignet.ExpMessage.EXPSTART}),
    ]
    async with rigs_and_services(rigs, log, timeout=0.2) as services:
        with pytest.raises(asyncio.TimeoutError) as caught:
            await services.init()
        err = caught.value
        assert str(err).startswith("The following services failed to respond in time: {'ephys'}")
        assert "ValueError: ephys refuses EXPINIT" in str(err)
        assert isinstance(err, trio_rignet.ServicesError)
        assert set(err.responses) == {"video", "sync"}
        assert isinstance(err.failures["ephys"], trio_rignet.RemoteError)
        with pytest.raises(TimeoutError, match=r"failed to respond in time: \{'sync'\}"):
            await services.start("2024-01-01_1_m")
        # Every rig is still open and usable.
        assert services.is_connected
        assert await services.status(30) == {"video": [30], "ephys": [30], "sync": [30]}

    sock = silent_udp()
    silent = await app.EchoProtocol.client(
        f"udp://{LOOPBACK}:{sock.getsockname()[1]}", "silent", log=log
    )
    silent.default_echo_timeout = 0.05
    async with rigs_and_services([_rig("video", "udp")], log) as services:
        both = app.Services([services["video"], silent], timeout=1)
        with pytest.raises(TimeoutError) as caught:
            await both.init()
        assert str(caught.value).startswith(
            f"Failed to receive client response in time (silent: {silent.server_uri})"
        )
        assert caught.value.responses == {"video": [{"rig": "video", "got": None}]}  # type: ignore[attr-defined]
        with pytest.raises(TimeoutError):
            await both.init(concurrent=False)
    silent.close()
    sock.close()


async def test_services_alyx(log: logging.Logger) -> None:
    rigs = [_rig("video", "udp"), _rig("ephys", "ws")]
    tokens: list[Any] = []
    for rig in rigs:

        @rig.handle("alyx")
        def alyx(msg: Message) -> None:
            tokens.append(msg.data)

    async with rigs_and_services(rigs, log) as services:
        assert await services.alyx(Alyx()) is None
        await until(lambda: len(tokens) >= 2)
        assert tokens == [[Alyx.base_url, {Alyx.user: Alyx._token}]] * 2


async def test_main(log: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    async with rignet_server("udp") as peer:
        with peer.subscription("start") as starts:
            await app.main("client", uri_of(peer), name=f"main-{time.monotonic_ns()}")
            assert (await next_message(starts)).data == ["2022-01-01_1_subject", None]
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    server = asyncio.ensure_future(app.main("server", f"ws://{LOOPBACK}:{port}"))
    async with trio_rignet.EchoProtocol.client(f"ws://{LOOPBACK}:{port}", reconnect=True) as rig:
        with anyio.fail_after(WAIT):
            await rig.wait_connected()
        await rig.init()
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server
    with pytest.raises(ValueError, match="Unknown role"):
        await app.main("peer", uri_of(peer))
    assert capsys.readouterr().out.startswith("Starting client\n")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("main-", "ws://")):
            for handler in logging.getLogger(name).handlers:
                handler.close()


# ====================================================== iblrig-style scripts


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblrig_scripts_run_unchanged(scheme: str) -> None:
    """The iblrig-style main PC and camera rig, written for iblutil, with one import changed."""
    camera_rig = load_script("camera_rig", "compat")
    main_pc = load_script("main_pc", "compat")
    kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
    uris = {}
    for name in ("left", "right"):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((LOOPBACK, 0))
            uris[name] = f"{scheme}://{LOOPBACK}:{s.getsockname()[1]}"
    sessions = [camera_rig.CameraSessionNetworked(name) for name in uris]
    runs = [asyncio.ensure_future(session.run(uris[session.name])) for session in sessions]
    await until(lambda: all(session.is_listening for session in sessions))
    exp_ref = "2024-01-01_1_mouse"
    # The main PC runs its own loop in its own thread, as iblrig's does.
    results = await asyncio.to_thread(main_pc.run_experiment, uris, exp_ref, WAIT)
    await asyncio.wait_for(asyncio.gather(*runs), WAIT)  # each camera closes after cleanup

    def info(name: str, status: int) -> dict[str, Any]:
        return {"exp_ref": exp_ref, "status": status, "rig": name}

    assert results["alyx"] is None
    assert results["init"] == {name: [info(name, 10)] for name in uris}
    assert results["status"] == {name: [10] for name in uris}
    assert results["start"] == {name: [exp_ref, info(name, 20)] for name in uris}
    assert results["info"] == {name: [20, info(name, 20)] for name in uris}
    assert results["stop"] == {name: [info(name, 30)] for name in uris}
    assert results["cleanup"] == {name: [info(name, 30)] for name in uris}
    assert len(results["started"]) == 2
    for session in sessions:
        assert session.received == ["alyx", "init", "status", "start", "info", "end", "cleanup"]
        assert session.token == (main_pc.Alyx.base_url, {main_pc.Alyx.user: main_pc.Alyx._token})
        assert not session.is_connected
    for name in ("left", "right", *uris.values()):
        for handler in logging.getLogger(name).handlers:
            handler.close()


def test_public_names_match_iblutil() -> None:
    """Every public name of iblutil 1.20.0's app and base, with the same signature."""
    assert set(base.__all__) >= {
        "LISTEN_PORT",
        "PROTOCOL_VERSION",
        "is_success",
        "external_ip",
        "is_valid_ip",
        "hostname2ip",
        "validate_uri",
        "ExpMessage",
        "ExpStatus",
        "Service",
        "Communicator",
    }
    assert set(app.__all__) == {"EchoProtocol", "Services", "main"}
    signatures = {
        app.EchoProtocol.server: "(server_uri, name=None, log=None, **kwargs)",
        app.EchoProtocol.client: "(server_uri, name=None, log=None, **kwargs)",
        app.EchoProtocol.confirmed_send: "(self, data, addr=None, timeout=None)",
        app.EchoProtocol.send: "(self, data, addr=None)",
        app.EchoProtocol.init: "(self, data=None, addr=None)",
        app.EchoProtocol.start: "(self, exp_ref, data=None, addr=None)",
        app.EchoProtocol.stop: "(self, data=None, immediately=False, addr=None)",
        app.EchoProtocol.cleanup: "(self, data=None, addr=None)",
        app.EchoProtocol.status: "(self, status, addr=None)",
        app.EchoProtocol.info: "(self, status, data=None, addr=None)",
        app.EchoProtocol.alyx: "(self, alyx=None, addr=None)",
        app.EchoProtocol.awaiting_response: "(self, addr=None)",
        app.EchoProtocol.close: "(self)",
        app.EchoProtocol.on_event: "(self, event)",
        app.EchoProtocol.assign_callback: "(self, event, callback)",
        app.EchoProtocol.clear_callbacks: "(self, event, callback=None, cancel_futures=True)",
        app.EchoProtocol.__init__: "(self, server_uri, role, name=None, logger=None)",
        app.Services.__init__: "(self, remote_rigs, timeout=10.0)",
        app.Services.init: "(self, data=None, concurrent=True)",
        app.Services.start: "(self, exp_ref, data=None, concurrent=True)",
        app.Services.stop: "(self, data=None, immediately=False, **kwargs)",
        app.Services.cleanup: "(self, data=None, concurrent=True)",
        app.Services.status: "(self, status, **kwargs)",
        app.Services.info: "(self, status, data=None, **kwargs)",
        app.Services.alyx: "(self, alyx)",
        app.Services.await_all: "(self, event)",
        app.Services.assign_callback: "(self, event, callback, return_service=False)",
        app.Services.clear_callbacks: "(self, event, callback=None)",
        app.Services.close: "(self)",
        app.main: "(role, server_uri, name=None, **kwargs)",
        base.validate_uri: "(uri, resolve_host=True, default_port=11001, default_proc='udp')",
        base.hostname2ip: "(hostname=None)",
        base.is_valid_ip: "(ip_address)",
        base.is_success: "(future)",
        base.ExpMessage.validate: "(event, allow_bitwise=True)",
    }
    for func, expected in signatures.items():
        sig = inspect.signature(func)
        plain = sig.replace(
            parameters=[
                p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()
            ],
            return_annotation=inspect.Signature.empty,
        )
        assert str(plain) == expected, func
    assert app.EchoProtocol.default_echo_timeout == 1.0
    assert inspect.iscoroutinefunction(app.EchoProtocol.confirmed_send)
    assert not inspect.iscoroutinefunction(app.EchoProtocol.send)
    assert not inspect.iscoroutinefunction(app.EchoProtocol.close)
    assert isinstance(app.Services([]), base.Service)
    assert issubclass(app.EchoProtocol, base.Communicator)


def test_json_of_members() -> None:
    """Members serialise as their integers, as iblutil's."""
    assert json.dumps([base.ExpMessage.EXPINFO, base.ExpStatus.RUNNING]) == "[64, 20]"


def await_order(responses: dict[str, Any]) -> list[str]:
    return list(responses)
