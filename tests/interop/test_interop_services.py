"""Services across the two libraries.

* trio-rignet ``Services`` over 4 iblutil rigs that answer at once (each echoes a
  signal, then immediately sends the same event back with its own communicator
  method), over UDP and TCP, concurrent and sequential. iblutil's own
  ``Services`` fails here over TCP (its fault 1) and in sequential mode (its
  fault 2); trio-rignet must not.
* iblutil's ``Services`` over 4 trio-rignet ``RigService`` rigs, concurrent.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
from interop_support import (
    DATA,
    LOOPBACK,
    SIGNALS,
    WAIT,
    FakeAlyx,
    IblPeer,
    Signal,
    completion,
    real_warnings,
)

from trio_rignet import (
    ExpMessage,
    Message,
    RemoteError,
    RigService,
    Services,
    ServicesError,
)

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SCHEMES = [pytest.param("udp", id="udp"), pytest.param("ws", id="tcp")]
RIGS = [f"rig{i}" for i in range(4)]
RIG_ALYX = FakeAlyx(user="rig-opérateur", _token="rig-token-✓")


def _rigs_config(scheme: str, **options: Any) -> dict[str, Any]:
    return {
        "role": "server",
        "scheme": scheme,
        "endpoints": [{"name": name, "answer": True, **options} for name in RIGS],
    }


async def _rignet_services_call(
    services: Services, signal: Signal, concurrent: bool
) -> dict[str, Any]:
    return await getattr(services, signal.method)(
        *signal.args, concurrent=concurrent, **signal.kwargs
    )


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_rignet_services_over_iblutil_rigs(
    open_ibl: Any, scheme: str, concurrent: bool
) -> None:
    async with (
        open_ibl(_rigs_config(scheme)) as peer,
        Services.open(peer.endpoints, timeout=WAIT) as services,
    ):
        assert list(services) == RIGS
        for signal in SIGNALS:
            responses = await _rignet_services_call(services, signal, concurrent)
            assert responses == {name: completion(signal, name) for name in RIGS}, signal.label
            for name in RIGS:
                # The rig's completion update was itself confirmed by trio-rignet's echo.
                # Waiting for it also keeps the next signal out of the read in which
                # iblutil expects that echo (its fault 1 over TCP).
                answered = await peer.expect(type="answered", ep=name, event=int(signal.event))
                assert answered["error"] is None
                assert (await peer.expect_recv(name, signal.event))["data"] == signal.data

        alyx = FakeAlyx()
        await services.alyx(alyx)
        for name in RIGS:
            token = await peer.expect_recv(name, ExpMessage.ALYX)
            assert token["data"] == [alyx.base_url, {alyx.user: alyx._token}]

        for rig in services.values():
            assert rig.stats.timeouts == 0
            assert rig.stats.dropped == 0


@pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])
@pytest.mark.parametrize("scheme", SCHEMES)
async def test_rignet_services_report_an_iblutil_rig_error(
    open_ibl: Any, scheme: str, concurrent: bool
) -> None:
    config = _rigs_config(scheme)
    config["endpoints"][2]["raise_on"] = [1]  # rig2's init callback raises
    async with (
        open_ibl(config) as peer,
        Services.open(peer.endpoints, timeout=WAIT) as services,
    ):
        with pytest.raises(ServicesError) as caught:
            await services.init(DATA, concurrent=concurrent)
        err = caught.value
        assert err.event == ExpMessage.EXPINIT
        assert list(err.failures) == ["rig2"]
        failure = err.failures["rig2"]
        assert isinstance(failure, RemoteError)
        assert failure.text == "ValueError: rig2 refuses EXPINIT: caméra non prête ✗"
        assert err.responses == {
            name: completion(SIGNALS[0], name) for name in RIGS if name != "rig2"
        }
        # Every rig is still usable afterwards (iblutil rigs answer the status).
        for name in RIGS:
            if name != "rig2":
                await peer.expect(type="answered", ep=name, event=1)
        responses = await services.status(20, concurrent=concurrent)
        assert responses == {name: [20] for name in RIGS}


def _rignet_rig(
    name: str, scheme: str, peer_box: list[IblPeer], tokens: list[Any], all_tokens: anyio.Event
) -> RigService:
    rig = RigService(f"{scheme}://{LOOPBACK}:0", name=name)

    async def complete(msg: Message) -> Any:
        if scheme == "ws":
            # iblutil's confirmed send fails when the completion arrives in the
            # same read as the echo (its fault 1 over TCP): answer once it has
            # the echo. Over UDP the rig answers at once.
            await peer_box[0].expect(type="confirmed", ep=name, event=int(msg.event))
        return {"rig": name, "got": msg.data[-1]}

    for event in ("init", "start", "stop", "interrupt", "cleanup", "info"):
        rig.handle(event)(complete)

    @rig.handle("status")
    async def status(msg: Message) -> Any:
        if scheme == "ws":
            await peer_box[0].expect(type="confirmed", ep=name, event=32)
        return msg.data[0]

    @rig.handle("alyx")
    async def alyx(msg: Message) -> Any:
        _, token = msg.data
        if token:
            if scheme == "ws":
                # Consume the confirmation of this push, so that the wait below
                # (for a request) does not take it for the request's.
                await peer_box[0].expect(type="confirmed", ep=name, event=128)
            tokens.append((name, msg.data))  # a token from the main PC: no completion
            if len(tokens) == len(RIGS):
                all_tokens.set()
            return None
        # A request for a token: the completion carries ours.
        if scheme == "ws":
            await peer_box[0].expect(type="confirmed", ep=name, event=128)
        return RIG_ALYX.base_url, {RIG_ALYX.user: RIG_ALYX._token}

    return rig


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_iblutil_services_over_rignet_rigs(
    open_ibl: Any, scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_rignet")
    peer_box: list[IblPeer] = []
    tokens: list[Any] = []
    all_tokens = anyio.Event()
    rigs = [_rignet_rig(name, scheme, peer_box, tokens, all_tokens) for name in RIGS]
    async with anyio.create_task_group() as tg:
        for rig in rigs:
            await tg.start(rig.serve)
        config = {
            "role": "client",
            "scheme": scheme,
            "endpoints": [{"name": rig.name, "target": rig.local_uri} for rig in rigs],
            "services": True,
            "services_timeout": WAIT,
        }
        async with open_ibl(config) as peer:
            peer_box.append(peer)
            for signal in SIGNALS:
                responses = await peer.call(
                    "services", signal.method, *signal.args, **signal.kwargs, timeout=2 * WAIT
                )
                assert responses == {name: completion(signal, name) for name in RIGS}, signal.label

            alyx = FakeAlyx()
            await peer.call("services", "alyx", alyx.as_command())  # confirmed by every rig
            with anyio.fail_after(WAIT):
                await all_tokens.wait()  # the handlers run after the echoes went out
            assert sorted(tokens) == [
                (name, [alyx.base_url, {alyx.user: alyx._token}]) for name in RIGS
            ]
            # An iblutil endpoint requesting a token gets the rig's answer.
            token = await peer.call("rig1", "alyx")
            assert token == [RIG_ALYX.base_url, {RIG_ALYX.user: RIG_ALYX._token}]
            assert not peer.find(type="log", level="ERROR")
            for rig in rigs:
                # iblutil echoed every completion update (the last one may be in flight).
                assert rig.endpoint.stats.confirmed >= len(SIGNALS)
                assert rig.endpoint.stats.timeouts == 0
                assert rig.endpoint.stats.dropped == 0
            assert not real_warnings(caplog.records)
        tg.cancel_scope.cancel()
