"""The echo core's invariants, over scenarios Hypothesis generates on a simulated network.

Each scenario: 2-4 endpoints (echo cores, and models of iblutil 1.20.0), UDP
with seeded loss, duplication, reordering and delays of up to several echo
timeouts, or TCP with messages cut into random chunks; endpoints that pause
(a stalled process), dual-stack sockets that report IPv4 peers as
``::ffff:a.b.c.d``, payloads with outer whitespace, identical payloads sent
again, cancellations. After the run:

1. **No storm**: the run ends (the event heap drains) and the network carried
   at most a bounded multiple of what the endpoints originated: one message
   causes a bounded exchange, whatever the delays.
2. **One dispatch per message** at each end, for every message a core sent
   (any mode), and no endpoint ever dispatches a message it sent itself.
3. **Every confirmed send ends exactly once.**
4. **Progress**: on a network with no loss, no pauses and delays well under
   the timeout, every confirmed send is confirmed and every message is
   dispatched exactly once by its receiver.
5. **Memory**: every table of every core stays within its limit.

The default run generates a few thousand scenarios; ``HYPOTHESIS_PROFILE=fuzz``
runs many more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.simnet import CoreNode, IblutilNode, Net, Node, Sim, identity

from trio_rignet._core import EchoCore, Limits, Outcome, Received
from trio_rignet._tag import Tagger

PAYLOADS = [
    b"[1, null]",
    b'[2, "2024-01-01_1_mouse", null]',
    b"[4, null]",
    b"[1, null]\n",  # whitespace framing: a peer that ends messages with a newline
    b"  [32, 20] ",
    b'[64, 10, {"k": [1, 2, "]"]}]',
]
TIMEOUTS = [0.2, 1.0]


@dataclass
class Action:
    at: float
    actor: int
    kind: str  # confirmed | post | cancel | pause | restart
    target: int
    payload: int
    timeout: int
    arg: float


@dataclass
class Scenario:
    stream: bool
    kinds: list[str]  # "core", "reliable", "iblutil"
    dual_stack: list[bool]
    net: Net
    actions: list[Action]
    seed: int

    @property
    def benign(self) -> bool:
        net = self.net
        # An iblutil peer that receives anything while awaiting an echo fails its send
        # and closes (its protocol has no way to tell): benign means it only echoes.
        return (
            net.loss == 0
            and net.dup == 0
            and net.delay_max <= 0.01
            and not any(a.kind in ("pause", "cancel", "restart") for a in self.actions)
            and not any(
                self.kinds[a.actor] == "iblutil" and a.kind == "confirmed" for a in self.actions
            )
        )


@st.composite
def scenarios(draw: st.DrawFn, max_actions: int = 12, benign: bool = False) -> Scenario:
    """A scenario; ``benign``: no loss, duplication, long delays, pauses or cancellations,
    and iblutil peers only echo."""
    stream = draw(st.booleans())
    n_core = draw(st.integers(1, 3))
    n_ibl = draw(st.integers(0, 2)) if n_core < 4 else 0
    if n_core + n_ibl < 2:
        n_core = 2
    core_kind = st.sampled_from(["core", "reliable"]) if not stream else st.just("core")
    kinds = [draw(core_kind) for _ in range(n_core)] + ["iblutil"] * n_ibl
    dual = [draw(st.booleans()) for _ in kinds]
    delays = st.just(0.002) if benign else st.sampled_from([0.002, 0.3, 2.5])
    rates = st.just(0.0) if benign else st.sampled_from([0.0, 0.0, 0.1, 0.3])
    if stream:
        net = Net(
            stream=True,
            delay_min=0.0002,
            delay_max=draw(delays),
            max_chunk=draw(st.sampled_from([1, 7, 64])),
        )
    else:
        net = Net(loss=draw(rates), dup=draw(rates), delay_min=0.0002, delay_max=draw(delays))
    if n_ibl and not stream and net.dup:
        # An iblutil peer echoes a duplicated echo back; such a ping-pong is cut when
        # its round trip is shorter than the core's bounce window (rule 5): a LAN.
        net.delay_max = min(net.delay_max, 0.004)
    n = len(kinds)
    actions = draw(
        st.lists(
            st.builds(
                Action,
                at=st.floats(0, 4, allow_nan=False),
                actor=st.integers(0, n - 1),
                kind=st.sampled_from(
                    ["confirmed", "post"]
                    if benign
                    else [
                        "confirmed",
                        "confirmed",
                        "confirmed",
                        "post",
                        "cancel",
                        "pause",
                        "restart",
                    ]
                ),
                target=st.integers(1, n - 1),
                payload=st.integers(0, len(PAYLOADS) - 1),
                timeout=st.integers(0, len(TIMEOUTS) - 1),
                arg=st.floats(0.1, 3.0, allow_nan=False),
            ),
            min_size=1,
            max_size=max_actions,
        )
    )
    if benign:
        actions = [a for a in actions if kinds[a.actor] != "iblutil"] or [
            Action(0.0, 0, "confirmed", 1, 0, 0, 1.0)
        ]
    return Scenario(stream, kinds, dual, net, actions, draw(st.integers(0, 2**32 - 1)))


def build(sc: Scenario) -> tuple[Sim, list[Node]]:
    sim = Sim(sc.seed, sc.net)
    nodes: list[Node] = []
    for i, kind in enumerate(sc.kinds):
        addr = (f"10.0.0.{i + 1}", 11001)
        if kind == "iblutil":
            node: Node = IblutilNode(f"n{i}", addr, dual_stack=sc.dual_stack[i])
        else:
            node = CoreNode(f"n{i}", addr, reliable=kind == "reliable", dual_stack=sc.dual_stack[i])
        sim.add(node)
        if isinstance(node, CoreNode):
            node.start(sc.seed + i)
        nodes.append(node)
    return sim, nodes


def schedule(sim: Sim, nodes: list[Node], sc: Scenario) -> None:
    n = len(nodes)
    for a in sc.actions:
        actor = nodes[a.actor]
        target = nodes[(a.actor + a.target) % n]
        # iblutil addresses a peer as its socket reports it (dual-stack: ::ffff:a.b.c.d);
        # a core accepts either form.
        dst = (
            actor.seen_as(target) if isinstance(actor, IblutilNode) or a.arg > 1.5 else target.addr
        )
        payload = PAYLOADS[a.payload]
        timeout = TIMEOUTS[a.timeout]
        if a.kind == "pause":
            sim.at(a.at, lambda actor=actor, s=a.arg: actor.pause(s))
        elif isinstance(actor, IblutilNode):
            # Two iblutil peers bounce with each other (their protocol's fault, not
            # ours): iblutil nodes only talk to cores.
            if a.kind == "confirmed" and isinstance(target, CoreNode):
                # iblutil code awaits one confirmed send at a time per peer.
                sim.at(
                    a.at,
                    lambda actor=actor, dst=dst, p=payload, t=timeout: (
                        None
                        if dst in actor.awaiting and not actor.awaiting[dst][1]
                        else actor.confirmed(dst, p.strip(), t)
                    ),
                )
        elif isinstance(actor, CoreNode):
            if a.kind == "confirmed":
                sim.at(
                    a.at,
                    lambda actor=actor, dst=dst, p=payload, t=timeout: actor.confirmed(dst, p, t),
                )
            elif a.kind == "post":
                sim.at(a.at, lambda actor=actor, dst=dst, p=payload: actor.post(dst, p))
            elif a.kind == "restart":
                sim.at(a.at, lambda actor=actor, seed=sc.seed + a.actor + 100: actor.restart(seed))
            else:
                sim.at(a.at, lambda actor=actor, i=a.target: actor.cancel(i))


def check(sim: Sim, nodes: list[Node], sc: Scenario) -> None:
    log = sim.log
    # 1. No storm. Each original transmission (and retransmission) reaches a peer at most
    # twice (duplication), each arrival causes at most one echo, echoes cause nothing
    # further; a ping-pong with an iblutil peer is cut after `bounce_after` rounds.
    retransmits = sum(n.c.stats.retransmits for n in nodes if isinstance(n, CoreNode))
    sent = log.originals + retransmits
    bound = 3 * sent + 2 * 2 * 33 * sent
    assert log.transmissions <= bound, (log.transmissions, sent)
    # 2. One dispatch per message at each end, and never one's own message. (An iblutil
    # peer dispatches a duplicated echo of its own message: its protocol's fault.)
    for node in nodes:
        if not isinstance(node, CoreNode):
            continue
        own = log.sent_by.get(node.name, set())
        for (name, ident), count in log.dispatches.items():
            if name != node.name:
                continue
            assert ident not in own, f"{name} dispatched its own message {ident}"
            # A core dispatches a message another core sent at most once, in any mode.
            # (iblutil has no duplicate detection: it dispatches every copy that arrives.)
            if ident[0] == "tag":
                assert count == 1, f"{name} dispatched {ident} {count} times"
    # 3. Every confirmed send ended exactly once (those of restarted instances included).
    for ident, ends in log.outcomes.items():
        assert len(ends) == 1, (ident, ends)
    # 4. Progress on a benign network.
    if sc.benign:
        for node in nodes:
            if isinstance(node, CoreNode):
                assert all(s.outcome is Outcome.CONFIRMED for s in node.sends), node.sends
        for node in nodes:
            for ident in log.sent_by.get(node.name, set()):
                if ident[0] != "tag":
                    continue
                receivers = [k for k, c in log.dispatches.items() if k[1] == ident]
                assert len(receivers) == 1, (ident, receivers)
    # 5. Bounded tables.
    for node in nodes:
        if isinstance(node, CoreNode):
            limits = node.c.limits
            for table, size in node.c.table_sizes().items():
                cap = {
                    "windows": limits.sessions,
                    "recent": limits.recent,
                    "streaks": 4 * limits.peers,
                }.get(table, limits.peers)
                if table != "pending":
                    assert size <= cap, (table, size)
                else:
                    assert size == 0, "a pending send outlived the run"


def run(sc: Scenario) -> Sim:
    sim, nodes = build(sc)
    schedule(sim, nodes, sc)
    finished = sim.run(until=10_000.0, max_events=200_000)
    assert finished, f"storm: over 200,000 events ({sim.log.transmissions} transmissions)"
    assert not sim._heap, "events still pending at the end of simulated time"
    check(sim, nodes, sc)
    return sim


# A few thousand scenarios by default; the "fuzz" profile (HYPOTHESIS_PROFILE=fuzz) runs
# as many as it asks for.
MANY = max(1500, settings.default.max_examples)


@settings(max_examples=MANY, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(scenarios())
def test_invariants_hold_in_every_scenario(sc: Scenario) -> None:
    run(sc)


@settings(max_examples=MANY // 5, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(scenarios(max_actions=40, benign=True))
def test_benign_networks_confirm_everything(sc: Scenario) -> None:
    assert sc.benign
    run(sc)


# ------------------------------------------------------ the cases of issue 11


def _pair(stream: bool = False, **net: float) -> tuple[Sim, CoreNode, CoreNode]:
    sim = Sim(1, Net(stream=stream, **net))
    a = CoreNode("main", ("10.0.0.1", 11001))
    b = CoreNode("rig", ("10.0.0.2", 11001))
    for i, node in enumerate((a, b)):
        sim.add(node)
        node.start(i)
    return sim, a, b


def test_late_echo_after_a_long_stall_does_not_bounce() -> None:
    """The rig stalls for 30 echo timeouts; its echo then arrives and is dropped, once."""
    for stream in (False, True):
        sim, main, rig = _pair(stream)
        rig.pause(30.0)
        main.confirmed(rig.addr, b"[1, null]", 1.0)
        assert sim.run(until=1000, max_events=1000)
        assert [s.outcome for s in main.sends] == [Outcome.TIMED_OUT]
        assert sim.log.dispatches[("rig", identity(main.sends[0].wire))] == 1
        assert not [k for k in sim.log.dispatches if k[0] == "main"]
        assert main.c.stats.late == 1
        assert sim.log.transmissions == 2  # the signal and its (late) echo, nothing more


def test_dual_stack_rig_confirms_its_completion() -> None:
    """A rig on a dual-stack socket sees the main PC as ::ffff:10.0.0.1 and still matches echoes."""
    sim = Sim(2, Net())
    main = sim.add(CoreNode("main", ("10.0.0.1", 11001)))
    rig = sim.add(CoreNode("rig", ("10.0.0.2", 11001), dual_stack=True))
    assert isinstance(main, CoreNode)
    assert isinstance(rig, CoreNode)
    main.start(1)
    rig.start(2)
    main.confirmed(rig.addr, b"[1, null]", 1.0)
    sim.run(until=1, max_events=100)
    # The rig answers to the address its socket reported.
    rig.confirmed(("::ffff:10.0.0.1", 11001), b"[1, null]", 1.0)
    assert sim.run(until=100, max_events=100)
    assert [s.outcome for s in main.sends + rig.sends] == [Outcome.CONFIRMED] * 2
    assert sim.log.transmissions == 4


def test_whitespace_framed_payload_matches_its_echo_over_tcp() -> None:
    sim, main, rig = _pair(stream=True)
    main.confirmed(rig.addr, b"[1, null]\n", 1.0)
    assert sim.run(until=100, max_events=100)
    assert [s.outcome for s in main.sends] == [Outcome.CONFIRMED]
    assert sim.log.transmissions == 2


def test_duplicated_echo_to_an_iblutil_peer_is_cut() -> None:
    """iblutil takes a duplicated echo for a new message and echoes it: the ping-pong is cut."""
    sim = Sim(3, Net(dup=1.0))  # every datagram arrives twice
    main = sim.add(CoreNode("main", ("10.0.0.1", 11001)))
    rig = sim.add(IblutilNode("rig", ("10.0.0.2", 11001)))
    assert isinstance(main, CoreNode)
    assert isinstance(rig, IblutilNode)
    main.start(1)
    rig.confirmed(main.addr, b'[1, {"rig": "video"}]', 1.0)
    assert sim.run(until=1000, max_events=100_000)
    assert not sim._heap
    assert main.c.stats.bounces >= 1
    assert sim.log.transmissions < 2000


def tagged_arrivals(limits: Limits) -> Callable[[int], Received]:
    """``arrive(seq)`` for a new receiving core: a trio-rignet peer's message number
    ``seq`` reaches it; the core's verdict."""
    rig = EchoCore(stream=False, session=1, limits=limits)
    sender = Tagger(7)
    peer = ("10.0.0.1", 11001)

    def arrive(seq: int) -> Received:
        return rig.receive(peer, sender.tag(b"[1, %d]" % seq, seq & 0xFFFFFFFF, None), 0.0)[0]

    return arrive


def test_a_message_whose_copies_were_lost_past_the_window_is_still_new() -> None:
    """Rule 3 at its edges, with small tables: a message first received after more than
    a window of newer ones is new (it cannot have been dispatched); repeats stay repeats;
    once the recent table has forgotten numbers, anything below them is dropped."""
    limits = Limits(window=8, recent=16)
    arrive = tagged_arrivals(limits)

    assert [arrive(seq) for seq in range(1, 13) if seq != 2] == [Received.NEW] * 11
    assert arrive(2) is Received.NEW  # 10 behind the window's top: never seen, new
    assert arrive(2) is Received.DUPLICATE  # and now remembered
    assert arrive(12) is Received.DUPLICATE
    for seq in range(13, 40):  # the recent table (16) forgets 1..23
        assert arrive(seq) is Received.NEW
    assert arrive(3) is Received.STALE  # may have been dispatched: dropped
    assert arrive(30) is Received.DUPLICATE  # within the window
    # A peer that forgot us restarts its numbers far away: new messages again.
    assert arrive(39 - (1 << 20)) is Received.NEW


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 150), max_size=400))
def test_a_peer_message_is_dispatched_at_most_once_and_never_missed(arrivals: list[int]) -> None:
    """Rule 3 as a property, over any order and repetition of a trio-rignet peer's
    messages (loss, duplication and reordering beyond the window), with small tables:

    - each message is dispatched (NEW) at most once;
    - its first arrival is NEW as long as the recent table has forgotten nothing
      (every message received so far still fits in it), however far behind the
      window it arrives;
    - a repeat is echoed again (DUPLICATE) or, past its re-echo budget, dropped
      (STALE): never NEW."""
    limits = Limits(window=8, recent=64)
    arrive = tagged_arrivals(limits)
    dispatched: set[int] = set()
    for seq in arrivals:
        verdict = arrive(seq)
        first = seq not in dispatched
        if verdict is Received.NEW:
            assert first, f"message {seq} dispatched twice"
            dispatched.add(seq)
        elif first and len(dispatched) < limits.recent:
            raise AssertionError(f"first arrival of {seq} not dispatched: {verdict.name}")
        if not first and len(dispatched) <= limits.recent:
            assert verdict is Received.DUPLICATE or verdict is Received.STALE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 60), st.just(-1)), max_size=300))
def test_no_second_dispatch_when_a_flood_of_sessions_pushes_a_window_out(
    events: list[int],
) -> None:
    """Rule 3 under a full window table (found by the adversarial review: a neighbour
    sending thousands of tagged datagrams, each with a new session, pushed a rig's
    (peer, session) window out, and a retransmission of a signal was dispatched again).

    Invariant: whatever the flood (-1: five strangers' sessions arrive), each of the
    peer's messages is dispatched at most once."""
    limits = Limits(window=8, recent=32, sessions=4)
    rig = EchoCore(stream=False, session=1, limits=limits)
    sender = Tagger(7)
    peer = ("10.0.0.1", 11001)
    stranger = ("10.0.0.66", 11001)
    next_session = 1000
    dispatched: set[int] = set()
    for seq in events:
        if seq < 0:
            for _ in range(5):
                next_session += 1
                rig.receive(stranger, Tagger(next_session).tag(b"[1, 0]", 1, None), 0.0)
            continue
        verdict = rig.receive(peer, sender.tag(b"[1, %d]" % seq, seq, None), 0.0)[0]
        if verdict is Received.NEW:
            assert seq not in dispatched, f"message {seq} dispatched twice"
            dispatched.add(seq)


def test_a_dropped_window_leaves_its_floor_with_the_peer() -> None:
    """The example behind the property: dispatched, window pushed out, then repeats of it
    (remembered: echoed again; forgotten: dropped) and newer messages (new)."""
    limits = Limits(window=8, recent=4, sessions=2)
    rig = EchoCore(stream=False, session=1, limits=limits)
    sender = Tagger(7)
    peer = ("10.0.0.1", 11001)

    def arrive(seq: int) -> Received:
        return rig.receive(peer, sender.tag(b"[2, %d]" % seq, seq, None), 0.0)[0]

    assert arrive(5) is Received.NEW
    for session in (100, 101):  # the table holds two windows: the peer's is dropped
        rig.receive(("10.0.0.66", 1), Tagger(session).tag(b"[1, 0]", 1, None), 0.0)
    assert arrive(5) is Received.DUPLICATE  # still in the recent table
    for session in (102, 103, 104, 105):  # ...which forgets it too
        rig.receive(("10.0.0.66", 1), Tagger(session).tag(b"[1, 0]", 1, None), 0.0)
    assert arrive(5) is Received.STALE  # may have been dispatched: dropped
    assert arrive(4) is Received.STALE
    assert arrive(6) is Received.NEW  # newer than anything the dropped window saw
    assert arrive(6) is Received.DUPLICATE


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=200))
def test_a_first_arrival_within_the_window_is_always_new(arrivals: list[int]) -> None:
    """Rule 3's other half, when the recent table is smaller than a window (a main PC
    hearing from many rigs forgets each rig's messages while they are still within its
    window): a message whose number is within the window of the highest one received
    and which has never been received is new, whatever was forgotten."""
    limits = Limits(window=8, recent=4)
    arrive = tagged_arrivals(limits)
    received: set[int] = set()
    for seq in arrivals:
        verdict = arrive(seq)
        high = max(received, default=seq)
        if seq not in received and high - seq < limits.window:
            assert verdict is Received.NEW, f"first arrival of {seq} (high {high}): {verdict.name}"
        if seq in received:
            assert verdict is not Received.NEW, f"message {seq} dispatched twice"
        received.add(seq)


# Found by the second adversarial review (rule 3 at the edges of its tables), each
# an example of its own; the property below covers them together.
_P = ("10.0.0.1", 11001)
_STRANGER = ("10.0.0.66", 1)


def _arrive(core: EchoCore, seq: int, session: int = 7, ext: bool = False) -> Received:
    body = b'[{"hb": %d}]' % (seq & 0xFFFF) if ext else b"[1, %d]" % (seq & 0xFFFF)
    return core.receive(_P, Tagger(session).tag(body, seq & 0xFFFFFFFF, None), 0.0)[0]


def _flood(core: EchoCore, first_session: int, count: int) -> None:
    for session in range(first_session, first_session + count):
        core.receive(_STRANGER, Tagger(session).tag(b"[1, 0]", 1, None), 0.0)


def test_a_peer_that_draws_its_numbers_anew_still_gets_repeats_recognised() -> None:
    """A sender that drew a new counter still retransmits the sends it had pending:
    their copies are repeats, not new messages, in either order."""
    core = EchoCore(stream=False, session=1)
    assert [_arrive(core, s) for s in (100_000, 1, 100_000)] == [
        Received.NEW,
        Received.NEW,
        Received.DUPLICATE,
    ]
    assert _arrive(core, 1) is Received.DUPLICATE


def test_a_dropped_window_is_remembered_per_session() -> None:
    """Two sessions of one peer (it restarted), both windows pushed out: a late copy of
    the old session's message is not dispatched again."""
    core = EchoCore(stream=False, session=1, limits=Limits(window=8, recent=2, sessions=2))
    assert _arrive(core, 5, session=7) is Received.NEW
    assert _arrive(core, 1, session=8) is Received.NEW
    _flood(core, 100, 2)
    assert _arrive(core, 5, session=7) is Received.STALE


def test_a_dropped_window_does_not_silence_a_peer_that_drew_its_numbers_anew() -> None:
    """The floor a dropped window leaves applies to the 65,536 numbers below its
    highest, as within a window: a counter drawn anew far below is new."""
    limits = Limits(window=8, recent=2, sessions=2)
    core = EchoCore(stream=False, session=1, limits=limits)
    assert _arrive(core, 1_000_000_000) is Received.NEW
    _flood(core, 100, 2)
    assert [_arrive(core, s) for s in range(100_000, 100_005)] == [Received.NEW] * 5


def test_forgetting_a_number_of_a_previous_counter_raises_no_floor() -> None:
    """After a counter drawn anew, the recent table forgetting the old counter's
    numbers must not drop first arrivals of the new one."""
    core = EchoCore(stream=False, session=1, limits=Limits(window=8, recent=64))
    assert all(_arrive(core, s) is Received.NEW for s in range(100_000, 100_010))
    assert all(_arrive(core, s) is Received.NEW for s in range(1, 61) if s != 30)
    assert _arrive(core, 30) is Received.NEW


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("msg"), st.integers(0, 60)),
            st.tuples(st.sampled_from(["flood", "heartbeats"]), st.integers(1, 6)),
        ),
        max_size=120,
    ),
    st.sampled_from([(8, 4, 2), (8, 16, 3), (4, 64, 2), (16, 6, 4)]),
)
def test_at_most_once_with_heartbeats_floods_and_the_wrap(
    events: list[tuple[str, int]], sizes: tuple[int, int, int]
) -> None:
    """Rule 3 with everything at once (after the review's fuzzer): a peer's signals and
    heartbeats share one counter that wraps past 2**32, while one stranger floods new
    sessions (signals or heartbeats) through small tables. Each signal is dispatched at
    most once, and the tables stay within their limits."""
    window, recent, sessions = sizes
    core = EchoCore(
        stream=False, session=1, limits=Limits(window=window, recent=recent, sessions=sessions)
    )
    base = (1 << 32) - 30
    dispatched: set[int] = set()
    next_session = 10_000
    for kind, n in events:
        if kind == "msg":
            ext = n % 3 == 0
            verdict = _arrive(core, base + n, ext=ext)
            if verdict is Received.NEW:
                assert n not in dispatched, f"signal {n} dispatched twice"
                dispatched.add(n)
            continue
        body = b'[{"hb": 0}]' if kind == "heartbeats" else b"[1, 0]"
        for _ in range(n):
            next_session += 1
            core.receive(_STRANGER, Tagger(next_session).tag(body, 1, None), 0.0)
        sizes_now = core.table_sizes()
        assert sizes_now["windows"] <= sessions
        assert sizes_now["recent"] <= recent


def test_limits_are_checked() -> None:
    """A table of no entries is a configuration error, said at once (it raised a
    KeyError from inside the core on the first message)."""
    with pytest.raises(ValueError, match="sessions"):
        Limits(sessions=0)
    with pytest.raises(ValueError, match="bounce_window"):
        Limits(bounce_window=0)
