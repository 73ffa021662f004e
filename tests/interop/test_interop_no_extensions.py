"""No extension bytes ever reach an iblutil peer (issue 15).

The extension channel (heartbeat pings and pongs, ``[{"rignet": ...}]``, see
``trio_rignet._extensions``) is for trio-rignet peers only. Here iblutil
1.20.0 endpoints record every chunk of bytes their protocol receives
(``record_raw`` in ``ibl_peer.py``: each datagram, or what each TCP read
returned, before iblutil sees it), through a few signal cycles and about a
second of idle time with the heartbeat on, in both directions:

* trio-rignet ``Services`` (heartbeat on, ``trio_rigs=False``, the defaults)
  over iblutil rigs;
* an iblutil main PC signalling a trio-rignet ``RigService``.

Invariant: every message an iblutil peer received is a well-formed iblutil
message, a JSON array whose first element is an int event code of
``ExpMessage`` (trio-rignet's tag is JSON whitespace inside it, allowed), never
an extension message (an array whose first element is an object); and the
iblutil side logged no warning or error.
"""

from __future__ import annotations

import base64
import json
import logging
from collections import defaultdict
from typing import Any

import anyio
import pytest
from interop_support import SIGNALS as ALL_SIGNALS
from interop_support import WAIT, IblPeer, completion, real_warnings

from trio_rignet import ExpMessage, Message, RigService, Services, StreamDecoder

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

SCHEMES = [pytest.param("udp", id="udp"), pytest.param("ws", id="tcp")]
RIGS = ["rig0", "rig1"]
SIGNALS = [s for s in ALL_SIGNALS if s.label in ("init", "start-str", "status", "stop", "cleanup")]
CYCLES = 2
IDLE = 1.0  # seconds of idle time with the heartbeat on: what a ping would need to go out
EVENT_CODES = {int(event) for event in ExpMessage}


def received_messages(peer: IblPeer, scheme: str) -> dict[str, list[bytes]]:
    """Endpoint name -> every message it received, from its ``raw`` records.

    A datagram is one message; a TCP connection's reads are joined and split into
    messages by bracket balance, as trio-rignet frames a stream.
    """
    chunks: dict[tuple[str, tuple[Any, ...]], list[bytes]] = defaultdict(list)
    for record in peer.find(type="raw"):
        chunks[record["ep"], tuple(record["addr"])].append(base64.b64decode(record["data"]))
    messages: dict[str, list[bytes]] = defaultdict(list)
    for (ep, _), data in chunks.items():
        if scheme == "udp":
            messages[ep].extend(data)
        else:
            decoder = StreamDecoder()
            for chunk in data:
                messages[ep].extend(decoder.feed(chunk))
            assert decoder.buffered == 0, f"{ep} received a partial message: {data!r}"
    return messages


def assert_iblutil_messages(messages: list[bytes]) -> None:
    assert messages, "the iblutil peer recorded nothing"
    for raw in messages:
        assert not raw.lstrip().startswith(b"[{"), f"an extension message reached iblutil: {raw!r}"
        value = json.loads(raw)
        assert isinstance(value, list), raw
        assert len(value) > 1, raw  # iblutil warns "Expected list" otherwise
        assert type(value[0]) is int, raw
        assert value[0] in EVENT_CODES, raw
        assert not any(isinstance(item, dict) and "rignet" in item for item in value), raw


def assert_quiet(peer: IblPeer) -> None:
    assert peer.find(type="log") == [], peer.find(type="log")
    assert "Warning" not in peer.stderr, peer.stderr  # warnings.warn (subprocess mode)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_no_extension_bytes_reach_iblutil_rigs(open_ibl: Any, scheme: str) -> None:
    config = {
        "role": "server",
        "scheme": scheme,
        "endpoints": [{"name": name, "answer": True, "record_raw": True} for name in RIGS],
    }
    async with open_ibl(config) as peer:
        async with Services.open(peer.endpoints, timeout=WAIT, heartbeat=0.05) as services:
            for _ in range(CYCLES):
                for signal in SIGNALS:
                    responses = await getattr(services, signal.method)(
                        *signal.args, **signal.kwargs
                    )
                    assert responses == {name: completion(signal, name) for name in RIGS}
                    for name in RIGS:
                        # Its completion was confirmed (keeps the next signal out of the
                        # TCP read in which iblutil expects that echo).
                        answered = await peer.expect(
                            type="answered", ep=name, event=int(signal.event)
                        )
                        assert answered["error"] is None
            await anyio.sleep(IDLE)  # the heartbeat runs meanwhile (every 50 ms)
            for name, state in services.state.items():
                assert not state.trio, name
                assert state.alive is None, name  # never pinged
                assert state.heartbeat_rtt is None, name
            for rig in services.values():
                assert rig.stats.timeouts == 0
        messages = received_messages(peer, scheme)
        assert sorted(messages) == RIGS
        for name in RIGS:
            assert_iblutil_messages(messages[name])
            # Every signal, and the echo of every completion.
            signals = [m for m in messages[name] if m.lstrip(b"[").startswith(b"1,")]
            assert len(signals) == 2 * CYCLES  # init, and the echo of its completion
        assert_quiet(peer)
    assert_quiet(peer)


@pytest.mark.parametrize("scheme", SCHEMES)
async def test_no_extension_bytes_reach_an_iblutil_main_pc(
    open_ibl: Any, scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_rignet")
    peer_box: list[IblPeer] = []
    rig = RigService(f"{scheme}://127.0.0.1:0", name="rig0", lost_after=0.2)

    @rig.handle(ExpMessage.any())
    async def complete(msg: Message) -> Any:
        if scheme == "ws":
            # iblutil's confirmed send fails when the completion arrives in the same
            # read as the echo (its fault 1 over TCP): answer once it has the echo.
            await peer_box[0].expect(type="confirmed", ep="main", event=int(msg.event))
        if msg.event is ExpMessage.EXPSTATUS:
            return msg.data[0]
        return {"rig": "rig0", "got": msg.data[-1]}

    async with anyio.create_task_group() as tg:
        await tg.start(rig.serve)
        config = {
            "role": "client",
            "scheme": scheme,
            "endpoints": [{"name": "main", "target": rig.local_uri, "record_raw": True}],
        }
        async with open_ibl(config) as peer:
            peer_box.append(peer)
            for _ in range(CYCLES):
                for signal in SIGNALS:
                    await peer.call("main", signal.method, *signal.args, **signal.kwargs)
                    got = await peer.expect_recv("main", signal.event)
                    assert got["data"] == completion(signal, "rig0")
            await anyio.sleep(IDLE)
            assert rig.endpoint.peer_statuses() == {}  # no ping from iblutil, none sent to it
            messages = received_messages(peer, scheme)
            assert list(messages) == ["main"]
            assert_iblutil_messages(messages["main"])
            # A completion per signal, and the echo of every signal.
            assert len(messages["main"]) == 2 * CYCLES * len(SIGNALS)
            assert_quiet(peer)
            assert rig.endpoint.stats.timeouts == 0
        assert_quiet(peer)
        tg.cancel_scope.cancel()
    assert not real_warnings(caplog.records)
