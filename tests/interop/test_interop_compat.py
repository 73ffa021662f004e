"""``trio_rignet.compat.iblutil`` against the real iblutil 1.20.0.

The compat API is asyncio's, so every test runs on the asyncio backend, with
iblutil in the same loop (``open_ibl``'s in-loop mode) or, for the iblrig-style
main PC, in a thread with its own loop. Each test is the same code on both
sides of the wire: iblutil's API, once running on iblutil and once on
trio-rignet.

* every signal both ways, the compat communicator as client and as server,
  over UDP and TCP;
* error reports both ways;
* the compat ``Services`` over four iblutil rigs answering at once, and
  iblutil's ``Services`` over four compat rigs answering at once;
* the iblrig-style scripts of ``tests/compat_scripts`` across the libraries;
* ``base``: the same results as iblutil's for the same inputs.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import socket
import time
from typing import Any

import anyio
import pytest
from interop_support import (
    DATA,
    LOOPBACK,
    SIGNALS,
    WAIT,
    FakeAlyx,
    completion,
)
from tests.compat_scripts import load_script

import trio_rignet
from trio_rignet.compat.iblutil import app, base

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SCHEMES = [pytest.param("udp", id="udp"), pytest.param("ws", id="tcp")]
RIGS = [f"rig{i}" for i in range(4)]
CYCLES = 20


@pytest.fixture
def anyio_backend() -> object:
    """asyncio only: iblutil's API (and so the compat one) is asyncio's."""
    from tests.conftest import proactor_loop

    return ("asyncio", {"loop_factory": proactor_loop})


@pytest.fixture
def log(request: pytest.FixtureRequest) -> logging.Logger:
    logger = logging.getLogger(f"compat.{request.node.name}")
    logger.setLevel(logging.INFO)
    return logger


async def _call(com: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    return await getattr(com, method)(*args, **kwargs)


def _free_port(scheme: str) -> int:
    kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _completion_of(com: app.EchoProtocol, code: int, data: list[Any], addr: Any) -> Any:
    """The completion a rig answering at once sends (as the iblutil rigs of ibl_peer.py)."""
    name = com.name
    target = addr if com.role == "server" else None
    E = base.ExpMessage
    if code == E.EXPINIT:
        return com.init({"rig": name, "got": data[0]}, addr=target)
    if code == E.EXPSTART:
        return com.start(data[0], {"rig": name, "got": data[1]}, addr=target)
    if code in (E.EXPEND, E.EXPINTERRUPT):
        return com.stop({"rig": name, "got": data[0]}, code == E.EXPINTERRUPT, addr=target)
    if code == E.EXPCLEANUP:
        return com.cleanup({"rig": name, "got": data[0]}, addr=target)
    if code == E.EXPSTATUS:
        return com.status(data[0], addr=target)
    return com.info(data[0], {"rig": name, "got": data[1]}, addr=target)


def _answer_at_once(com: app.EchoProtocol, tasks: set[asyncio.Future[Any]]) -> None:
    """Make ``com`` a rig that answers every signal at once, from its callback (iblutil style)."""

    def answer(data: Any, addr: Any, event: Any) -> None:
        if event == base.ExpMessage.ALYX:
            return
        task = asyncio.ensure_future(_completion_of(com, int(event), data, addr))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    signals = base.ExpMessage.any() & ~base.ExpMessage.ALYX
    com.assign_callback(signals, answer)


# ----------------------------------------------------------- both roles


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_compat_client_and_iblutil_server(
    open_ibl: Any, scheme: str, log: logging.Logger
) -> None:
    config = {"role": "server", "scheme": scheme, "endpoints": [{"name": "ibl", "answer": True}]}
    async with open_ibl(config) as peer:
        com = await app.EchoProtocol.client(peer.endpoints["ibl"], name="main", log=log)
        try:
            for signal in SIGNALS:
                waiter = asyncio.ensure_future(com.on_event(int(signal.event)))
                await asyncio.sleep(0)
                assert await _call(com, signal.method, *signal.args, **signal.kwargs) is None
                recv = await peer.expect_recv("ibl", signal.event)
                assert recv["data"] == signal.data, signal.label
                data, addr = await asyncio.wait_for(waiter, WAIT)
                assert data == completion(signal, "ibl"), signal.label
                assert addr == (com.hostname, com.port)
                answered = await peer.expect(type="answered", ep="ibl", event=int(signal.event))
                assert answered["error"] is None  # iblutil got compat's echo of its completion
            alyx = FakeAlyx()
            await com.alyx(alyx)
            token = await peer.expect_recv("ibl", 128)
            assert token["data"] == [alyx.base_url, {alyx.user: alyx._token}]
            # iblutil signals compat (its server names compat's address).
            compat_addr = recv["addr"]
            for signal in SIGNALS:
                waiter = asyncio.ensure_future(com.on_event(int(signal.event)))
                await asyncio.sleep(0)
                await peer.call(
                    "ibl", signal.method, *signal.args, addr=compat_addr, **signal.kwargs
                )
                data, _ = await asyncio.wait_for(waiter, WAIT)
                assert data == signal.data, signal.label
            assert not peer.find(type="log")
        finally:
            com.close()
            await com._wait_closed()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblutil_client_and_compat_server(
    open_ibl: Any, scheme: str, log: logging.Logger
) -> None:
    com = await app.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", name="rig", log=log)
    tasks: set[asyncio.Future[Any]] = set()
    received: list[Any] = []
    com.assign_callback(base.ExpMessage.any(), lambda data, addr, event: received.append(event))
    _answer_at_once(com, tasks)
    config = {
        "role": "client",
        "scheme": scheme,
        "endpoints": [{"name": "ibl", "target": com.server_uri}],
    }
    try:
        async with open_ibl(config) as peer:
            for signal in SIGNALS:
                await peer.call("ibl", signal.method, *signal.args, **signal.kwargs)
                recv = await peer.expect_recv("ibl", signal.event)  # compat's completion
                assert recv["data"] == completion(signal, "rig"), signal.label
            alyx = FakeAlyx()
            await peer.call("ibl", "alyx", alyx.as_command())
            assert [int(e) for e in received] == [int(s.event) for s in SIGNALS] + [128]
            # A token request from iblutil, answered by compat's server.
            com.assign_callback(
                "ALYX",
                lambda data, addr: (
                    asyncio.ensure_future(com.alyx(alyx, addr=addr)) if not data[1] else None
                ),
            )
            token = await peer.call("ibl", "alyx")
            assert token == [alyx.base_url, {alyx.user: alyx._token}]
            await asyncio.gather(*tasks)
            assert not peer.find(type="log")
    finally:
        com.close()
        await com._wait_closed()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_error_reports_both_ways(
    open_ibl: Any, scheme: str, log: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    config = {"role": "server", "scheme": scheme, "endpoints": [{"name": "ibl", "raise_on": [2]}]}
    async with open_ibl(config) as peer:
        com = await app.EchoProtocol.client(peer.endpoints["ibl"], name="main", log=log)
        try:
            reports = asyncio.ensure_future(com.on_event(0))
            await asyncio.sleep(0)
            await com.start("2024-01-01_1_m")
            data, _ = await asyncio.wait_for(reports, WAIT)
            assert data == ["ValueError: ibl refuses EXPSTART: caméra non prête ✗", 2]
            assert (
                f"Callback for EXPSTART on {scheme}://{com.hostname}:{com.port} failed with "
                "ValueError: ibl refuses EXPSTART: caméra non prête ✗"
            ) in [r.getMessage() for r in caplog.records if r.name == log.name]

            def refuse(data: Any, addr: Any) -> None:
                raise RuntimeError("pas de souris")

            com.assign_callback("EXPSTATUS", refuse)
            addr = (await peer.expect_recv("ibl", 2))["addr"]
            await peer.call("ibl", "status", 20, addr=addr)
            report = await peer.expect_recv("ibl", 0)
            assert report["data"] == ["RuntimeError: pas de souris", 32]
        finally:
            com.close()
            await com._wait_closed()


# ------------------------------------------------------------- Services


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_compat_services_over_iblutil_rigs(
    open_ibl: Any, scheme: str, log: logging.Logger
) -> None:
    config = {
        "role": "server",
        "scheme": scheme,
        "endpoints": [{"name": name, "answer": True} for name in RIGS],
    }
    async with open_ibl(config) as peer:
        rigs = [
            await app.EchoProtocol.client(uri, name, log=log)
            for name, uri in peer.endpoints.items()
        ]
        services = app.Services(rigs, timeout=WAIT)
        try:
            for signal in SIGNALS:
                responses = await _call(services, signal.method, *signal.args, **signal.kwargs)
                assert responses == {name: completion(signal, name) for name in RIGS}
            began = time.monotonic()
            for cycle in range(CYCLES):
                assert await services.init(DATA) == {
                    name: [{"rig": name, "got": DATA}] for name in RIGS
                }, cycle
                ref = f"2024-01-01_{cycle}_m"
                assert (await services.start(ref))["rig0"] == [ref, {"rig": "rig0", "got": None}]
                assert len(await services.stop(concurrent=False)) == len(RIGS)
                assert len(await services.cleanup()) == len(RIGS)
            print(
                f"compat Services, 4 iblutil rigs, {scheme}: {CYCLES} cycles in "
                f"{time.monotonic() - began:.1f} s"
            )
            await services.alyx(FakeAlyx())
            for name in RIGS:
                assert (await peer.expect_recv(name, 128))["data"][1] == {
                    FakeAlyx.user: FakeAlyx._token
                }
            assert [r for r in peer.find(type="answered") if r["error"]] == []
            assert peer.find(type="log") == []
        finally:
            services.close()
            for rig in rigs:
                await rig._wait_closed()


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblutil_services_over_compat_rigs(
    open_ibl: Any, scheme: str, log: logging.Logger
) -> None:
    tasks: set[asyncio.Future[Any]] = set()
    rigs = [
        await app.EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", name, log=log) for name in RIGS
    ]
    for rig in rigs:
        _answer_at_once(rig, tasks)
    config = {
        "role": "client",
        "scheme": scheme,
        "endpoints": [{"name": rig.name, "target": rig.server_uri} for rig in rigs],
        "services": True,
        "services_timeout": WAIT,
    }
    try:
        async with open_ibl(config) as peer:
            for signal in SIGNALS:
                responses = await peer.call(
                    "services", signal.method, *signal.args, **signal.kwargs, timeout=2 * WAIT
                )
                assert responses == {name: completion(signal, name) for name in RIGS}
            began = time.monotonic()
            for cycle in range(CYCLES):
                for method, args in (
                    ("init", [DATA]),
                    ("start", ["2024-01-01_1_m"]),
                    ("stop", []),
                    ("cleanup", []),
                ):
                    responses = await peer.call("services", method, *args, timeout=2 * WAIT)
                    assert sorted(responses) == RIGS, (cycle, method)
            print(
                f"iblutil Services, 4 compat rigs, {scheme}: {CYCLES} cycles in "
                f"{time.monotonic() - began:.1f} s"
            )
            await asyncio.gather(*tasks)
            assert peer.find(type="log") == []
    finally:
        for rig in rigs:
            rig.close()
            await rig._wait_closed()


# ------------------------------------------------------ iblrig-style scripts


@pytest.mark.parametrize(
    ("main_pc_on", "camera_rig_on", "scheme"),
    [
        pytest.param("iblutil", "iblutil", "udp", id="iblutil-iblutil-udp"),
        pytest.param("iblutil", "compat", "udp", id="iblutil-main-compat-rigs-udp"),
        pytest.param("iblutil", "compat", "ws", id="iblutil-main-compat-rigs-tcp"),
        pytest.param("compat", "iblutil", "udp", id="compat-main-iblutil-rigs-udp"),
        pytest.param("compat", "iblutil", "ws", id="compat-main-iblutil-rigs-tcp"),
    ],
)
async def test_iblrig_scripts_across_libraries(
    main_pc_on: str, camera_rig_on: str, scheme: str
) -> None:
    """The same iblrig-style scripts, each on either library (only their import line differs).

    (iblutil driving iblutil over TCP is left out: it fails by iblutil's fault 1.)
    """
    camera_rig = load_script("camera_rig", camera_rig_on)
    main_pc = load_script("main_pc", main_pc_on)
    uris = {name: f"{scheme}://{LOOPBACK}:{_free_port(scheme)}" for name in ("left", "right")}
    sessions = [camera_rig.CameraSessionNetworked(name) for name in uris]
    runs = [asyncio.ensure_future(s.run(uris[s.name])) for s in sessions]
    try:
        with anyio.fail_after(WAIT):
            while not all(s.is_listening for s in sessions):  # noqa: ASYNC110
                await asyncio.sleep(0.001)
        exp_ref = "2024-01-01_1_mouse"
        results = await asyncio.to_thread(main_pc.run_experiment, uris, exp_ref, WAIT)
        await asyncio.wait_for(asyncio.gather(*runs), WAIT)
    finally:
        for session in sessions:
            session.close()
            com = session.communicator
            if com is not None and com.Server is not None:
                com.Server.close()  # iblutil's close() leaves its TCP listener open
                await com.Server.wait_closed()
        await asyncio.gather(*runs, return_exceptions=True)
        await asyncio.sleep(0.01)  # let the transports close
        gc.collect()  # and report any socket left open here, not in a later test
        for name in ("left", "right", *uris.values()):
            for handler in logging.getLogger(name).handlers:
                handler.close()
    for name in ("init", "status", "start", "info", "stop", "cleanup"):
        assert not isinstance(results[name], BaseException), (name, results[name])
        assert sorted(results[name]) == ["left", "right"], name
    assert results["start"]["left"] == [exp_ref, {"exp_ref": exp_ref, "status": 20, "rig": "left"}]
    for session in sessions:
        assert session.received == ["alyx", "init", "status", "start", "info", "end", "cleanup"]


# ------------------------------------------------------------------ base


def test_base_agrees_with_iblutil() -> None:
    from iblutil.io.net import app as ibl_app
    from iblutil.io.net import base as ibl_base

    for uri in (
        "127.0.0.1",
        "127.0.0.1:9000",
        "ws://127.0.0.1",
        "tcp://10.0.0.2:1",
        "udp://192.168.1.236:9998",
        ipaddress.ip_address("10.1.2.3"),
        "localhost",
        "localhost:8000",
    ):
        assert base.validate_uri(uri) == ibl_base.validate_uri(uri), uri
    assert base.validate_uri("rig-1", resolve_host=False) == ibl_base.validate_uri(
        "rig-1", resolve_host=False
    )
    assert base.validate_uri("10.0.0.2", default_port=9998, default_proc="ws") == (
        ibl_base.validate_uri("10.0.0.2", default_port=9998, default_proc="ws")
    )
    for bad, why in (("127.0.0.1:70000", "Invalid port"), ("Rig_1", "Invalid hostname")):
        for validate in (base.validate_uri, ibl_base.validate_uri):
            with pytest.raises(ValueError, match=why):
                validate(bad, resolve_host=False)
    for validate in (base.validate_uri, ibl_base.validate_uri):
        with pytest.raises(TypeError):
            validate(11001)
    # The documented difference: port 0 binds any free port.
    with pytest.raises(ValueError, match="Invalid port"):
        ibl_base.validate_uri("127.0.0.1:0")
    assert base.validate_uri("127.0.0.1:0") == "udp://127.0.0.1:0"

    assert base.ExpMessage.__version__ == ibl_base.ExpMessage.__version__
    assert base.ExpStatus.__version__ == ibl_base.ExpStatus.__version__
    for event in ("expinit", " EXPEND ", "ALYX", 1, 3, 10, 255, 256, True, base.ExpMessage.EXPINFO):
        for bitwise in (True, False):
            mine = _outcome(base.ExpMessage.validate, event, bitwise)
            theirs = _outcome(ibl_base.ExpMessage.validate, event, bitwise)
            assert mine == theirs, (event, bitwise)
    for bad in ("start", "STOP", 1.5, None):
        mine = _outcome(base.ExpMessage.validate, bad, True)
        assert mine == _outcome(ibl_base.ExpMessage.validate, bad, True), bad
    assert int(base.ExpMessage.any()) == int(ibl_base.ExpMessage.any())
    assert list(base.ExpMessage.any()) == list(ibl_base.ExpMessage.any())
    assert [(m.name, int(m)) for m in base.ExpStatus] == [
        (m.name, int(m)) for m in ibl_base.ExpStatus
    ]

    # The same message bytes for the same calls.
    for signal in SIGNALS:
        if signal.method == "stop" and signal.kwargs:
            mine_msg = base.Service.stop(None, *signal.args, **signal.kwargs)  # type: ignore[arg-type]
            theirs_msg = ibl_base.Service.stop(None, *signal.args, **signal.kwargs)
        else:
            mine_msg = getattr(base.Service, signal.method)(None, *signal.args)
            theirs_msg = getattr(ibl_base.Service, signal.method)(None, *signal.args)
        assert app.EchoProtocol.encode(mine_msg) == ibl_app.EchoProtocol.encode(theirs_msg)
    alyx = FakeAlyx()
    assert app.EchoProtocol.encode(base.Service.alyx(None, alyx)) == ibl_app.EchoProtocol.encode(  # type: ignore[arg-type]
        ibl_base.Service.alyx(None, alyx)
    )
    assert trio_rignet.ExpMessage.EXPINIT == ibl_base.ExpMessage.EXPINIT


def _outcome(validate: Any, event: Any, bitwise: bool) -> Any:
    try:
        result = validate(event, allow_bitwise=bitwise)
    except (TypeError, ValueError) as exc:
        return type(exc).__name__, str(exc)
    return int(result), result.name
