"""The extension channel between trio-rignet peers: heartbeats and clock offsets.

Only trio-rignet endpoints speak it, and a message of it is only ever sent to
a peer known to run trio-rignet: one whose own messages carried a trio-rignet
tag (every message a trio-rignet endpoint originates does), or one the user
declared (``Services.open(..., trio_rigs=...)``). An iblutil 1.20.0 peer is
never sent any. Its messages are JSON arrays holding one object, tagged like
every trio-rignet message::

    [{"rignet": "ping", "t": 1700000000.123456}]
    [{"rignet": "pong", "t1": ..., "t2": ..., "t3": ...}]   (tag ref: the ping)

A trio-rignet endpoint recognises them by their tag and shape, answers a ping
with a pong, never echoes or dispatches them. (Were one to reach an iblutil
peer, it would echo it and warn "Expected list"; the echo is recognised and
dropped.) The tag's session and sequence numbers already reject a replayed
message within the receiver's window; a flag bit of the tag is reserved for a
MAC with a per-lab key, to authenticate this channel later.

A ping/pong exchange timestamps four instants, two on each side's clock:
``t1`` ping sent and ``t4`` pong received (ours), ``t2`` ping received and
``t3`` pong sent (the peer's). NTP's arithmetic gives the peer's clock offset
``((t2 - t1) + (t3 - t4)) / 2`` with an error of at most half the round trip
``(t4 - t1) - (t3 - t2)``. :class:`ClockEstimator` keeps the shortest round
trip of each window of exchanges (queueing only ever adds delay) and fits
offset and drift through them. No I/O here.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from ._messages import loads

__all__ = [
    "ClockEstimate",
    "ClockEstimator",
    "PeerEntry",
    "PeerStatus",
    "PeerTable",
    "build_ping",
    "build_pong",
    "parse_extension",
]


def build_ping(t1: float) -> bytes:
    """A ping carrying the sender's clock ``t1``."""
    # What json.dumps writes, without its encoder (a main PC pings every rig
    # several times a second): the repr of an int or a finite float is JSON; a
    # non-finite reading makes a message the peer drops as malformed.
    return b'[{"rignet": "ping", "t": %a}]' % (_plain(t1),)


def build_pong(t1: float, t2: float, t3: float) -> bytes:
    """The answer to a ping sent at ``t1`` (its sender's clock), received at ``t2`` and
    answered at ``t3`` (ours)."""
    return b'[{"rignet": "pong", "t1": %a, "t2": %a, "t3": %a}]' % (
        _plain(t1),
        _plain(t2),
        _plain(t3),
    )


def _plain(value: Any) -> Any:
    """``value`` as a plain int or float, whose repr json.dumps would write.

    A clock may return a subclass (numpy's ``float64``, an ``IntEnum``) whose
    repr is not JSON; json.dumps wrote those as their float or int.
    """
    kind = type(value)
    if kind is float or kind is int or kind is bool:  # (a bool is no clock reading:
        return value  # json.dumps wrote true, the peer dropped it; so does True)
    if isinstance(value, int):
        return int(value)
    if hasattr(kind, "__float__"):  # float subclasses, Decimal, Fraction, numpy scalars
        return float(value)
    return value  # not a number: its repr is a message the peer drops


_TIME_LIMIT = 1e12
"""Largest clock reading accepted, seconds (31,700 years): any real clock's
readings are far below it, and offsets computed from them stay finite."""


def _number(value: Any) -> bool:
    # A comparison, not math.isfinite: an int too large for a float (a 400-digit
    # integer in a datagram) made isfinite raise OverflowError. NaN fails it too.
    return type(value) in (int, float) and -_TIME_LIMIT < value < _TIME_LIMIT


def parse_extension(body: bytes) -> dict[str, Any] | None:
    """The object of an extension message, or None if it is not a well-formed one."""
    try:
        obj = loads(body.decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if type(obj) is not list or len(obj) != 1:
        return None
    ext = obj[0]
    if type(ext) is not dict:
        return None
    kind = ext.get("rignet")
    if kind == "ping":
        return ext if _number(ext.get("t")) else None
    if (
        kind == "pong"
        and _number(ext.get("t1"))
        and _number(ext.get("t2"))
        and _number(ext.get("t3"))
    ):
        return ext
    return None


@dataclass(frozen=True)
class ClockEstimate:
    """A peer's clock against ours: ``peer_time = our_time + offset`` at ``at``.

    Attributes:
        offset: seconds to add to our clock to get the peer's, at ``at``.
        uncertainty: bound on the offset's error at ``at``, seconds: the
            true offset lies within half the round trip of the exchange the
            estimate rests on (NTP's bound, for symmetric paths), and the
            reported offset (a fitted line, kept inside that interval) is at
            most this far from either end of it: half the round trip when the
            line passes through the exchange, up to the whole round trip.
        drift: how fast the offset changes, seconds per second (0 until two
            windows of exchanges have been seen).
        at: our clock time the estimate is for.
        samples: exchanges seen.
    """

    offset: float
    uncertainty: float
    drift: float
    at: float
    samples: int

    def offset_at(self, our_time: float) -> float:
        """The offset at ``our_time`` (extrapolated with the drift)."""
        return self.offset + self.drift * (our_time - self.at)

    def to_ours(self, peer_time: float) -> float:
        """A timestamp of the peer's clock in ours (a rig's frame time in main-PC time)."""
        # peer = ours + offset + drift * (ours - at)  =>  solve for ours
        return self.at + (peer_time - self.offset - self.at) / (1.0 + self.drift)

    def to_peer(self, our_time: float) -> float:
        """A timestamp of our clock, in the peer's clock."""
        return our_time + self.offset_at(our_time)


class ClockEstimator:
    """NTP-style offset and drift of a peer's clock, from ping/pong exchanges.

    Args:
        window: exchanges per window; the one with the shortest round trip is kept.
        keep: kept samples used for the fit (the most recent).
    """

    __slots__ = ("_best", "_count", "_kept", "_sums", "keep", "samples", "window")

    def __init__(self, window: int = 8, keep: int = 64) -> None:
        self.window = window
        self.keep = keep
        self.samples = 0
        self._count = 0
        self._best: tuple[float, float, float] | None = None  # (delay, mid time, offset)
        self._kept: deque[tuple[float, float, float]] = deque(maxlen=keep)
        # The fit's sums over the kept windows (see _fit), done again only when
        # a window is kept: None until then.
        self._sums: tuple[float, float, float, float, float, float, float] | None = None

    def add(self, t1: float, t2: float, t3: float, t4: float) -> bool:
        """One exchange: ``t1``/``t4`` on our clock, ``t2``/``t3`` on the peer's.

        Returns True if :meth:`estimate` may have changed other than in its
        ``samples`` count: the exchange beat its window's best so far, or
        closed a window. Most exchanges do neither, and the fit need not be
        redone for them.
        """
        delay = (t4 - t1) - (t3 - t2)
        if not delay >= 0:  # clocks stepped, or nonsense: no information
            return False
        self.samples += 1
        self._count += 1
        best = self._best
        changed = best is None or delay < best[0]
        if best is None or changed:
            best = self._best = (delay, (t1 + t4) / 2, ((t2 - t1) + (t3 - t4)) / 2)
        if self._count >= self.window or not self._kept:
            # The kept window is the best it had, which the estimate already
            # used as ``_best``; it changes the estimate only through the list
            # of windows (which the fit reads).
            self._kept.append(best)
            self._sums = None
            self._best = None
            self._count = 0
            changed = True
        return changed

    def estimate(self) -> ClockEstimate | None:
        """The current estimate (None before the first exchange).

        The offset is that of the shortest recent round trip; once several
        windows have been kept, a least-squares line through them gives the
        drift (weighted by each window's round trip: see ``_fit``), and
        the offset at that sample's time is read off the line,
        clamped to the interval the sample allows.
        """
        kept = list(self._kept)
        best = self._best
        latest = kept[-4:] if best is None else [*kept[-3:], best]
        if not latest:
            return None
        delay, at, measured = min(latest)  # the best of the latest windows
        # NTP's bound: at ``at`` the true offset lies within half the round trip
        # of the measured one (whatever the queueing, if the paths are symmetric).
        low, high = measured - delay / 2, measured + delay / 2
        offset, drift = measured, 0.0
        if len(kept) + (best is not None) >= 8:
            drift, mean_t, mean_o = self._fit(kept, best)
            # The fitted line smooths the noise; kept within the bound.
            offset = min(max(mean_o + drift * (at - mean_t), low), high)
        # The farthest the true offset can be from the one reported.
        return ClockEstimate(offset, max(offset - low, high - offset), drift, at, self.samples)

    def _fit(
        self, kept: list[tuple[float, float, float]], best: tuple[float, float, float] | None
    ) -> tuple[float, float, float]:
        """Weighted least-squares line through the ``(delay, time, offset)`` samples
        ``kept`` and ``best`` (if any).

        Returns ``(slope, mean time, mean offset)``, the line passing through the
        weighted means. Each sample weighs ``1 / delay**2``: the error bound of a
        sample grows with its round trip, so a burst of delayed exchanges (a loaded
        rig) cannot tilt the drift the way equal weights let it.

        The sums over ``kept`` (two passes: the means, then the sums of squares
        about them) are kept until a window is added; ``best``, which changes
        between, is added to them by moving the means (sums of squares about
        the new means: no cancellation).
        """
        sums = self._sums
        if sums is None:
            weights = [1.0 / max(delay, 1e-5) ** 2 for delay, _, _ in kept]
            total = sum(weights)
            mean_t = sum(w * t for w, (_, t, _) in zip(weights, kept, strict=True)) / total
            mean_o = sum(w * o for w, (_, _, o) in zip(weights, kept, strict=True)) / total
            stt = sto = 0.0
            for w, (_, t, o) in zip(weights, kept, strict=True):
                dt = t - mean_t
                stt += w * dt * dt
                sto += w * dt * (o - mean_o)
            times = [t for _, t, _ in kept]
            sums = self._sums = (total, mean_t, mean_o, stt, sto, min(times), max(times))
        total, mean_t, mean_o, stt, sto, first, last = sums
        if best is not None:
            first, last = min(first, best[1]), max(last, best[1])
            wb = 1.0 / max(best[0], 1e-5) ** 2
            new_total = total + wb
            new_t = mean_t + wb * (best[1] - mean_t) / new_total
            new_o = mean_o + wb * (best[2] - mean_o) / new_total
            dt, bt = mean_t - new_t, best[1] - new_t
            stt += total * dt * dt + wb * bt * bt
            sto += total * dt * (mean_o - new_o) + wb * bt * (best[2] - new_o)
            mean_t, mean_o = new_t, new_o
        # Times all equal but for rounding (our clock stalled, or too coarse):
        # no slope to fit, and dividing rounding errors would make one up.
        if stt <= 0 or last - first <= _SAME_TIME_ULPS * math.ulp(max(-first, last)):
            return 0.0, mean_t, mean_o
        return sto / stt, mean_t, mean_o


_SAME_TIME_ULPS = 64


@dataclass
class PeerStatus:
    """What an endpoint knows of one trio-rignet peer from the extension channel.

    Attributes:
        session: the session number of its latest message (a new one means it
            restarted).
        last_heard: when it last answered a ping or pinged us, on the event
            loop's clock (``anyio.current_time()``); None if never.
        rtt: round trip of its latest pong, seconds (None before one).
        clock: its clock offset against ours (None before a pong).
    """

    session: int | None = None
    last_heard: float | None = None
    rtt: float | None = None
    clock: ClockEstimate | None = None


class PeerEntry:
    """One peer of the extension channel: its status, its clock, our pings in flight."""

    __slots__ = ("clock", "pings", "status")

    def __init__(self) -> None:
        self.status = PeerStatus()
        self.clock = ClockEstimator()
        self.pings: deque[float] = deque(maxlen=16)  # t1 of our latest pings

    def pinged(self, t1: float) -> None:
        self.pings.append(t1)

    def answered(self, ext: dict[str, Any], t4: float) -> bool:
        """Take a pong received at ``t4``; False if it answers no ping of ours."""
        t1 = ext["t1"]
        if t1 not in self.pings:
            return False  # not ours (or too old): its timestamps prove nothing
        self.pings.remove(t1)
        t2, t3 = ext["t2"], ext["t3"]
        status = self.status
        status.rtt = (t4 - t1) - (t3 - t2)
        if self.clock.add(t1, t2, t3, t4) or status.clock is None:
            status.clock = self.clock.estimate()
        elif status.clock.samples != self.clock.samples:
            # Same inputs, same estimate: only the count moves (no fit redone).
            c = status.clock
            status.clock = ClockEstimate(c.offset, c.uncertainty, c.drift, c.at, self.clock.samples)
        return True


class PeerTable:
    """Extension-channel state per peer, bounded (least recently heard forgotten first)."""

    __slots__ = ("_data", "capacity")

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._data: OrderedDict[tuple[str, int], PeerEntry] = OrderedDict()

    def get(self, peer: tuple[str, int]) -> PeerEntry:
        """The entry of ``peer``, made the most recent (created if new)."""
        entry = self._data.get(peer)
        if entry is None:
            entry = self._data[peer] = PeerEntry()
            if len(self._data) > self.capacity:
                self._data.popitem(last=False)
        else:
            self._data.move_to_end(peer)
        return entry

    def status(self, peer: tuple[str, int]) -> PeerStatus | None:
        entry = self._data.get(peer)
        return None if entry is None else entry.status

    def statuses(self) -> dict[tuple[str, int], PeerStatus]:
        return {peer: entry.status for peer, entry in self._data.items()}
