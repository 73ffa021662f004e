"""``RigService`` under load (issue 13): blocking plain handlers and a flood of signals.

Real loopback sockets on port 0, both backends, UDP and TCP. Blocking handlers
block on a ``threading.Event`` that the test sets at the end, so nothing here
waits for real time to pass; ``anyio.fail_after(SAFETY)`` is only a safety net
against hangs, never an assertion on durations.
"""

from __future__ import annotations

import asyncio
import json
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest
import sniffio
from tests.helpers import raw_client

from trio_rignet import (
    EchoProtocol,
    ExpMessage,
    ExpStatus,
    Message,
    RigService,
    Services,
)
from trio_rignet._messages import build_init, build_start, build_status
from trio_rignet._tag import Tagger

pytestmark = pytest.mark.anyio

SAFETY = 10  # seconds: a safety net against hangs, never an assertion
LOCALHOST = "127.0.0.1"
EXP_REF = "2024-01-01_1_mouse"

INIT = ExpMessage.EXPINIT
START = ExpMessage.EXPSTART
STATUS = ExpMessage.EXPSTATUS


@pytest.fixture(params=["udp", "ws"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport: UDP, or plain TCP under iblutil's ``ws://`` scheme."""
    return str(request.param)


class Gate:
    """Plain handlers block here (in their worker threads) until :meth:`open`.

    Counts the handlers inside at once, from the threads themselves: ``peak``
    is the most that were ever blocked together, ``entered`` how many entered.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout  # a safety net: never reached in a passing test
        self._lock = threading.Lock()
        self._released = threading.Event()
        self._arrivals = threading.Semaphore(0)
        self.inside = 0
        self.peak = 0
        self.entered = 0
        self.threads: set[int] = set()

    def block(self) -> None:
        with self._lock:
            self.inside += 1
            self.entered += 1
            self.peak = max(self.peak, self.inside)
            self.threads.add(threading.get_ident())
        self._arrivals.release()
        try:
            self._released.wait(self.timeout)
        finally:
            with self._lock:
                self.inside -= 1

    def open(self) -> None:
        self._released.set()

    async def arrivals(self, count: int) -> None:
        """Wait (without blocking the event loop) until ``count`` more handlers entered."""
        for _ in range(count):
            assert await anyio.to_thread.run_sync(self._arrivals.acquire, True, SAFETY)


@contextmanager
def gate(timeout: float = SAFETY) -> Iterator[Gate]:
    """A :class:`Gate` that is always opened at the end, so no worker thread is left blocked."""
    g = Gate(timeout)
    try:
        yield g
    finally:
        g.open()


# --------------------------------------------------------------------- issue 13: blocking


async def test_blocked_plain_handler_stalls_neither_echoes_nor_other_rigs(scheme: str) -> None:
    """A plain handler blocking its worker thread (a camera program starting, say):

    * the blocked rig still echoes every further signal, and completes signals whose
      handlers do not block (a second START, which blocks too, is echoed as well);
    * the other rig's signals complete meanwhile;
    * once the handlers return, the first START completes for both rigs, as one
      Services signal.
    """
    with gate() as g:

        def blocking_start(msg: Message) -> str:
            g.block()
            return f"started {msg.data[0]}"

        cam = RigService(
            f"{scheme}://{LOCALHOST}:0",
            name="cam",
            handlers={START: blocking_start, INIT: lambda msg: "cam ready"},
        )
        other = RigService(
            f"{scheme}://{LOCALHOST}:0",
            name="other",
            handlers={ExpMessage.any(): lambda msg: f"other {msg.event.name}"},
        )
        outcome: dict[str, Any] = {}
        with anyio.fail_after(SAFETY):
            async with cam, other:
                uris = {"cam": cam.local_uri, "other": other.local_uri}
                async with (
                    Services.open(uris, echo_timeout=5, timeout=SAFETY) as services,
                    anyio.create_task_group() as tg,
                ):

                    async def start_all() -> None:
                        outcome["start"] = await services.start(EXP_REF)

                    tg.start_soon(start_all)
                    await g.arrivals(1)  # cam's START handler is blocked in its thread

                    # The other rig is served meanwhile, signal after signal.
                    others = services.without("cam")
                    for i in range(5):
                        assert await others.init(i) == {"other": ["other EXPINIT"]}
                    assert await others.status(ExpStatus.RUNNING) == {"other": ["other EXPSTATUS"]}

                    # The blocked rig echoes every signal and completes those that do not block.
                    cam_ep = services["cam"]
                    for _ in range(20):
                        await cam_ep.confirmed_send(build_status(ExpStatus.RUNNING))
                    done = await cam_ep.call(build_init("again"), timeout=SAFETY)
                    assert done.data == ["cam ready"]
                    # A second START to the same rig: echoed at once, its handler blocks too.
                    await cam_ep.confirmed_send(build_start("2024-01-01_2_mouse"))
                    await g.arrivals(1)
                    assert g.inside == 2
                    assert cam.running_handlers == 2
                    assert "start" not in outcome  # cam has not completed its first START

                    g.open()
        assert outcome["start"] == {
            "cam": [EXP_REF, f"started {EXP_REF}"],
            "other": [EXP_REF, "other EXPSTART"],
        }
        assert g.entered == 2
        assert threading.get_ident() not in g.threads  # never on the event loop's thread


# ------------------------------------------------------------------------ issue 13: flood

FLOOD = 20_000


@contextmanager
def asyncio_debug_off() -> Iterator[None]:
    """asyncio's debug mode (on under ``PYTHONDEVMODE``, as in ``nox``) off for a block.

    It records a traceback for every callback it schedules: the 60,000 datagrams of
    the flood then took seven times as long on asyncio. Nothing here tests what
    debug mode checks (the other asyncio tests keep it on).
    """
    if sniffio.current_async_library() != "asyncio":
        yield
        return
    loop = asyncio.get_running_loop()
    debug = loop.get_debug()
    loop.set_debug(False)
    try:
        yield
    finally:
        loop.set_debug(debug)


FLOOD_SAFETY = 300  # seconds: 20,000 round trips under tracemalloc, on 2 busy cores
WINDOW = {"udp": 64, "ws": 256}  # signals in flight at once (far below a UDP socket buffer)


@asynccontextmanager
async def admitted_tasks(rig: RigService) -> AsyncIterator[dict[str, int]]:
    """Count the rig's handler tasks (running, peak, total) with a spy on ``RigService._handle``."""
    counts = {"running": 0, "peak": 0, "total": 0}
    original = rig._handle

    async def spy(endpoint: EchoProtocol, msg: Message) -> None:
        counts["running"] += 1
        counts["total"] += 1
        counts["peak"] = max(counts["peak"], counts["running"])
        try:
            await original(endpoint, msg)
        finally:
            counts["running"] -= 1

    rig._handle = spy  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        del rig._handle


async def test_flood_beyond_max_handlers(scheme: str) -> None:
    """20,000 signals from one neighbour at a rig whose plain handlers all block.

    The neighbour is a raw socket (so that the test measures the rig, not a second
    endpoint) sending tagged INIT signals, as a trio-rignet peer does. It keeps at
    most ``WINDOW`` signals in flight: it sends a window, then reads until every
    signal of it is echoed and every busy one reported. So no socket buffer can
    overflow on loopback (UDP) and the rig's outbox never fills (TCP), and the
    counts below are exact on both transports. Invariants:

    * handler tasks never exceed ``max_handlers`` (default 64), nor do handlers
      blocked in worker threads; exactly the first 64 signals are admitted;
    * every signal is echoed, and every signal beyond the cap is answered with an
      error report naming the busy rig and the signal's event: the neighbour
      counts exactly ``FLOOD - 64`` reports, and nothing else;
    * memory traced by tracemalloc grows by less than 50 MiB over the flood;
    * once the handlers return, the 64 admitted signals complete and the rig
      answers a normal signal.
    """
    rig = RigService(f"{scheme}://{LOCALHOST}:0", name="cam", echo_timeout=SAFETY)
    assert rig.max_handlers == 64
    cap = rig.max_handlers
    tagger = Tagger(0x5EED5EED)
    with gate(FLOOD_SAFETY) as g:

        def blocking(msg: Message) -> str:
            g.block()
            return f"done {msg.data[0]}"

        rig.handle(INIT)(blocking)
        rig.handle(STATUS)(lambda msg: "status ok")
        with anyio.fail_after(FLOOD_SAFETY), asyncio_debug_off():
            async with rig, admitted_tasks(rig) as tasks, raw_client(rig.endpoint) as neighbour:
                echoes = reports = 0
                other: list[bytes] = []
                peak_running = 0
                tracemalloc.start()
                try:
                    before, _ = tracemalloc.get_traced_memory()
                    tracemalloc.reset_peak()
                    for first in range(0, FLOOD, WINDOW[scheme]):
                        window = [
                            tagger.tag(b"[1, %d]" % i, seq=i + 1)
                            for i in range(first, min(first + WINDOW[scheme], FLOOD))
                        ]
                        if scheme == "udp":
                            for signal in window:
                                await neighbour.send(signal)
                        else:
                            await neighbour.send(b"".join(window))
                        sent = first + len(window)
                        expected = set(window)
                        while expected or reports < sent - cap:
                            raw = await neighbour.recv()
                            if raw in expected:
                                expected.discard(raw)
                                echoes += 1
                            elif raw.startswith(b"[0, "):
                                reports += 1
                                text, event = json.loads(raw)[1:]
                                assert event == int(INIT)
                                assert text.startswith("RuntimeError: rig cam busy")
                            else:
                                other.append(raw)  # pragma: no cover - a failure below
                        peak_running = max(peak_running, rig.running_handlers)
                    _, peak = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                growth = peak - before
                assert growth < 50 * 2**20, f"{growth / 2**20:.1f} MiB"
                assert other == []
                assert echoes == FLOOD
                assert reports == FLOOD - cap
                assert tasks["total"] == cap
                assert tasks["peak"] <= cap
                assert peak_running <= cap
                assert g.peak <= cap
                assert g.entered <= cap
                assert rig.endpoint.stats.echoed == FLOOD

                # The admitted ones complete once their handlers return: the first 64 sent.
                g.open()
                done = []
                while len(done) < cap:
                    raw = await neighbour.recv()
                    msg = json.loads(raw)
                    assert msg[0] == int(INIT), raw
                    done.append(msg[1])
                    await neighbour.send(raw)  # the echo the rig waits for
                assert sorted(done) == sorted(f"done {i}" for i in range(cap))
                assert g.entered == cap
                assert g.peak <= cap

        # And the rig answers a normal signal, from a real endpoint.
        with anyio.fail_after(SAFETY):
            async with rig, EchoProtocol.client(rig.local_uri, echo_timeout=SAFETY) as main:
                reply = await main.call(build_status(ExpStatus.RUNNING), timeout=SAFETY)
                assert reply.data == ["status ok"]
