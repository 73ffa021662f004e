"""Liveness of trio-rignet peers: heartbeats, and ``up``/``lost``/``back`` changes.

A main PC (:class:`~trio_rignet.Services`) pings each of its rigs that runs
trio-rignet every ``interval`` seconds on the extension channel
(:mod:`._extensions`); a rig that has not answered for ``lost_after`` seconds
is ``lost``, and ``back`` when it answers again (``restarted`` if with a new
session: the rig process was started again, and is re-attached without
restarting the main PC). A rig (:class:`~trio_rignet.RigService`) sees its
main PCs the same way through the pings it receives.

Heartbeats go only to rigs known to run trio-rignet: those whose messages
carried a trio-rignet tag, and those declared by the user; iblutil rigs never
receive one. One task pings every rig (not a task per rig).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from ._errors import EndpointClosed, PeerUnavailable

if TYPE_CHECKING:
    from ._echo import EchoProtocol

__all__ = ["Change", "Watchers", "heartbeat", "watch_pings"]

ChangeKind = Literal["up", "lost", "back"]


@dataclass(frozen=True)
class Change:
    """A peer's liveness changed.

    Attributes:
        peer: the rig's name (on a main PC), or a main PC's URI (on a rig).
        kind: ``"up"`` (first heard), ``"lost"`` (silent for ``lost_after``),
            ``"back"`` (heard again after ``lost``).
        restarted: for ``"back"``: the peer answered with a new session
            (its process was started again).
        at: when it was noticed, on the event loop's clock.
    """

    peer: str
    kind: ChangeKind
    restarted: bool
    at: float


class _Changes:
    """One consumer's changes: a bounded buffer (oldest dropped first) and an event."""

    __slots__ = ("_event", "_queue")

    def __init__(self, max_buffer: int) -> None:
        self._queue: deque[Change] = deque(maxlen=max_buffer)
        self._event = anyio.Event()

    def put(self, change: Change) -> None:
        self._queue.append(change)
        self._event.set()

    def __aiter__(self) -> _Changes:
        return self

    async def __anext__(self) -> Change:
        while not self._queue:
            if self._event.is_set():
                self._event = anyio.Event()
            await self._event.wait()
        return self._queue.popleft()


class Watchers:
    """The consumers of :class:`Change` events."""

    def __init__(self, max_buffer: int = 1024) -> None:
        self.max_buffer = max_buffer
        self._consumers: list[_Changes] = []

    def notify(self, change: Change) -> None:
        for consumer in self._consumers:
            consumer.put(change)

    @asynccontextmanager
    async def watch(self) -> AsyncIterator[AsyncIterator[Change]]:
        """Changes from now on, as an async iterator, until the block is left.

        Registered on entry. At most ``max_buffer`` changes wait for a slow
        consumer; older ones are dropped first.
        """
        consumer = _Changes(self.max_buffer)
        self._consumers.append(consumer)
        try:
            await anyio.lowlevel.checkpoint()
            yield consumer
        finally:
            self._consumers.remove(consumer)


@dataclass
class _Seen:
    """What the heartbeat knows of one peer."""

    alive: bool | None = None
    session: int | None = None


def _judge(
    seen: _Seen, name: str, heard: float | None, session: int | None, now: float, lost_after: float
) -> Change | None:
    """The change, if any, for a peer last heard at ``heard`` with ``session``."""
    alive = heard is not None and now - heard <= lost_after
    change: Change | None = None
    if alive and seen.alive is None:
        change = Change(name, "up", False, now)
    elif alive and seen.alive is False:
        restarted = seen.session is not None and session != seen.session
        change = Change(name, "back", restarted, now)
    elif not alive and seen.alive:
        change = Change(name, "lost", False, now)
    if alive:
        seen.session = session
    if alive or seen.alive is not None:
        seen.alive = alive
    return change


async def heartbeat(
    rigs: Mapping[str, EchoProtocol],
    declared: Collection[str],
    interval: float,
    lost_after: float,
    notify: Callable[[Change], None],
    alive: dict[str, bool | None],
) -> None:
    """Ping every trio-rignet rig each ``interval``; report changes; runs until cancelled.

    ``alive`` is kept up to date (rig name -> True, False, or None if unknown).
    """
    seen = {name: _Seen() for name in rigs}
    while True:
        now = anyio.current_time()
        for name, rig in rigs.items():
            try:
                known = name in declared or rig.is_trio_peer()
            except EndpointClosed:
                continue
            if not known:
                continue
            status = rig.peer_status()
            heard = None if status is None else status.last_heard
            session = None if status is None else status.session
            change = _judge(seen[name], name, heard, session, now, lost_after)
            alive[name] = seen[name].alive
            if change is not None:
                notify(change)
            # A TCP rig that is down: its heartbeat resumes once it reconnects.
            with contextlib.suppress(PeerUnavailable, EndpointClosed):
                rig.ping()
        await anyio.sleep(interval)


async def watch_pings(
    endpoint: EchoProtocol, lost_after: float, notify: Callable[[Change], None]
) -> None:
    """On a rig: report changes of the main PCs that ping it; runs until cancelled."""
    seen: dict[tuple[str, int], _Seen] = {}
    while True:
        now = anyio.current_time()
        for peer, status in endpoint.peer_statuses().items():
            entry = seen.get(peer)
            if entry is None:
                if len(seen) >= 1024:
                    seen.pop(next(iter(seen)))
                entry = seen[peer] = _Seen()
            change = _judge(
                entry, endpoint.uri_of(peer), status.last_heard, status.session, now, lost_after
            )
            if change is not None:
                notify(change)
        await anyio.sleep(lost_after / 4)
