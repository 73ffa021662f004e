"""Between trio-rignet peers: liveness, clock offsets and call correlation (issue 15).

- A rig process killed is reported ``lost`` within the configured bound; started
  again on the same address, it is ``back`` (``restarted``) and the next signal
  succeeds, without restarting the main PC.
- A rig clock with an injected offset and drift is recovered within 2 ms (the
  benchmark reports the real accuracy).
- A late completion of a cancelled call never answers the next call.
- Heartbeats go only to rigs that run trio-rignet (tests/interop checks that an
  iblutil rig never receives one).
"""

from __future__ import annotations

import decimal
import enum
import fractions
import json
import math
import random
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_rignet import (
    Change,
    ClockEstimate,
    EchoProtocol,
    RigService,
    Services,
    ServicesError,
)
from trio_rignet._extensions import (
    ClockEstimator,
    PeerEntry,
    build_ping,
    build_pong,
    parse_extension,
)

pytestmark = pytest.mark.anyio

SAFETY = 20  # seconds: a safety net against hangs, never an assertion


@contextmanager
def serve(uri: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A ``rignet serve`` process and the URI it listens on."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_rignet", "serve", uri, "--name", "video", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield proc, next(word for word in line.split() if "://" in word)
    finally:
        proc.kill()
        proc.wait(SAFETY)
        if proc.stdout is not None:
            proc.stdout.close()


async def next_change(changes: object, kind: str) -> Change:
    """The next change of ``kind`` (others are skipped)."""
    async for change in changes:  # type: ignore[attr-defined]
        if change.kind == kind:
            return change  # type: ignore[no-any-return]
    raise AssertionError("the changes ended")


@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_killed_rig_is_lost_then_back_and_answers(scheme: str) -> None:
    lost_after = 0.5
    with serve(f"{scheme}://127.0.0.1:0") as (proc, uri):
        async with (
            Services.open(
                {"video": uri}, heartbeat=0.05, lost_after=lost_after, trio_rigs=True, timeout=5
            ) as services,
            services.watch() as changes,
        ):
            with anyio.fail_after(SAFETY):
                await next_change(changes, "up")
                assert (await services.init())["video"] == [{"rig": "video", "done": "init"}]
                proc.kill()
                killed = anyio.current_time()
                lost = await next_change(changes, "lost")
            # Detected within lost_after plus one heartbeat interval (and scheduling).
            assert lost.at - killed <= lost_after + 0.05 + 0.5
            assert services.state["video"].alive is False
            with pytest.raises(ServicesError):
                await services.init()
            with serve(uri):
                with anyio.fail_after(SAFETY):
                    back = await next_change(changes, "back")
                assert back.restarted
                assert services.state["video"].alive is True
                assert (await services.start("2024-01-01_1_mouse"))["video"][0] == (
                    "2024-01-01_1_mouse"
                )


async def test_injected_offset_and_drift_are_recovered() -> None:
    """A rig clock running 3.2 ms ahead and 200 ppm fast: offset within 2 ms, drift close."""
    offset, drift = 0.0032, 200e-6
    t0 = time.time()

    def rig_clock() -> float:
        now = time.time()
        return now + offset + drift * (now - t0)

    rig = RigService("udp://127.0.0.1:0", name="video", clock=rig_clock)
    async with anyio.create_task_group() as tg:
        await tg.start(rig.serve)
        async with Services.open(
            {"video": rig.local_uri}, heartbeat=0.01, trio_rigs=True
        ) as services:
            with anyio.fail_after(SAFETY):
                while True:
                    await anyio.sleep(0.2)
                    clock = services.state["video"].clock
                    if clock is not None and clock.samples >= 150:
                        break
            now = time.time()
            truth = offset + drift * (now - t0)
            assert abs(clock.offset_at(now) - truth) < 0.002
            assert abs(clock.drift - drift) < 1e-3
            assert clock.uncertainty < 0.002
            # The conversions are each other's inverse and agree with the truth.
            rig_time = rig_clock()
            assert abs(clock.to_ours(rig_time) - time.time()) < 0.002
            # (Round trip through floats of ~1.7e9 s: a few ulps, 2.4e-7 s each.)
            assert abs(clock.to_peer(clock.to_ours(rig_time)) - rig_time) < 1e-6
        tg.cancel_scope.cancel()


def test_estimator_uses_the_shortest_round_trips() -> None:
    """Queueing delays make single exchanges wrong; the estimator keeps the least delayed."""
    rng = random.Random(5)
    est = ClockEstimator(window=8)
    true_offset = 0.010
    for i in range(400):
        t1 = i * 0.1
        up = 0.0001 + rng.expovariate(1 / 0.002)  # queueing: up to several ms one way
        down = 0.0001 + rng.expovariate(1 / 0.002)
        t2 = t1 + up + true_offset
        t3 = t2 + 0.00005
        t4 = t3 - true_offset + down
        est.add(t1, t2, t3, t4)
    estimate = est.estimate()
    assert isinstance(estimate, ClockEstimate)
    assert abs(estimate.offset - true_offset) < 0.0005  # single samples are off by ms
    assert abs(estimate.drift) < 1e-4
    assert estimate.samples == 400


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.floats(-0.001, 0.02),  # round trip, sometimes nonsense (negative)
            st.floats(-0.05, 0.05),  # offset of this exchange
            st.floats(0.0, 0.3),  # time since the previous exchange
        ),
        min_size=1,
        max_size=150,
    )
)
def test_the_reported_clock_is_always_a_fresh_estimate(
    exchanges: list[tuple[float, float, float]],
) -> None:
    """Invariant: after every pong the status holds exactly what estimate() gives now.

    The entry redoes the fit only when an exchange changed its inputs (a new best of
    its window, or a window closed): this shows that skipping the others loses nothing.
    """
    entry = PeerEntry()
    entry.clock = ClockEstimator(window=3, keep=10)  # small: windows close and fall out
    t = 1000.0
    for rtt, offset, gap in exchanges:
        t += gap
        t1 = t
        entry.pinged(t1)
        t2 = t1 + rtt / 2 + offset
        t3 = t2 + 0.00001
        t4 = t1 + rtt + 0.00001
        assert entry.answered({"t1": t1, "t2": t2, "t3": t3}, t4)
        assert entry.status.clock == entry.clock.estimate()


async def test_a_late_completion_of_a_cancelled_call_does_not_answer_the_next() -> None:
    """Between trio-rignet peers a completion names its call: a late one is ignored.

    Observed before: 1 to 6 times in 200 random cancellations, a late completion
    answered the next call of the same event.
    """
    rng = random.Random(11)
    count = 0

    rig = RigService("udp://127.0.0.1:0", name="video")

    @rig.handle("init")
    async def init(msg: object) -> int:
        nonlocal count
        count += 1
        mine = count
        await anyio.sleep(rng.uniform(0, 0.01))
        return mine

    async with anyio.create_task_group() as tg:
        await tg.start(rig.serve)
        async with EchoProtocol.client(rig.local_uri, echo_timeout=5) as main:
            with anyio.fail_after(SAFETY * 3):
                for _ in range(100):
                    with anyio.move_on_after(rng.uniform(0, 0.01)):
                        await main.call([1, None], timeout=5)  # often cancelled
                    before = count
                    msg = await main.call([1, None], timeout=5)
                    # The answer to this call, never the late answer of the one before.
                    assert msg.data[0] > before
        tg.cancel_scope.cancel()


async def test_iblutil_like_rig_gets_no_heartbeat() -> None:
    """A rig that never sent a tagged message (as an iblutil rig) is never pinged."""
    got: list[bytes] = []
    async with EchoProtocol.server("udp://127.0.0.1:0") as fake:
        # A plain echoing peer that answers untagged, like iblutil: use a raw socket.
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
            raw.bind(("127.0.0.1", 0))
            raw.setblocking(False)
            uri = f"udp://127.0.0.1:{raw.getsockname()[1]}"
            async with Services.open({"rig": uri}, heartbeat=0.01) as services:
                await anyio.sleep(0.3)
                assert services.state["rig"].alive is None
            while True:
                try:
                    got.append(raw.recv(65536))
                except BlockingIOError:
                    break
    assert fake.stats.received == 0
    assert got == []  # not a single byte: no heartbeat toward a rig not known to run trio-rignet


# ----------------------------------------------------------- extension messages

_clock_readings = st.one_of(
    st.floats(min_value=-1e12, max_value=1e12, exclude_min=True, exclude_max=True),
    st.integers(min_value=-(10**12) + 1, max_value=10**12 - 1),
)


@given(_clock_readings, _clock_readings, _clock_readings)
def test_pings_and_pongs_are_what_json_writes(t1: float, t2: float, t3: float) -> None:
    assert build_ping(t1) == json.dumps([{"rignet": "ping", "t": t1}]).encode()
    pong = build_pong(t1, t2, t3)
    assert pong == json.dumps([{"rignet": "pong", "t1": t1, "t2": t2, "t3": t3}]).encode()
    assert parse_extension(pong) == {"rignet": "pong", "t1": t1, "t2": t2, "t3": t3}
    assert parse_extension(build_ping(t1)) == {"rignet": "ping", "t": t1}


def _reference_parse(body: bytes) -> dict[str, Any] | None:
    """parse_extension as it was written first (json.loads of the bytes)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if type(obj) is not list or len(obj) != 1 or type(obj[0]) is not dict:
        return None
    ext: dict[str, Any] = obj[0]
    kind = ext.get("rignet")
    number = (int, float)
    if kind == "ping" and type(ext.get("t")) in number and -1e12 < ext["t"] < 1e12:
        return ext
    if kind == "pong" and all(
        type(ext.get(k)) in number and -1e12 < ext[k] < 1e12 for k in ("t1", "t2", "t3")
    ):
        return ext
    return None


_json_values = st.recursive(
    st.none() | st.booleans() | _clock_readings | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["rignet", "t", "t1", "t2", "t3", "x"]), inner, max_size=5
        )
    ),
    max_leaves=12,
)
_extension_like = st.builds(
    lambda kind, fields: [{"rignet": kind, **fields}],
    st.sampled_from(["ping", "pong", "other"]),
    st.dictionaries(st.sampled_from(["t", "t1", "t2", "t3"]), _clock_readings | _json_values),
)


@given(
    st.one_of(
        st.binary(max_size=64),
        _json_values.map(lambda v: json.dumps(v).encode()),
        _extension_like.map(lambda v: json.dumps(v).encode()),
        _extension_like.map(lambda v: json.dumps(v, indent=1).encode()),
    )
)
def test_parse_extension_is_the_reference_parse_for_utf8(body: bytes) -> None:
    """The same verdict as json.loads would give, for every UTF-8 body (every body a
    trio-rignet peer sends); other encodings, which no peer sends, are dropped."""
    got = parse_extension(body)
    try:
        body.decode()
    except UnicodeDecodeError:
        assert got is None
        return
    expected = _reference_parse(body)
    if expected is None or not body.startswith(b"\xef\xbb\xbf"):  # BOM: json.loads only
        assert got == expected


class _ReferenceEstimator:
    """ClockEstimator as first written: every estimate refits all the samples."""

    def __init__(self, window: int, keep: int) -> None:
        self.window, self.samples, self.count = window, 0, 0
        self.best: tuple[float, float, float] | None = None
        self.kept: deque[tuple[float, float, float]] = deque(maxlen=keep)

    def add(self, t1: float, t2: float, t3: float, t4: float) -> None:
        delay = (t4 - t1) - (t3 - t2)
        if not delay >= 0:
            return
        self.samples += 1
        self.count += 1
        if self.best is None or delay < self.best[0]:
            self.best = (delay, (t1 + t4) / 2, ((t2 - t1) + (t3 - t4)) / 2)
        if self.count >= self.window or not self.kept:
            self.kept.append(self.best)
            self.best, self.count = None, 0

    def estimate(self) -> tuple[float, float, float, float, int] | None:
        kept = list(self.kept) + ([] if self.best is None else [self.best])
        if not kept:
            return None
        delay, at, measured = min(kept[-4:])
        low, high = measured - delay / 2, measured + delay / 2
        offset, drift = measured, 0.0
        if len(kept) >= 8:
            weights = [1.0 / max(d, 1e-5) ** 2 for d, _, _ in kept]
            total = sum(weights)
            mean_t = sum(w * t for w, (_, t, _) in zip(weights, kept, strict=True)) / total
            mean_o = sum(w * o for w, (_, _, o) in zip(weights, kept, strict=True)) / total
            stt = sum(w * (t - mean_t) ** 2 for w, (_, t, _) in zip(weights, kept, strict=True))
            sto = sum(
                w * (t - mean_t) * (o - mean_o) for w, (_, t, o) in zip(weights, kept, strict=True)
            )
            drift = sto / stt if stt > 0 else 0.0
            offset = min(max(mean_o + drift * (at - mean_t), low), high)
        return offset, max(offset - low, high - offset), drift, at, self.samples


@settings(max_examples=300)
@given(
    st.floats(0, 2e9),  # our clock's reading at the first exchange (monotonic or wall)
    st.floats(-1e3, 1e3),  # the peer clock's offset
    st.floats(-1e-3, 1e-3),  # and its drift
    st.lists(
        st.tuples(
            st.floats(0.01, 5.0),  # time since the previous exchange
            st.floats(1e-6, 0.05),  # round trip
            st.floats(0.0, 1.0),  # share of it on the way out
        ),
        min_size=1,
        max_size=120,
    ),
)
def test_the_clock_fit_is_the_full_refit(
    start: float, offset: float, drift: float, exchanges: list[tuple[float, float, float]]
) -> None:
    """The estimator keeps its sums over closed windows between fits; after every
    exchange its estimate is the full refit's, to rounding."""
    est, ref = ClockEstimator(window=3, keep=12), _ReferenceEstimator(window=3, keep=12)
    t = start
    for gap, rtt, out in exchanges:
        t += gap
        t2 = t + rtt * out + offset + drift * (t - start)
        t3 = t2 + 1e-6
        t4 = t + rtt + 1e-6
        est.add(t, t2, t3, t4)
        ref.add(t, t2, t3, t4)
        got, want = est.estimate(), ref.estimate()
        assert got is not None
        assert want is not None
        assert (got.at, got.samples) == want[3:]
        # Both round the differences of times near `t` (up to 2e9 s) to a few ulps;
        # the drift divides them by the spread of the fitted times.
        times = [sample[1] for sample in [*ref.kept, *([ref.best] if ref.best else [])]]
        ulps = 8 * math.ulp(max(abs(x) for x in times)) * (1 + abs(want[2]))
        drift_tol = 1e-9 * abs(want[2]) + ulps / max(max(times) - min(times), ulps)
        assert abs(got.drift - want[2]) <= drift_tol
        offset_tol = drift_tol * (max(times) - min(times)) + 1e-9 * (1 + abs(want[0]))
        assert abs(got.offset - want[0]) <= offset_tol
        assert abs(got.uncertainty - want[1]) <= offset_tol


class _Reading(float):
    """A clock reading of a float subclass whose repr is not JSON (as numpy's float64)."""

    def __repr__(self) -> str:
        return f"_Reading({float(self)!r})"


class _Tick(enum.IntEnum):
    FIVE = 5


def test_clock_readings_of_other_number_types_go_out_as_json_numbers() -> None:
    """A user clock may return numpy scalars or the like: they are written as the
    float or int json.dumps wrote (or, where it raised, as their float)."""
    for value, written in [
        (_Reading(1700000000.25), 1700000000.25),
        (_Tick.FIVE, 5),
        (fractions.Fraction(3, 2), 1.5),
        (decimal.Decimal("2.5"), 2.5),
    ]:
        assert build_ping(value) == json.dumps([{"rignet": "ping", "t": written}]).encode()  # type: ignore[arg-type]
        pong = build_pong(value, value, value)  # type: ignore[arg-type]
        assert parse_extension(pong) == {
            "rignet": "pong",
            "t1": written,
            "t2": written,
            "t3": written,
        }
    for junk in (None, True, "1.5"):
        assert parse_extension(build_ping(junk)) is None  # type: ignore[arg-type]


@given(
    st.sampled_from([0.0, 12345.678, 1.7e9]),  # our clock, stalled there
    st.lists(st.floats(0.0, 0.01), min_size=72, max_size=200),  # the peer's answers (9+ windows)
)
def test_a_stalled_clock_fits_no_drift(ours: float, answers: list[float]) -> None:
    """All exchanges at one time of ours: no slope to fit (dividing rounding errors
    made drifts of 1e8 s/s up)."""
    est = ClockEstimator()
    for answer in answers:
        theirs = ours + 0.5 + answer
        est.add(ours, theirs, theirs, ours)
        estimate = est.estimate()
        assert estimate is not None
        assert estimate.drift == 0.0
        assert 0.5 - 1e-9 <= estimate.offset <= 0.51 + 1e-9
