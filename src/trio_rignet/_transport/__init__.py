"""UDP and TCP transports: the only code that touches sockets.

A transport delivers each framed message to a :class:`Handler` and writes
bytes to an address; it knows nothing of echoes or events. It is a
structured task: :meth:`Transport.run` opens its sockets, receives in the task
that calls it (the endpoint's own), starts any other task (a TCP server's
connections, an outbox writer once a message has to wait) in a task group of
its own, and closes everything when cancelled.

Two backends share the rules (:mod:`._outbox`, :mod:`._tcp`):

- on Trio, non-blocking standard sockets driven by Trio's native
  ``wait_readable``/``wait_writable`` (native on Windows too);
- on asyncio, asyncio's own transports and protocols, which every event loop
  implements natively, Windows' ProactorEventLoop included (no ``add_reader``,
  no selector thread).

Receiving never waits on writing: the handler is called synchronously and
whatever it sends is queued (:class:`~._outbox.Outbox`).
"""

from __future__ import annotations

import asyncio
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
from anyio.abc import TaskStatus

__all__ = [
    "UDP_MAX_PAYLOAD",
    "Address",
    "Handler",
    "Role",
    "Transport",
    "TransportConfig",
    "open_transport",
]

Address = tuple[str, int]
Role = Literal["client", "server"]

UDP_MAX_PAYLOAD = 65507
"""The largest UDP payload over IPv4."""


class Handler(Protocol):
    """What a transport calls, synchronously, from its receive tasks or callbacks."""

    def _received(self, raw: bytes, addr: Address) -> None:
        """One complete message arrived from ``addr``."""

    def _peer_lost(self, addr: Address, reason: str) -> None:
        """``addr`` cannot be reached any more (disconnected or refused)."""

    def _accepts(self, addr: Address) -> bool:
        """May ``addr`` connect (TCP accept filter)?"""


@dataclass(frozen=True)
class TransportConfig:
    """Resource bounds of a transport (see :class:`~trio_rignet.EndpointOptions`)."""

    max_message_size: int = 1 << 20
    reconnect: bool = False
    max_connections: int = 256
    pace: float = 0.05
    read_timeout: float = 10.0
    out_limit: int = 1 << 20


class Transport(ABC):
    """A bound or connected socket (or a listener and its connections)."""

    kind: Literal["udp", "tcp"]

    def __init__(self, role: Role, host: str, port: int, config: TransportConfig) -> None:
        self.role = role
        self.host = host
        self.port = port
        self.config = config
        self.local_address: Address = ("", 0)
        self._closed = False
        self._connected: Any = None  # an Event, made when someone waits

    @property
    def peer(self) -> Address:
        """The remote address of a client transport."""
        return (self.host, self.port)

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True while the transport can send."""

    async def wait_connected(self) -> None:
        """Wait until :attr:`is_connected` (at once for UDP and servers) or closed.

        Cancellation: nothing to undo.
        """
        while not self.is_connected and not self._closed:
            if self._connected is None:
                self._connected = anyio.Event()
            await self._connected.wait()

    def _set_connected(self, up: bool) -> None:
        """Connected (``up``) or not; also call with True when closing (wakes waiters)."""
        if up:
            if self._connected is not None:
                self._connected.set()
                self._connected = None
        elif self._connected is not None and self._connected.is_set():
            self._connected = None

    @abstractmethod
    async def run(self, handler: Handler, *, task_status: TaskStatus[None]) -> None:
        """Open, report ``started`` once sends are possible, serve until cancelled, close.

        Raises ``OSError`` (or :class:`~trio_rignet.PeerUnavailable` for a TCP
        client without ``reconnect``) if opening fails.
        """

    @abstractmethod
    def transmit(self, data: bytes, addr: Address, owner: Any = None) -> bool:
        """Write or queue one message to ``addr``; never blocks.

        ``owner`` is the confirmed send the message belongs to (None for an
        echo or reply). Returns False if the message was dropped because the
        outbox is full (only ever for ``owner=None``).

        Raises:
            PeerUnavailable: not connected, closed, or the peer refused it.
            ValueError: a datagram too large to send.
        """

    @abstractmethod
    def has_room(self, addr: Address) -> bool:
        """True if a confirmed send to ``addr`` may be transmitted without waiting."""

    @abstractmethod
    async def wait_room(self, addr: Address) -> None:
        """Wait until :meth:`has_room` (or until the peer is gone).

        Cancellation: nothing to undo.
        """

    @abstractmethod
    def abandon(self, owner: Any) -> None:
        """``owner``'s sender stopped waiting: withdraw its unsent message.

        If part of it was written already, the connection is closed instead
        (with a log line), so the stream never holds half a message.
        """

    def release(self, addr: Address, owner: Any) -> None:  # noqa: B027 (optional hook)
        """The peer at ``addr`` echoed ``owner``'s message (TCP pacing)."""

    def trust(self, addr: Address) -> None:  # noqa: B027 (optional hook)
        """The peer at ``addr`` runs trio-rignet and frames messages: stop pacing it."""


def _running_trio() -> bool:
    trio = sys.modules.get("trio")  # not imported: not running under Trio
    if trio is None:
        return False
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return False
    return True


def clock() -> Callable[[], float]:
    """The running event loop's clock, looked up once.

    The same time as ``anyio.current_time()``, which looks the backend up on
    every call: the hot paths keep this function instead. On Trio it is the
    run's clock's own method (what ``trio.current_time()`` calls, through two
    more Python calls; a ``MockClock`` in tests is honoured).
    """
    if _running_trio():
        import trio

        return trio.lowlevel.current_clock().current_time
    return asyncio.get_running_loop().time


class Waiter(Protocol):
    """What a confirmed send waits on: woken when the send ends, or at a deadline."""

    def set(self) -> None:
        """Wake the waiting task (the send ended); harmless when repeated."""

    async def wait(self, deadline: float) -> None:
        """Return once :meth:`set` was called, or at ``deadline`` (loop time), whichever is first.

        The caller then looks at its send: this says nothing of how it ended.
        Cancellation: nothing is left behind (no timer, no callback).
        """


def waiter_class() -> Callable[[], Waiter]:
    """The running backend's :class:`Waiter`, looked up once per endpoint.

    On Trio it is trio's own ``Event`` in a ``CancelScope`` (several times
    cheaper than AnyIO's wrappers); on asyncio a future and one timer, not an
    AnyIO cancel scope and event (whose bookkeeping was most of an asyncio
    client's time with many sends in flight).
    """
    if _running_trio():
        from . import _trio as backend
    else:
        from . import _asyncio as backend  # type: ignore[no-redef]
    return backend.Waiter


def open_transport(
    kind: str, role: Role, host: str, port: int, config: TransportConfig
) -> Transport:
    """An unopened transport for ``kind`` (``"udp"`` or ``"tcp"``) on the running backend."""
    if _running_trio():
        from . import _trio as backend
    else:
        from . import _asyncio as backend  # type: ignore[no-redef]
    if kind == "udp":
        return backend.UDPTransport(role, host, port, config)
    return backend.TCPTransport(role, host, port, config)
