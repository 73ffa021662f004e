"""A deterministic simulated network for echo cores and a model of iblutil 1.20.0.

Nothing here touches a socket or a clock: events are ordered by simulated
time in a heap, and every random choice comes from one seeded generator, so
a scenario replays exactly. Hypothesis (``test_core_sim.py``) chooses the
scenarios; this module runs them and records what the invariants need.

Nodes:

- :class:`CoreNode`: an :class:`~trio_rignet._core.EchoCore` with the same
  small shell :class:`~trio_rignet.EchoProtocol` puts around it (echo NEW and
  DUPLICATE, wake ECHO, retransmit on the core's timer, cancel).
- :class:`IblutilNode`: iblutil 1.20.0's echo rules (``EchoProtocol._receive``
  and ``confirmed_send``), checked against the real iblutil in the interop
  suite (``tests/interop/test_interop_model.py``).

The network: per-datagram loss, duplication and delay (UDP, so reordering
too), or per-direction ordered byte pipes cut into random chunks (TCP, with
the receiver's :class:`~trio_rignet.StreamDecoder`). Nodes can pause (a
stalled process: nothing it would do happens until it resumes) and can see
their IPv4 peers as IPv4-mapped IPv6 addresses (a dual-stack socket).
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trio_rignet import StreamDecoder
from trio_rignet._core import EchoCore, Outcome, Received, Send
from trio_rignet._tag import read_tag, strip_tag
from trio_rignet._uri import canonical_address

Address = tuple[str, int]


@dataclass
class Net:
    """Network conditions."""

    stream: bool = False
    loss: float = 0.0
    dup: float = 0.0
    delay_min: float = 0.0005
    delay_max: float = 0.002
    max_chunk: int = 64  # TCP: bytes per delivered chunk at most


@dataclass
class Log:
    """What happened, for the invariants."""

    transmissions: int = 0  # datagrams or messages handed to the network
    deliveries: int = 0
    originals: int = 0  # original messages sent (by every node)
    # (receiver, message identity) -> times dispatched
    dispatches: Counter[tuple[str, Any]] = field(default_factory=Counter)
    # message identities each node originated
    sent_by: dict[str, set[Any]] = field(default_factory=dict)
    outcomes: dict[int, list[Outcome]] = field(default_factory=dict)
    sends: list[Send] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)


def identity(raw: bytes) -> Any:
    """What identifies one application message: its tag, or its bytes if untagged."""
    body = raw.strip(b" \t\r\n")
    tag = read_tag(body)
    if tag is not None:
        return ("tag", tag[0], tag[1])
    return ("bytes", body)


class Sim:
    """The event loop of a simulation: simulated time and a heap of events."""

    def __init__(self, seed: int, net: Net) -> None:
        self.rng = random.Random(seed)
        self.net = net
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self.nodes: dict[Address, Node] = {}
        self.log = Log()
        self.events = 0
        # TCP: (src, dst) -> time the previous chunk of that pipe is delivered
        self._pipe_time: dict[tuple[Address, Address], float] = {}

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._order), action))

    def add(self, node: Node) -> Node:
        self.nodes[node.addr] = node
        node.sim = self
        return node

    def run(self, until: float, max_events: int) -> bool:
        """Run events up to time ``until``; False if ``max_events`` ran out first (a storm)."""
        while self._heap:
            when, _, action = self._heap[0]
            if when > until:
                return True
            heapq.heappop(self._heap)
            self.now = when
            self.events += 1
            if self.events > max_events:
                return False
            action()
        return True

    # ----------------------------------------------------------------- network

    def transmit(self, src: Node, dst: Address, data: bytes) -> None:
        """``src`` sends ``data`` to ``dst`` (as ``src`` names it)."""
        self.log.transmissions += 1
        target = self.nodes.get(canonical_address(dst))
        if target is None:
            return
        net = self.net
        rng = self.rng
        if net.stream:
            self._pipe(src, target, data)
            return
        copies = 0 if rng.random() < net.loss else 2 if rng.random() < net.dup else 1
        for _ in range(copies):
            delay = rng.uniform(net.delay_min, net.delay_max)
            self.at(self.now + delay, lambda: target.arrive(data, src))

    def _pipe(self, src: Node, dst: Node, data: bytes) -> None:
        """TCP: deliver ``data`` in order, cut into random chunks, each after the last."""
        key = (src.addr, dst.addr)
        t = max(self._pipe_time.get(key, 0.0), self.now)
        whole = isinstance(dst, IblutilNode)  # it cannot frame: pacing gives it whole messages
        # A connection lives as long as both processes: a restart at either end drops
        # what was in flight (a reset connection), and the next bytes start a new one.
        conn = (src.generation, dst.generation)
        pos = 0
        while pos < len(data):
            n = len(data) if whole else self.rng.randint(1, self.net.max_chunk)
            chunk = data[pos : pos + n]
            pos += n
            t += self.rng.uniform(self.net.delay_min, self.net.delay_max) / 4
            self.at(t, lambda chunk=chunk: dst.arrive_on(conn, chunk, src))
        self._pipe_time[key] = t


class Node:
    """A simulated endpoint at ``addr``."""

    sim: Sim

    def __init__(self, name: str, addr: Address, *, dual_stack: bool = False) -> None:
        self.name = name
        self.addr = addr
        self.dual_stack = dual_stack
        self.paused_until = 0.0
        self.dead = False
        self._decoders: dict[tuple[Address, int], StreamDecoder] = {}
        self._deferred: list[Callable[[], None]] = []  # what a pause held back, in order
        self.generation = 0  # restarts so far

    def seen_as(self, src: Node) -> Address:
        """How this node's socket reports ``src``'s address."""
        if self.dual_stack and ":" not in src.addr[0]:
            return ("::ffff:" + src.addr[0], src.addr[1])
        return src.addr

    def later(self, action: Callable[[], None]) -> bool:
        """If paused (or still catching up), run ``action`` when the pause ends; True if so.

        Held-back actions run in the order they came, however often the
        pause is extended.
        """
        if self.sim.now < self.paused_until or self._deferred:
            if not self._deferred:
                self.sim.at(self.paused_until, self._resume)
            self._deferred.append(action)
            return True
        return False

    def _resume(self) -> None:
        if self.sim.now < self.paused_until:
            self.sim.at(self.paused_until, self._resume)
            return
        deferred, self._deferred = self._deferred, []
        for action in deferred:
            action()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.sim.now + seconds)

    def arrive(self, data: bytes, src: Node) -> None:
        """A datagram from ``src``."""
        if self.dead or self.later(lambda: self.arrive(data, src)):
            return
        self.sim.log.deliveries += 1
        self.receive(data, self.seen_as(src))

    def arrive_on(self, conn: tuple[int, int], data: bytes, src: Node) -> None:
        """A chunk of the TCP connection ``conn`` (the two ends' generations) from ``src``."""
        if self.dead or self.later(lambda: self.arrive_on(conn, data, src)):
            return
        if conn[1] != self.generation:
            return  # sent to a previous instance of this node: that connection is gone
        self.sim.log.deliveries += 1
        decoder = self._decoders.get((src.addr, conn[0]))
        if decoder is None:
            decoder = self._decoders[(src.addr, conn[0])] = StreamDecoder()
        for raw in decoder.feed(data):
            self.receive(raw, self.seen_as(src))

    def receive(self, raw: bytes, addr: Address) -> None:
        raise NotImplementedError

    def dispatched(self, raw: bytes) -> None:
        log = self.sim.log
        log.dispatches[(self.name, identity(raw))] += 1

    def originated(self, raw: bytes) -> None:
        log = self.sim.log
        log.originals += 1
        log.sent_by.setdefault(self.name, set()).add(identity(raw))


class CoreNode(Node):
    """An echo core and the shell EchoProtocol puts around it."""

    def __init__(self, name: str, addr: Address, *, reliable: bool = False, **kw: Any) -> None:
        super().__init__(name, addr, **kw)
        self.reliable = reliable
        self.core: EchoCore | None = None
        self.sends: list[Send] = []

    def start(self, session_seed: int) -> None:
        self.core = EchoCore(
            stream=self.sim.net.stream,
            reliable=self.reliable,
            rng=random.Random(session_seed),
        )

    def restart(self, session_seed: int) -> None:
        """The process dies and starts again at the same address: a new core and session.

        Its pending sends end (as the endpoint's close ends them); the new
        instance is a different endpoint for the invariants (``name + "'"``).
        """
        if self.dead or self.later(lambda: self.restart(session_seed)):
            return
        for send in self.c.close():
            self._ended(send)
        self.sends = []
        self.name += "'"
        self.generation += 1
        self._decoders.clear()
        # A new session, as a real restart draws one (seeded apart from earlier ones).
        self.start(session_seed * 1_000_003 + self.generation)

    @property
    def c(self) -> EchoCore:
        assert self.core is not None
        return self.core

    def receive(self, raw: bytes, addr: Address) -> None:
        verdict, detail = self.c.receive(addr, raw, self.sim.now)
        if verdict is Received.ECHO:
            self._ended(detail)
        elif verdict is Received.NEW:
            if detail.event:
                self.sim.transmit(self, addr, raw)
            self.dispatched(raw)
        elif verdict is Received.DUPLICATE:
            self.sim.transmit(self, addr, raw)

    def confirmed(self, dst: Address, payload: bytes, timeout: float) -> None:
        if self.dead or self.later(lambda: self.confirmed(dst, payload, timeout)):
            return
        send = self.c.open_send(dst, payload, self.sim.now, timeout)
        self.sends.append(send)
        self.sim.log.outcomes[id(send)] = []
        self.sim.log.sends.append(send)  # alive, so ids stay unique
        self.originated(send.wire)
        self.sim.transmit(self, dst, send.wire)
        self._arm(send)

    def post(self, dst: Address, payload: bytes) -> None:
        if self.dead or self.later(lambda: self.post(dst, payload)):
            return
        wire = self.c.post(dst, payload)
        self.originated(wire)
        self.sim.transmit(self, dst, wire)

    def cancel(self, index: int) -> None:
        if self.dead or not self.sends or self.later(lambda: self.cancel(index)):
            return
        send = self.sends[index % len(self.sends)]
        if self.c.end(send, Outcome.CANCELLED):
            self._ended(send)

    def _arm(self, send: Send) -> None:
        self.sim.at(send.wake_at, lambda: self._timer(send))

    def _timer(self, send: Send) -> None:
        if self.dead or self.later(lambda: self._timer(send)):
            return
        if send.outcome is not Outcome.PENDING:
            return
        data = self.c.on_timer(send, self.sim.now)
        if data is not None:
            self.sim.transmit(self, send.addr, data)
        if send.outcome is Outcome.PENDING:
            self._arm(send)
        else:
            self._ended(send)

    def _ended(self, send: Send) -> None:
        self.sim.log.outcomes[id(send)].append(send.outcome)


class IblutilNode(Node):
    """iblutil 1.20.0's echo rules (``app.EchoProtocol``), as a model.

    - While awaiting the echo of a confirmed send to ``addr``, any message
      from ``addr`` is taken as that echo: equal bytes confirm it; anything
      else fails it (``RuntimeError``) and the communicator closes.
    - Otherwise a message is echoed (unless its second character is ``0``,
      an error report) and dispatched.
    - A confirmed send that times out closes the communicator.
    - A TCP read is one message: iblutil does not frame (the simulation
      gives it whole messages, as trio-rignet's pacing intends).
    """

    def __init__(self, name: str, addr: Address, **kw: Any) -> None:
        super().__init__(name, addr, **kw)
        self.awaiting: dict[Address, tuple[bytes, list[str]]] = {}
        self.results: list[str] = []

    def arrive_on(self, conn: tuple[int, int], data: bytes, src: Node) -> None:
        # iblutil gets whole messages (no decoder): see the class docstring.
        if self.dead or self.later(lambda: self.arrive_on(conn, data, src)):
            return
        self.sim.log.deliveries += 1
        self.receive(data, self.seen_as(src))

    def receive(self, raw: bytes, addr: Address) -> None:
        waiting = self.awaiting.get(addr)
        if waiting is not None and not waiting[1]:
            expected, state = waiting
            if raw == expected:
                state.append("confirmed")
                self.results.append("confirmed")
            else:
                state.append("mismatch")
                self.results.append("mismatch")
                self.dead = True  # RuntimeError: confirmed_send closes the communicator
            return
        if raw[1:2] != b"0":
            self.sim.transmit(self, addr, raw)
        try:
            decoded = json.loads(raw)
        except ValueError:
            return
        if isinstance(decoded, list) and len(decoded) > 1:
            self.dispatched(raw)

    def confirmed(self, dst: Address, payload: bytes, timeout: float) -> None:
        if self.dead or self.later(lambda: self.confirmed(dst, payload, timeout)):
            return
        state: list[str] = []
        self.awaiting[dst] = (payload, state)
        self.originated(payload)
        self.sim.transmit(self, dst, payload)

        def expire() -> None:
            if self.later(expire):
                return
            if not state:
                state.append("timeout")
                self.results.append("timeout")
                self.dead = True  # iblutil closes on a timeout

        self.sim.at(self.sim.now + timeout, expire)


def untag(raw: bytes) -> bytes:
    """The message without its tag (what iblutil's builders produce)."""
    return strip_tag(raw.strip(b" \t\r\n"))
