"""The echo core: every decision about messages, with no sockets and no clock.

In the style of h11 and wsproto, :class:`EchoCore` is fed what happens (this
endpoint wants to send a payload to a peer; these bytes arrived from that
peer; this send's timer fired at time ``now``) and answers what to do
(transmit these bytes; this send is confirmed, or has ended with this
outcome; echo and dispatch this message; drop that one, for this reason).
:class:`~trio_rignet.EchoProtocol` is the I/O shell that carries it out; the
test suite drives several cores over a simulated network.

The rules (the reliability page of the docs states them for users):

1. **Every message an endpoint originates is unique and recognisable.** It
   carries a tag (:mod:`._tag`): the endpoint's random session number and a
   per-peer sequence number, in JSON whitespace that every peer echoes byte
   for byte. Echoes are returned unchanged; error reports are tagged too (they
   are never echoed), so a rig's report names the signal it answers.
2. **An endpoint never echoes or dispatches its own message.** An arriving
   message that matches a send still waiting for its echo confirms it (the
   oldest such send). Any other arrival bearing this endpoint's session is a
   late or duplicated echo and is dropped, however late it comes: no record
   has to outlive a peer's delay, so no message can bounce back and forth.
3. **A peer's message is echoed every time it arrives, dispatched once.**
   Messages tagged by a trio-rignet peer are deduplicated per (peer, session)
   with a sliding window of sequence numbers: a retransmission is echoed again
   (at most :attr:`Limits.reechoes` times) but not dispatched again. One older
   than the window is a repeat if the recent table remembers it, new if it
   cannot have been received (it is above every number the table has
   forgotten of that session), and otherwise dropped. A number more than
   65,536 behind is a counter drawn anew (a peer that forgot us starts from a
   random number), so it opens a new window. Messages without a tag (iblutil
   peers) are each a new message, as in iblutil: an iblutil peer that sends
   the same bytes twice means it twice.
4. **Every confirmed send ends exactly once**: confirmed, timed out, peer
   unavailable, endpoint closed, or cancelled (:class:`Outcome`).
5. **An echo ping-pong with an untagged peer is cut.** iblutil echoes any
   message it is not waiting for, our echoes included (after a duplicated
   datagram, or its own unconfirmed ``send()``), and such a bounce looks
   exactly like a peer repeating itself. A peer that sends the same untagged
   bytes again within :attr:`Limits.bounce_window` of our echo of them,
   :attr:`Limits.bounce_after` times in a row, while we send it nothing and
   it echoes nothing of ours, is bouncing: from then on, copies of those bytes that keep coming
   within the window are dropped (not echoed, not dispatched), which ends the
   exchange. This needs a round trip shorter than the window (20 ms: a LAN);
   a peer must repeat itself that fast, 32 times in a row, to be mistaken
   for a bounce. Messages trio-rignet originates never bounce at all
   (rules 1-2), whatever the delays.

Every table is bounded by a number of entries of bounded size (peer keys,
integers, digests: never a received payload), so memory stays bounded in
bytes whatever peers send. Addresses are compared in one canonical form
(:func:`~trio_rignet._uri.canonical_address`), so an IPv4 peer seen through a
dual-stack socket is the same peer.
"""

from __future__ import annotations

import enum
import math
import random
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ._allow import PeerFilter
from ._errors import MessageError
from ._messages import parse_message
from ._tag import Tag, Tagger, read_tag
from ._uri import canonical_address

__all__ = ["EchoCore", "EchoStats", "Limits", "Outcome", "Received", "Send"]

Address = tuple[str, int]
_WHITESPACE = b" \t\r\n"
_MASK32 = 0xFFFFFFFF
_RTO_MIN = 0.01
_SYSTEM_RANDOM = random.SystemRandom()
"""Sessions and first sequence numbers from the OS (one shared source: a
``random.Random`` per endpoint would cost 2.5 KiB of state each)."""
_RESTARTED = 1 << 16
"""A peer's sequence number this far behind its window is a counter drawn anew (the peer
forgot us), not a repeat: no message is repeated after 65,536 newer ones."""


class Outcome(enum.IntEnum):
    """How a confirmed send ended (``PENDING`` while it has not)."""

    PENDING = 0
    CONFIRMED = 1
    TIMED_OUT = 2
    UNAVAILABLE = 3
    CLOSED = 4
    CANCELLED = 5


class Received(enum.IntEnum):
    """What :meth:`EchoCore.receive` decided about an arriving message."""

    ECHO = 1
    """The echo of a waiting send, which it confirms."""
    OWN = 2
    """One of this endpoint's own messages came back with nothing waiting: drop."""
    NEW = 3
    """A new message: echo it (unless it is an error report) and dispatch it."""
    DUPLICATE = 4
    """A repeat of a peer's message already dispatched: echo it again, do not dispatch."""
    STALE = 5
    """A repeat too old to echo, echoed too often already, or a bounce: drop."""
    MALFORMED = 6
    """Not a valid message: drop (log the reason)."""
    REFUSED = 7
    """From a host outside the allow list: drop."""
    EXTENSION = 8
    """A trio-rignet extension message (heartbeat, clock probe): for the extension
    layer; never echoed, never dispatched."""


@dataclass
class EchoStats:
    """Counters of one endpoint (never reset; read any time).

    Attributes:
        sent: messages sent (originals, echoes, retransmissions, error reports).
        received: messages received, echoes included.
        echoed: received messages echoed back.
        confirmed: confirmed sends whose echo arrived.
        timeouts: confirmed sends that timed out.
        dropped: received messages dropped as malformed.
        refused: messages ignored from hosts outside the ``allow`` list.
        retransmits: reliable mode: messages sent again for want of an echo.
        duplicates: repeats of a peer's message echoed again, not dispatched.
        late: this endpoint's own messages that came back with nothing waiting
            (late or duplicated echoes), dropped.
        stale: repeats of a peer's message too old or too often repeated to echo.
        bounces: echo ping-pongs with an untagged peer cut short.
        rtt_count: echo round trips measured.
        rtt_total: sum of echo round-trip times, seconds.
        rtt_min: shortest round trip, seconds (``inf`` before the first).
        rtt_max: longest round trip, seconds.
        rtt_last: the latest round trip, seconds (``nan`` before the first).
    """

    sent: int = 0
    received: int = 0
    echoed: int = 0
    confirmed: int = 0
    timeouts: int = 0
    dropped: int = 0
    refused: int = 0
    retransmits: int = 0
    duplicates: int = 0
    late: int = 0
    stale: int = 0
    bounces: int = 0
    rtt_count: int = 0
    rtt_total: float = 0.0
    rtt_min: float = math.inf
    rtt_max: float = 0.0
    rtt_last: float = math.nan

    @property
    def rtt_mean(self) -> float:
        """Mean echo round-trip time in seconds (``nan`` before the first)."""
        return self.rtt_total / self.rtt_count if self.rtt_count else math.nan


@dataclass(frozen=True)
class Limits:
    """Sizes of the core's tables (entries; each entry is a few hundred bytes at most).

    Attributes:
        sessions: (peer, session) pairs whose sequence window is kept.
        recent: recently received messages whose repeats may still be echoed.
        peers: peers remembered in each per-peer table (sequence counters,
            peers heard from, peers that echoed us, trio-rignet peers).
        window: sequence numbers per (peer, session) window; a repeat older
            than this many messages from that peer is dropped.
        reechoes: times a repeated message is echoed again before further
            copies are dropped (a retransmitting sender needs one per loss).
        bounce_after: untagged repeats in a row that make an echo ping-pong.
        bounce_window: seconds after our echo within which a repeat counts.
    """

    sessions: int = 4096
    recent: int = 4096
    peers: int = 4096
    window: int = 1024
    reechoes: int = 16
    bounce_after: int = 32
    bounce_window: float = 0.02

    def __post_init__(self) -> None:
        for name in ("sessions", "recent", "peers", "window", "reechoes", "bounce_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a whole number, 1 or more: {value!r}")
        if not self.bounce_window > 0:
            raise ValueError(f"Limits.bounce_window must be positive, got {self.bounce_window!r}")


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class _Bounded(OrderedDict[_K, _V]):
    """An insertion- or use-ordered map that drops its oldest entry beyond ``capacity``.

    A dict itself, so lookups (``get``, ``in``) cost no Python call.
    """

    __slots__ = ("capacity", "evicted")

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.evicted = 0

    def put(self, key: _K, value: _V) -> _K | None:
        """Set ``key`` and make it the most recent; the key dropped to make room, if any."""
        self[key] = value
        self.move_to_end(key)
        if len(self) > self.capacity:
            self.evicted += 1
            return self.popitem(last=False)[0]
        return None

    def touch(self, key: _K, value: _V) -> None:
        """Make ``key`` the most recent, setting it to ``value`` if absent."""
        if key in self:
            self.move_to_end(key)
        else:
            self.put(key, value)


class _Peer:
    """What the core remembers of one peer (one entry of the peer table)."""

    __slots__ = ("dropped", "epoch", "heard", "seq", "session")

    def __init__(self, seq: int) -> None:
        self.seq = seq  # the last sequence number we used toward this peer
        self.epoch = 0  # moves on whenever we send it something or it echoes us (rule 5)
        self.heard = False  # it sent us a message
        self.session: int | None = None  # the session of its last tagged message
        # (session, highest seq) of its latest window dropped from a full window
        # table: kept here too, where a flood from other hosts cannot push it out
        self.dropped: tuple[int, int] | None = None


class Send:
    """One confirmed send: the bytes on the wire and how it ends.

    The shell attaches a waiter (``waiter``) and a transport handle
    (``handle``); the core never touches either.
    """

    __slots__ = (
        "addr",
        "deadline",
        "handle",
        "outcome",
        "peer",
        "reason",
        "retransmits",
        "retry_at",
        "rto",
        "seq",
        "started",
        "timeout",
        "waiter",
        "wire",
    )

    def __init__(
        self, addr: Address, peer: Address, wire: bytes, seq: int, now: float, timeout: float
    ) -> None:
        self.addr = addr
        self.peer = peer
        self.wire = wire
        self.seq = seq
        self.started = now
        self.timeout = timeout
        self.deadline = now + timeout
        self.retry_at = math.inf
        self.rto = 0.0
        self.retransmits = 0
        self.outcome = _PENDING
        self.reason = ""  # why it ended UNAVAILABLE, as the shell reported it
        self.waiter: Any = None
        self.handle: Any = None

    @property
    def wake_at(self) -> float:
        """When the shell must call :meth:`EchoCore.on_timer` if nothing came first."""
        return min(self.retry_at, self.deadline)

    def __repr__(self) -> str:
        return f"<Send seq={self.seq} to {self.peer} {self.outcome.name}>"


# Members as plain names: on the hot path, ``Received.ECHO`` costs an EnumType
# attribute lookup (a __getattr__ hook on Python 3.11).
_ECHO, _NEW, _OWN, _STALE = Received.ECHO, Received.NEW, Received.OWN, Received.STALE
_PENDING, _CONFIRMED = Outcome.PENDING, Outcome.CONFIRMED


class EchoCore:
    """The state and rules of one endpoint (see the module docstring).

    Args:
        stream: TCP (messages arrive framed, outer whitespace already removed)
            rather than UDP.
        reliable: retransmit unconfirmed messages with exponential backoff
            until their deadline.
        allow: if given, only these hosts and networks are heard.
        session: this endpoint's session number (random if None).
        rng: random source for the session and sequence numbers.
        limits: table sizes.
    """

    def __init__(
        self,
        *,
        stream: bool,
        reliable: bool = False,
        allow: Iterable[str] | None = None,
        session: int | None = None,
        rng: random.Random | None = None,
        limits: Limits = Limits(),
    ) -> None:
        self._rng = rng or _SYSTEM_RANDOM
        self.stream = stream
        self.reliable = reliable
        self.limits = limits
        self.filter = None if allow is None else PeerFilter(allow)
        self.session = self._rng.getrandbits(32) if session is None else session & _MASK32
        self._tagger = Tagger(self.session)
        self.stats = EchoStats()
        # peer -> wire bytes -> sends awaiting that echo, oldest first
        self._pending: dict[Address, dict[bytes, deque[Send]]] = {}
        # Every peer seen or sent to, least recently used first out. Peers that
        # echoed one of our sends are remembered apart as well, so a flood of
        # strangers cannot push them out.
        self._peers: _Bounded[Address, _Peer] = _Bounded(limits.peers)
        self._verified: _Bounded[Address, bool] = _Bounded(limits.peers)
        # (peer, session) -> [highest seq, bitmap of the window below it, floor]:
        # floor is one past the highest seq forgotten from ``_recent`` (None: none).
        self._windows: _Bounded[tuple[Address, int], list[Any]] = _Bounded(limits.sessions)
        # (peer, session, seq) -> echoes left for repeats of that message
        self._recent: _Bounded[tuple[Address, int, int], int] = _Bounded(limits.recent)
        # (peer, session) -> highest seq of its window, dropped from a full window table
        self._dropped: _Bounded[tuple[Address, int], int] = _Bounded(limits.sessions)
        self._keys: _Bounded[tuple[Any, ...], Address] = _Bounded(limits.peers)
        # Rule 5. (peer, hash of an untagged message) -> [epoch, repeats in a row, when]
        self._streaks: _Bounded[tuple[Address, int], list[Any]] = _Bounded(limits.peers * 4)
        self._window_mask = (1 << limits.window) - 1  # a window's bits (made once)
        self._srtt = math.nan  # RFC 6298 round-trip estimate, from unretransmitted sends
        self._rttvar = 0.0

    # ------------------------------------------------------------------ peers

    def peer_key(self, addr: tuple[Any, ...]) -> Address:
        """The canonical form of a socket address (cached)."""
        key = self._keys.get(addr)
        if key is None:
            key = canonical_address(addr)
            self._keys.put(addr, key)
        return key

    def allows(self, addr: tuple[Any, ...]) -> bool:
        """True if ``addr`` passes the allow list (always, without one)."""
        return self.filter is None or self.filter.allows(self.peer_key(addr)[0])

    def _peer(self, peer: Address) -> _Peer:
        """The state of ``peer``, made the most recent (created if new)."""
        peers = self._peers
        state = peers.get(peer)
        if state is None:
            # A random first sequence number: a peer forgotten and met again does
            # not reuse the numbers its window has already seen.
            state = _Peer(self._rng.getrandbits(32))
            peers.put(peer, state)
        else:
            peers.move_to_end(peer)
        return state

    def is_trio_peer(self, addr: tuple[Any, ...]) -> bool:
        """True if ``addr`` has sent a tagged message: it runs trio-rignet."""
        return self.peer_session(addr) is not None

    def peer_session(self, addr: tuple[Any, ...]) -> int | None:
        """The session of the last tagged message from ``addr`` (None if none)."""
        state = self._peers.get(self.peer_key(addr))
        return None if state is None else state.session

    def knows(self, addr: tuple[Any, ...]) -> bool:
        """True if ``addr`` echoed one of our sends or sent us a message lately.

        Peers that echoed us are remembered apart from peers merely heard
        from, so a flood of strangers cannot make a real peer forgotten.
        """
        peer = self.peer_key(addr)
        if peer in self._verified:
            return True
        state = self._peers.get(peer)
        return state is not None and state.heard

    # ---------------------------------------------------------------- sending

    def originate(
        self, addr: Address, payload: bytes, *, reply_to: int | None = None
    ) -> tuple[Address, int, bytes]:
        """Tag ``payload`` for ``addr``: ``(peer key, seq, wire bytes)``.

        ``reply_to`` is the seq of the peer's message this one answers.

        Raises:
            ValueError: ``payload`` is not a JSON array.
        """
        body = payload.strip(_WHITESPACE)
        if body[:1] != b"[" or body[-1:] != b"]":
            raise ValueError(
                "a message is a JSON array whose first element is the event code, "
                f"e.g. [1, null]; got {payload[:40]!r}"
            )
        peer = self._keys.get(addr)
        if peer is None:
            peer = self.peer_key(addr)
        state = self._peers.get(peer)
        if state is None:
            state = self._peer(peer)
        else:
            self._peers.move_to_end(peer)  # _peer, inlined
        seq = state.seq = (state.seq + 1) & _MASK32
        state.epoch += 1  # we sent it something (rule 5)
        return peer, seq, self._tagger.tag(body, seq, reply_to)

    def post(self, addr: Address, payload: bytes, *, reply_to: int | None = None) -> bytes:
        """The wire bytes of a message sent without waiting for its echo.

        Its echo, whenever it comes, is recognised as this endpoint's own
        message and dropped.
        """
        wire = self.originate(addr, payload, reply_to=reply_to)[2]
        self.stats.sent += 1
        return wire

    def open_send(
        self,
        addr: Address,
        payload: bytes,
        now: float,
        timeout: float,
        *,
        reply_to: int | None = None,
    ) -> Send:
        """Register a confirmed send of ``payload`` to ``addr``; transmit ``send.wire``.

        The send waits for its echo until ``now + timeout``; in reliable mode
        :meth:`on_timer` also returns retransmissions. It ends exactly once.
        """
        peer, seq, wire = self.originate(addr, payload, reply_to=reply_to)
        send = Send(addr, peer, wire, seq, now, timeout)
        if self.reliable:
            send.rto = min(self.rto, self._max_rto(timeout))
            send.retry_at = now + send.rto
        waiting = self._pending.get(peer)
        if waiting is None:
            waiting = self._pending[peer] = {}
        sends = waiting.get(wire)
        if sends is None:
            waiting[wire] = deque((send,))
        else:
            sends.append(send)
        self.stats.sent += 1
        return send

    @property
    def rto(self) -> float:
        """The first retransmission delay (RFC 6298: srtt + 4 rttvar, at least 10 ms)."""
        srtt = self._srtt
        if srtt != srtt:  # no sample yet
            return 4 * _RTO_MIN
        return max(_RTO_MIN, srtt + 4 * self._rttvar)

    @staticmethod
    def _max_rto(timeout: float) -> float:
        # Retries keep coming until the deadline, however slow the first round trips.
        return max(4 * _RTO_MIN, timeout / 8)

    def on_timer(self, send: Send, now: float) -> bytes | None:
        """The send's timer fired: the bytes to retransmit, or None.

        At or after the deadline the send ends as ``TIMED_OUT`` (unless it has
        ended already) and None is returned.
        """
        if send.outcome is not Outcome.PENDING:
            return None
        if now >= send.deadline:
            self.end(send, Outcome.TIMED_OUT)
            return None
        if now < send.retry_at:
            return None
        send.retransmits += 1
        send.rto = min(send.rto * 2, self._max_rto(send.timeout))
        send.retry_at = now + send.rto
        self.stats.retransmits += 1
        self.stats.sent += 1
        return send.wire

    def end(self, send: Send, outcome: Outcome) -> bool:
        """End a pending send with ``outcome``; False if it had ended already."""
        if send.outcome is not Outcome.PENDING:
            return False
        send.outcome = outcome
        if outcome is Outcome.TIMED_OUT:
            self.stats.timeouts += 1
        self._unregister(send)
        return True

    def _unregister(self, send: Send) -> None:
        waiting = self._pending.get(send.peer)
        if waiting is None:
            return
        sends = waiting.get(send.wire)
        if sends is None:
            return
        try:
            sends.remove(send)
        except ValueError:
            return
        if not sends:
            del waiting[send.wire]
            if not waiting:
                del self._pending[send.peer]

    def peer_lost(self, addr: tuple[Any, ...], reason: str = "") -> list[Send]:
        """End every send to ``addr`` as ``UNAVAILABLE`` (with ``reason``); return them."""
        waiting = self._pending.pop(self.peer_key(addr), None)
        ended: list[Send] = []
        if waiting:
            for sends in waiting.values():
                for send in sends:
                    send.outcome = Outcome.UNAVAILABLE
                    send.reason = reason
                    ended.append(send)
        return ended

    def close(self) -> list[Send]:
        """End every pending send as ``CLOSED``; return them."""
        ended = [
            send
            for waiting in self._pending.values()
            for sends in waiting.values()
            for send in sends
        ]
        self._pending.clear()
        for send in ended:
            send.outcome = Outcome.CLOSED
        return ended

    def pending(self, addr: tuple[Any, ...] | None = None) -> bool:
        """True if a send (to ``addr``, or to anyone) awaits its echo."""
        if addr is None:
            return bool(self._pending)
        return self.peer_key(addr) in self._pending

    # -------------------------------------------------------------- receiving

    def receive(self, addr: tuple[Any, ...], raw: bytes, now: float) -> tuple[Received, Any]:
        """Classify bytes that arrived from ``addr``.

        Returns ``(verdict, detail)``: for ``ECHO`` the confirmed
        :class:`Send`; for ``NEW`` the parsed :class:`~trio_rignet.Message`;
        for ``EXTENSION`` ``(tag, message bytes)``; for ``MALFORMED`` the
        reason; otherwise None. The shell echoes ``raw`` for ``NEW`` (unless
        the message is an error report) and ``DUPLICATE``.
        """
        stats = self.stats
        stats.received += 1
        peer = self._keys.get(addr)
        if peer is None:
            peer = self.peer_key(addr)
        if self.filter is not None and not self.filter.allows(peer[0]):
            stats.refused += 1
            return Received.REFUSED, None
        key = raw if self.stream else raw.strip(_WHITESPACE)
        waiting = self._pending.get(peer)
        if waiting is not None:
            sends = waiting.get(key)
            if sends is not None:
                send = sends.popleft()
                if not sends:
                    del waiting[key]
                    if not waiting:
                        del self._pending[peer]
                self._confirm(send, now)
                return _ECHO, send
        tag = read_tag(key)
        if tag is not None:
            extension = key[1] == 0x7B  # [{...}]: the channel between trio-rignet peers
            verdict = self._check_tag(peer, tag, not extension)
            if extension:
                if verdict is None:
                    return Received.EXTENSION, (tag, key)
                if verdict is Received.DUPLICATE:
                    verdict = Received.STALE  # never echoed
            if verdict is not None:
                return verdict, None
        try:
            msg = parse_message(key, peer, tag)
        except MessageError as exc:
            stats.dropped += 1
            return Received.MALFORMED, str(exc)
        # A tagged message's peer was just made the most recent by _check_tag.
        state = None if tag is None else self._peers.get(peer)
        if state is None:
            state = self._peer(peer)
        if tag is None and msg.event and self._bouncing(peer, state.epoch, key, now):
            stats.bounces += 1
            return Received.STALE, None
        state.heard = True
        return _NEW, msg

    def _bouncing(self, peer: Address, epoch: int, key: bytes, now: float) -> bool:
        """Rule 5: is this untagged message a hop of an echo ping-pong?

        Once a ping-pong is detected, every further copy of those bytes that
        arrives within ``bounce_window`` of the previous one is dropped too
        (duplicated datagrams may have started several in parallel).
        """
        key_ = (peer, hash(key))
        streak = self._streaks.get(key_)
        if streak is None or streak[0] != epoch or now - streak[2] > self.limits.bounce_window:
            self._streaks.put(key_, [epoch, 0, now])
            return False
        streak[1] += 1
        streak[2] = now
        self._streaks.touch(key_, streak)
        return bool(streak[1] >= self.limits.bounce_after)

    def _confirm(self, send: Send, now: float) -> None:
        send.outcome = _CONFIRMED
        stats = self.stats
        rtt = now - send.started
        stats.confirmed += 1
        stats.rtt_count += 1
        stats.rtt_total += rtt
        if rtt < stats.rtt_min:
            stats.rtt_min = rtt
        if rtt > stats.rtt_max:
            stats.rtt_max = rtt
        stats.rtt_last = rtt
        # The retransmission timer's estimate (reliable mode only). Karn: a
        # retransmitted send's round trip is ambiguous.
        if self.reliable and not send.retransmits:
            srtt = self._srtt
            if srtt != srtt:
                self._srtt, self._rttvar = rtt, rtt / 2
            else:
                self._rttvar = 0.75 * self._rttvar + 0.25 * abs(srtt - rtt)
                self._srtt = 0.875 * srtt + 0.125 * rtt
        verified = self._verified
        if send.peer in verified:
            verified.move_to_end(send.peer)
        else:
            verified.put(send.peer, True)
        state = self._peers.get(send.peer)
        if state is not None:
            state.epoch += 1  # it echoed us (rule 5)

    def _check_tag(self, peer: Address, tag: Tag, echoed: bool = True) -> Received | None:
        """The verdict on a tagged arrival that is not an awaited echo (None: new).

        ``echoed``: its repeats are echoed, so it is remembered in the recent
        table (with its echo budget). Extension messages (heartbeats) are never
        echoed: only their window bit records them, and they do not push
        signals out of the recent table.
        """
        session, seq, _ = tag
        if session == self.session:
            self.stats.late += 1
            return _OWN
        peers = self._peers
        state = peers.get(peer)
        if state is None:
            state = self._peer(peer)
        else:
            peers.move_to_end(peer)  # _peer, inlined
        state.session = session
        key = (peer, session)
        windows = self._windows
        window = windows.get(key)
        size = self.limits.window
        message = (peer, session, seq)
        if window is None:
            if message in self._recent:
                return self._repeat(message)  # its window was dropped; it is remembered
            floor = None
            seen = 1
            dropped = self._dropped.get(key)
            if dropped is None and state.dropped is not None and state.dropped[0] == session:
                dropped = state.dropped[1]
            if dropped is not None:
                # This session's window was dropped (the table overflowed): what is
                # not newer than its highest number may have been dispatched.
                gap = (seq - dropped) & _MASK32
                if gap == 0 or (1 << 32) - gap < _RESTARTED:
                    self.stats.stale += 1
                    return _STALE
                self._dropped.pop(key, None)
                if state.dropped is not None and state.dropped[0] == session:
                    state.dropped = None
                if gap < 1 << 31:  # newer: the numbers up to its highest count as seen
                    floor = (dropped + 1) & _MASK32
                    if gap < size:
                        seen |= self._window_mask & ~((1 << gap) - 1)
                # else far behind: the peer drew its numbers anew (see below)
            if len(windows) >= windows.capacity:
                old_key, old_window = windows.popitem(last=False)
                windows.evicted += 1
                self._dropped.put(old_key, old_window[0])
                owner = peers.get(old_key[0])
                if owner is not None:
                    owner.dropped = (old_key[1], old_window[0])
            windows[key] = [seq, seen, floor]
        else:
            high, seen, floor = window
            ahead = (seq - high) & _MASK32
            behind = (high - seq) & _MASK32
            if ((ahead and ahead < 1 << 31) or behind >= _RESTARTED) and message in self._recent:
                # Received before the window was started anew (a peer that drew its
                # numbers anew still retransmits the sends it had pending).
                return self._repeat(message)
            if ahead and ahead < 1 << 31:  # newer than any seen: slide the window
                window[0] = seq
                window[1] = ((seen << ahead) | 1) & self._window_mask if ahead < size else 1
            elif behind >= _RESTARTED:
                # Far behind: the peer forgot us and drew a new random first number
                # (its table of peers overflowed), not a repeat of that long ago.
                window[0] = seq
                window[1] = 1
                window[2] = None
            elif behind < size:
                # Within the window its bit says it all (numbers of a dropped
                # window count as seen, see above).
                if seen >> behind & 1:
                    return self._repeat(message)
                window[1] = seen | 1 << behind
            elif message in self._recent:
                return self._repeat(message)  # older than the window, still remembered
            elif floor is not None and (seq - floor) & _MASK32 >= 1 << 31:
                # Below the floor: it may have been received and dispatched (its
                # record forgotten from the recent table, or its window dropped),
                # so it is neither echoed nor dispatched.
                self.stats.stale += 1
                return _STALE
            # else: older than the window but never received (every copy so far
            # was lost): a new message.
            windows.move_to_end(key)
        if not echoed:
            return None
        recent = self._recent
        recent[message] = self.limits.reechoes  # recent.put, inlined
        recent.move_to_end(message)
        if len(recent) > recent.capacity:
            old_peer, old_session, old_seq = recent.popitem(last=False)[0]
            recent.evicted += 1
            old = windows.get((old_peer, old_session))
            # A number of the peer's current run (not of one it drew anew since)
            if old is not None and (old[0] - old_seq) & _MASK32 < _RESTARTED:
                old_floor = old[2]
                if old_floor is None or (old_seq - old_floor) & _MASK32 < 1 << 31:
                    old[2] = (old_seq + 1) & _MASK32
        return None

    def _repeat(self, key: tuple[Address, int, int]) -> Received:
        left = self._recent.get(key)
        if not left:
            self.stats.stale += 1
            return Received.STALE
        self._recent.put(key, left - 1)
        self.stats.duplicates += 1
        return Received.DUPLICATE

    # ------------------------------------------------------------------ sizes

    def table_sizes(self) -> dict[str, int]:
        """Entries in each table (for tests and diagnostics)."""
        return {
            "pending": sum(len(s) for w in self._pending.values() for s in w.values()),
            "peers": len(self._peers),
            "windows": len(self._windows),
            "recent": len(self._recent),
            "verified": len(self._verified),
            "keys": len(self._keys),
            "streaks": len(self._streaks),
        }
