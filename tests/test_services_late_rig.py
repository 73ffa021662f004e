"""``Services`` and a rig that is down when it opens (issue 13), over UDP and TCP.

A rig's port is reserved by binding port 0 and closing the socket; the rig is
started on it later (nothing else on loopback takes it meanwhile). Waits are on
events and calls; ``anyio.fail_after(SAFETY)`` is only a safety net.
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from tests.helpers import LOCALHOST, free_port

from trio_rignet import (
    ExpMessage,
    Message,
    PeerUnavailable,
    RigService,
    Services,
    ServicesError,
)

pytestmark = pytest.mark.anyio

SAFETY = 10  # seconds: a safety net against hangs, never an assertion
LONG = 30  # a timeout a passing test never reaches
INIT = ExpMessage.EXPINIT
STATUS = ExpMessage.EXPSTATUS


@pytest.fixture(params=["udp", "ws"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport: UDP, or plain TCP under iblutil's ``ws://`` scheme."""
    return str(request.param)


def new_rig(uri: str, name: str) -> RigService:
    def answer(msg: Message) -> Any:
        return f"{name} {msg.event.name}"

    return RigService(uri, name=name, handlers={ExpMessage.any(): answer}, echo_timeout=LONG)


def reserve_port(scheme: str) -> int:
    return free_port(socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM)


async def test_rig_down_at_open_answers_once_it_comes_up(scheme: str) -> None:
    """With ``reconnect=True`` (the default), a rig down at open fails every signal for
    itself alone (PeerUnavailable; the other rig's completion is in ``responses``) and
    its state says so; once it starts on its port, a later signal of the same Services
    reaches it, without reopening anything."""
    port = reserve_port(scheme)
    late_uri = f"{scheme}://{LOCALHOST}:{port}"
    up = new_rig(f"{scheme}://{LOCALHOST}:0", "up")
    late = new_rig(late_uri, "late")
    with anyio.fail_after(SAFETY):
        async with up:
            uris = {"up": up.local_uri, "late": late_uri}
            async with Services.open(uris, echo_timeout=LONG, timeout=LONG) as services:
                assert list(services) == ["up", "late"]
                for i in range(3):  # every signal, not just the first
                    with pytest.raises(ServicesError) as info:
                        await services.init(i)
                    err = info.value
                    assert err.event is INIT
                    assert list(err.failures) == ["late"]
                    exc = err.failures["late"]
                    assert isinstance(exc, PeerUnavailable)
                    assert exc.peer == (LOCALHOST, port)
                    assert err.responses == {"up": ["up EXPINIT"]}
                    state = services.state
                    assert state["late"].last_error is exc
                    assert state["up"].last_error is None
                    # UDP has no connection: only the failure shows the rig is unreachable.
                    assert state["late"].connected is (scheme == "udp")
                    assert state["up"].connected
                    assert services.is_connected is (scheme == "udp")

                async with late:
                    # TCP: the endpoint reconnects in the background (backoff at most 2 s).
                    await services["late"].wait_connected()
                    assert await services.init("now") == {
                        "up": ["up EXPINIT"],
                        "late": ["late EXPINIT"],
                    }
                    state = services.state
                    assert state["late"].last_error is None
                    assert state["late"].connected
                    assert state["late"].trio  # it answered, tagged
                    assert services.is_connected
                    assert await services.status("RUNNING") == {
                        "up": ["up EXPSTATUS"],
                        "late": ["late EXPSTATUS"],
                    }


async def test_open_with_wait_names_the_rig_that_is_down(scheme: str) -> None:
    """``Services.open(..., wait=T)`` with a TCP rig down raises one ServicesError (not an
    exception group) naming only that rig; the rig that is up (UDP or TCP) is in
    ``responses``, and the body never runs."""
    down_port = reserve_port("ws")
    up = new_rig(f"{scheme}://{LOCALHOST}:0", "up")
    body_ran = False
    with anyio.fail_after(SAFETY):
        async with up:
            uris = {"up": up.local_uri, "down": f"ws://{LOCALHOST}:{down_port}"}
            with pytest.raises(ServicesError) as info:
                async with Services.open(uris, wait=0.3):
                    body_ran = True  # pragma: no cover
    assert not body_ran
    err = info.value
    assert type(err) is ServicesError  # itself, not an exception group wrapping it
    assert err.event is None
    assert list(err.failures) == ["down"]
    exc = err.failures["down"]
    assert isinstance(exc, PeerUnavailable)
    assert exc.peer == (LOCALHOST, down_port)
    assert list(err.responses) == ["up"]
    assert str(err).startswith("opening failed on 1 of 2 rigs: down: ")
