"""TCP bookkeeping shared by both backends: connections, the cap, eviction, reconnecting.

Bounds (so that no peer can make an endpoint refuse real rigs or hold memory):

- Each connection frames its input with a :class:`~trio_rignet.StreamDecoder`
  (at most ``max_message_size`` buffered) and has its own bounded outbox.
- A peer that sends part of a message and then nothing for
  ``read_timeout`` seconds is disconnected.
- A peer that does not read what we send is disconnected when an echo to it
  no longer fits its outbox's cap, or when nothing could be written to it
  for ``read_timeout`` seconds while messages wait.
- At ``max_connections``, a new connection evicts an idle one: first those
  that never sent a whole message (oldest first), then the one idle longest.
  Only if every connection is busy is the new one refused.
- A reconnecting client backs off exponentially; the delay resets only after
  a connection has stayed up for ``HEALTHY_AFTER`` seconds, so a server that
  accepts and drops at once is not redialled in a tight loop.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from typing import Any

import anyio
from anyio.abc import TaskStatus

from .._errors import FramingError, PeerUnavailable
from .._framing import StreamDecoder
from .._ratelimit import RateLimit
from .._uri import canonical_address
from . import Address, Handler, Transport, clock
from ._outbox import Outbox

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "HEALTHY_AFTER", "Connection", "TCPBase"]

log = logging.getLogger("trio_rignet.transport")

BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
HEALTHY_AFTER = 5.0
CONNECT_TIMEOUT = 5.0
READ_SIZE = 16384
"""Bytes read from a connection at a time."""


class Connection:
    """One TCP connection: peer, framing, outbox and liveness, whatever the backend.

    ``abort`` closes the underlying socket or transport at once (idempotent).
    """

    __slots__ = (
        "abort",
        "closed",
        "decoder",
        "io",
        "last_active",
        "now",
        "opened",
        "outbox",
        "peer",
        "reason",
        "scope",
        "talked",
    )

    def __init__(self, addr: Address, decoder: StreamDecoder, outbox: Outbox) -> None:
        outbox.conn = self
        self.peer = canonical_address(addr)
        self.decoder = decoder
        self.outbox = outbox
        self.now = clock()
        self.opened = self.last_active = self.now()
        self.talked = False
        self.closed = False
        self.reason = "closed the connection"
        self.scope: anyio.CancelScope | None = None
        self.abort: Any = None
        self.io: Any = None  # the backend's socket or transport

    @property
    def idle(self) -> bool:
        """Nothing half-received and nothing waiting to be written."""
        return not self.decoder.buffered and not self.outbox.queued

    def feed(self, chunk: bytes | bytearray | memoryview, handler: Handler) -> None:
        """Frame ``chunk`` (not kept) and hand each whole message to ``handler``.

        Raises:
            FramingError: the stream cannot be framed.
        """
        self.last_active = self.now()
        peer = self.peer
        for raw in self.decoder.feed(chunk):
            self.talked = True
            handler._received(raw, peer)

    def close(self, reason: str | None = None) -> None:
        """Close now; ``reason`` (if given) is what the peer's loss is logged as."""
        if reason is not None and not self.closed:
            self.reason = reason
        self.closed = True
        if self.scope is not None:
            self.scope.cancel()
        if self.abort is not None:
            self.abort()


class TCPBase(Transport):
    """A listener and its connections (server), or one connection (client)."""

    kind = "tcp"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conns: dict[Address, Connection] = {}
        self._client: Connection | None = None
        self._refused_log = RateLimit()

    # ------------------------------------------------------------ backend hooks

    @abstractmethod
    async def _connect(self) -> Connection:
        """Connect to the client's peer (bounded by ``CONNECT_TIMEOUT``); raise OSError."""

    @abstractmethod
    async def _serve(self, conn: Connection, handler: Handler) -> None:
        """Run ``conn`` until it ends (EOF, error, timeout, eviction) or is cancelled."""

    # ------------------------------------------------------------- connections

    @property
    def is_connected(self) -> bool:
        if self._closed:
            return False
        if self.role == "server":
            return bool(self.local_address[1])
        return self._client is not None and not self._client.closed

    def _admit(self, conn: Connection, handler: Handler) -> bool:
        """Register an accepted connection, evicting an idle one at the cap."""
        if not handler._accepts(conn.peer):
            self._refuse(conn.peer, "not in the allow list")
            return False
        if len(self._conns) >= self.config.max_connections:
            victim = self._victim()
            if victim is None:
                self._refuse(conn.peer, f"{len(self._conns)} connections, all busy")
                return False
            log.info(
                "TCP connection from %s closed to make room for %s (%s)",
                _fmt(victim.peer),
                _fmt(conn.peer),
                "it never sent a message" if not victim.talked else "it was idle longest",
            )
            victim.close("was idle and closed to make room for a new connection")
        old = self._conns.get(conn.peer)
        if old is not None:
            old.close("was replaced by a new connection from the same address")
        self._conns[conn.peer] = conn
        return True

    def _victim(self) -> Connection | None:
        candidates = [c for c in self._conns.values() if c.idle and not c.closed]
        if not candidates:
            return None
        return min(candidates, key=lambda c: (c.talked, c.last_active))

    def _refuse(self, peer: Address, why: str) -> None:
        if self._refused_log.ready(anyio.current_time()):
            log.warning(
                "TCP connection from %s refused (%s; %d refused lately)",
                _fmt(peer),
                why,
                self._refused_log.take(),
            )

    def _forget(self, conn: Connection) -> None:
        if self._conns.get(conn.peer) is conn:
            del self._conns[conn.peer]
        if conn is self._client:
            self._set_connected(False)

    def _lookup(self, addr: Address) -> Connection | None:
        """The connection to ``addr`` (any form of the address), if any."""
        if self.role == "client":
            return self._client
        conns = self._conns
        conn = conns.get(addr)  # the canonical form: what connections hand the handler
        return conns.get(canonical_address(addr)) if conn is None else conn

    def _conn(self, addr: Address) -> Connection:
        conn = self._lookup(addr)
        if conn is None or conn.closed:
            if self._closed:
                raise PeerUnavailable(addr, "the endpoint is closed")
            raise PeerUnavailable(addr, "not connected (the TCP connection is down)")
        return conn

    def _read_deadline(self, conn: Connection) -> float:
        """When a half-received message times out (``inf`` if none is pending)."""
        return conn.last_active + self.config.read_timeout if conn.decoder.buffered else math.inf

    def _outbox(self, write: Any, wait_writable: Any, unflushed: Any = None) -> Outbox:
        """The outbox of a new connection, with this transport's bounds."""
        config = self.config
        return Outbox(
            write,
            wait_writable,
            unflushed=unflushed,
            limit=config.out_limit,
            # Echoes may exceed the limit (they cannot wait): room for several
            # of the largest messages before the peer counts as not reading.
            cap=config.out_limit + 8 * config.max_message_size,
            stall=config.read_timeout,
            pace=config.pace,
        )

    def _stalled(self, conn: Connection) -> None:
        """``conn`` sent part of a message and then nothing for ``read_timeout``."""
        conn.close(
            f"sent {conn.decoder.buffered} bytes of a message and then nothing for "
            f"{self.config.read_timeout:g} s; disconnected"
        )
        log.warning("TCP peer %s %s", _fmt(conn.peer), conn.reason)

    def _unframeable(self, conn: Connection, exc: FramingError) -> None:
        conn.close(f"sent a stream that cannot be framed ({exc}); disconnected")
        log.warning("TCP peer %s %s", _fmt(conn.peer), conn.reason)

    def _ended(self, conn: Connection, handler: Handler) -> None:
        """Bookkeeping once a connection has ended: forget it, tell the handler."""
        conn.closed = True
        self._forget(conn)
        handler._peer_lost(conn.peer, conn.reason)

    # ----------------------------------------------------------------- sending

    def transmit(self, data: bytes, addr: Address, owner: Any = None) -> bool:
        conn = self._conn(addr)
        outbox = conn.outbox
        if owner is None and not outbox.fits(len(data)):
            conn.close(
                f"was disconnected: {outbox.queued} bytes were waiting to be written to it "
                "(it is not reading)"
            )
            log.warning("TCP peer %s %s", _fmt(conn.peer), conn.reason)
            return False
        try:
            outbox.put(data, None, owner)
        except OSError as exc:
            conn.close(f"connection lost ({exc})")
            raise PeerUnavailable(addr, "the TCP connection was lost") from exc
        return True

    def has_room(self, addr: Address) -> bool:
        return not self._conn(addr).outbox.full

    async def wait_room(self, addr: Address) -> None:
        await self._conn(addr).outbox.wait_room()

    def abandon(self, owner: Any) -> None:
        outbox = Outbox.of(owner)
        if outbox is not None and outbox.abandon(owner):
            conn: Connection = outbox.conn
            conn.close(
                "was disconnected: a message to it was cancelled part-way through "
                "writing, and the rest of the stream could not be framed"
            )
            log.warning("TCP peer %s %s", _fmt(conn.peer), conn.reason)

    def release(self, addr: Address, owner: Any) -> None:
        conn = self._lookup(addr)
        if conn is not None:
            conn.outbox.release(owner)

    def trust(self, addr: Address) -> None:
        conn = self._lookup(addr)
        if conn is not None:
            conn.outbox.trust()

    # ------------------------------------------------------------------ client

    async def _run_client(self, handler: Handler, task_status: TaskStatus[None]) -> None:
        """Connect (or, with ``reconnect``, keep trying in the background) and serve."""
        conn: Connection | None
        try:
            conn = await self._connect()
        except OSError as exc:
            if not self.config.reconnect:
                why = str(exc) or f"no answer within {CONNECT_TIMEOUT:g} s"  # a TimeoutError
                raise PeerUnavailable(self.peer, f"cannot connect over TCP: {why}") from exc
            log.info(
                "TCP connection to %s failed (%s); retrying in the background", _fmt(self.peer), exc
            )
            conn = None
        task_status.started()
        delay = BACKOFF_MIN
        while True:
            if conn is not None:
                self._client = conn
                self._set_connected(True)
                began = anyio.current_time()
                await self._serve(conn, handler)
                if not self.config.reconnect:
                    return
                if anyio.current_time() - began >= HEALTHY_AFTER:
                    delay = BACKOFF_MIN
            await anyio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                conn = await self._connect()
            except OSError:
                conn = None
                continue
            log.info("TCP client reconnected to %s", _fmt(self.peer))


def _fmt(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
