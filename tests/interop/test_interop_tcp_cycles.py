"""100 consecutive experiments over TCP, with rigs that answer every signal at once.

iblutil reads a TCP stream without framing: each read is taken for one message.
A rig answering at once is in ``confirmed_send`` (waiting for the echo of its
completion update) when the main PC's next signal goes out; if the echo and the
signal reach it in one read, it raises ``RuntimeError: Unexpected response`` and
closes the connection. trio-rignet paces what it writes to a peer that does not
run trio-rignet (the endpoint option ``pace``), so each message is read alone.

Each test runs CYCLES cycles of init, start, stop and cleanup with four rigs and
no pause of its own between signals, and counts the cycles that failed:

* trio-rignet's ``Services`` driving four iblutil 1.20.0 rigs;
* trio-rignet's ``Services`` driving four trio-rignet ``RigService`` rigs
  (they recognise each other: no pacing);
* iblutil's own main-PC code (its ``Services`` over ``EchoProtocol.client``)
  driving four trio-rignet rigs, which pace their completion updates.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import pytest
from interop_support import LOOPBACK, WAIT, IblCallError, real_warnings

from trio_rignet import Message, RigService, Services, ServicesError

pytestmark = [pytest.mark.interop, pytest.mark.anyio]

CYCLES = 100
RIGS = [f"rig{i}" for i in range(4)]
EXP_REF = "2024-01-01_1_mouse"
STEPS: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("init", ({"subject": "mouse"},)),
    ("start", (EXP_REF, {"n": 1})),
    ("stop", ({"n": 2},)),
    ("cleanup", ({"n": 3},)),
)


def _expected(method: str, args: tuple[Any, ...], rig: str) -> list[Any]:
    """The completion data of a rig that answers ``{"rig": name, "got": <data>}``."""
    got = {"rig": rig, "got": args[-1]}
    return [args[0], got] if method == "start" else [got]


def _report(name: str, failures: list[str], seconds: float) -> str:
    text = f"{name}: {CYCLES} cycles, {len(failures)} failed, {seconds:.1f} s"
    print(text)
    return text + "".join(f"\n  {f}" for f in failures[:10])


async def _cycles(run_step: Any) -> list[str]:
    """Run CYCLES cycles; return a line per failed cycle (stop after 5)."""
    failures: list[str] = []
    for cycle in range(CYCLES):
        for method, args in STEPS:
            try:
                await run_step(method, args)
            except (ServicesError, IblCallError, AssertionError) as exc:
                failures.append(f"cycle {cycle} {method}: {exc}")
                break
        if len(failures) >= 5:
            break
    return failures


async def test_rignet_services_over_iblutil_rigs(open_ibl: Any) -> None:
    config = {
        "role": "server",
        "scheme": "ws",
        "endpoints": [{"name": name, "answer": True} for name in RIGS],
    }
    async with open_ibl(config) as peer, Services.open(peer.endpoints, timeout=WAIT) as services:

        async def step(method: str, args: tuple[Any, ...]) -> None:
            responses = await getattr(services, method)(*args)
            assert responses == {name: _expected(method, args, name) for name in RIGS}

        began = time.monotonic()
        failures = await _cycles(step)
        report = _report("iblutil rigs", failures, time.monotonic() - began)
        assert not failures, report
        # Every completion update went through on the iblutil side (its own
        # confirmed send got the echo), and nothing was logged as unexpected.
        with anyio.fail_after(WAIT):
            # (records arrive in a list; polling it is simplest)
            while len(peer.find(type="answered")) < CYCLES * len(STEPS) * len(RIGS):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert [r for r in peer.find(type="answered") if r["error"]] == []
        assert peer.find(type="log") == []
        for rig in services.values():
            assert rig.stats.timeouts == 0
            assert rig.stats.dropped == 0
            assert not rig.is_trio_peer()  # paced all along


def _rignet_rigs() -> list[RigService]:
    rigs = []
    for name in RIGS:
        rig = RigService(f"ws://{LOOPBACK}:0", name=name)

        def complete(msg: Message, name: str = name) -> Any:
            return {"rig": name, "got": msg.data[-1]}

        for event in ("init", "start", "stop", "cleanup"):
            # A plain function runs in a worker thread; answer from the loop instead.
            async def handler(msg: Message, complete: Any = complete) -> Any:
                return complete(msg)

            rig.handle(event)(handler)
        rigs.append(rig)
    return rigs


async def test_rignet_services_over_rignet_rigs() -> None:
    rigs = _rignet_rigs()
    async with anyio.create_task_group() as tg:
        for rig in rigs:
            await tg.start(rig.serve)
        uris = {rig.name: rig.local_uri for rig in rigs}
        async with Services.open(uris, timeout=WAIT) as services:

            async def step(method: str, args: tuple[Any, ...]) -> None:
                responses = await getattr(services, method)(*args)
                assert responses == {name: _expected(method, args, name) for name in RIGS}

            began = time.monotonic()
            failures = await _cycles(step)
            report = _report("trio-rignet rigs", failures, time.monotonic() - began)
            assert not failures, report
            for rig in services.values():
                assert rig.stats.timeouts == 0
                assert rig.is_trio_peer()  # no pacing between trio-rignet endpoints
        tg.cancel_scope.cancel()


async def test_iblutil_services_over_rignet_rigs(
    open_ibl: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="trio_rignet")
    rigs = _rignet_rigs()
    async with anyio.create_task_group() as tg:
        for rig in rigs:
            await tg.start(rig.serve)
        config = {
            "role": "client",
            "scheme": "ws",
            "endpoints": [{"name": rig.name, "target": rig.local_uri} for rig in rigs],
            "services": True,
            "services_timeout": WAIT,
        }
        async with open_ibl(config) as peer:

            async def step(method: str, args: tuple[Any, ...]) -> None:
                responses = await peer.call("services", method, *args, timeout=2 * WAIT)
                # The JSON round trip of the command turns tuples into lists.
                assert responses == {name: _expected(method, args, name) for name in RIGS}

            began = time.monotonic()
            failures = await _cycles(step)
            report = _report("iblutil main PC", failures, time.monotonic() - began)
            assert not failures, report
            assert peer.find(type="log") == []
            for rig in rigs:
                assert rig.endpoint.stats.timeouts == 0
                assert rig.endpoint.stats.dropped == 0
            assert not real_warnings(caplog.records)
        tg.cancel_scope.cancel()
