"""``EchoProtocol``: an endpoint that sends echo-confirmed signals and echoes what it receives.

Structure: each endpoint is an async context manager owning a task group. The
transport's receive task(s) run in an inner task group that :meth:`aclose`
cancels; leaving the ``async with`` block closes the endpoint, waits for every
task and closes every socket.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ._errors import (
    EchoTimeout,
    EndpointClosed,
    MessageError,
    PeerNotAllowed,
    PeerUnavailable,
)
from ._events import Callback, Events
from ._framing import DEFAULT_MAX_MESSAGE_SIZE
from ._groups import collapse_single
from ._messages import (
    AlyxLike,
    ExpMessage,
    ExpStatus,
    Message,
    build_alyx,
    build_cleanup,
    build_error,
    build_info,
    build_init,
    build_start,
    build_status,
    build_stop,
    encode,
    parse_message,
)
from ._reliability import PeerFilter, RateLimit, Recent, nonce
from ._transport import UDP_MAX_PAYLOAD, Address, Role, Transport, open_transport
from ._uri import normalize_host, resolve_uri, split_uri

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EchoProtocol", "EchoStats", "EndpointOptions"]

log = logging.getLogger("trio_rignet.echo")

StatusLike: TypeAlias = "str | int | ExpStatus"


class _Waiter:
    """One confirmed send waiting for its echo.

    An Event plus a result slot rather than a memory channel: a value handed to
    a channel's waiting receiver is lost if the receiver's deadline fires before
    it resumes (possible on asyncio), whereas ``done`` stays readable after any
    cancellation.
    """

    __slots__ = ("done", "event", "result")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.done = False
        self.result: BaseException | None = None


_LATE_ECHOES = 4096
"""Payloads remembered per endpoint whose echo may still arrive after giving up."""
_LATE_TTL = 60.0
_DEDUP_TTL = 30.0
_RTO_MIN = 0.01


class EndpointOptions(TypedDict, total=False):
    """Options of :meth:`EchoProtocol.server` and :meth:`EchoProtocol.client`.

    Attributes:
        echo_timeout: default seconds to wait for an echo (1.0).
        max_message_size: longest TCP message accepted from a peer (1 MiB).
        reliable: UDP only, both ends trio-rignet: retransmit unechoed messages
            with exponential backoff within the echo timeout, and re-echo a
            retransmitted message without dispatching it twice (see the
            reliability page for what an iblutil peer sees).
        allow: listening endpoints: accept messages only from these IP
            addresses or networks (``["10.0.0.2", "10.0.1.0/24"]``); anything
            else is never echoed or dispatched, and logged at a limited rate.
        reconnect: TCP clients: reconnect in the background after the server
            closes the connection (sends fail with PeerUnavailable meanwhile).
        max_connections: TCP servers: connections served at once (256).
    """

    echo_timeout: float | None
    max_message_size: int
    reliable: bool
    allow: Iterable[str] | None
    reconnect: bool
    max_connections: int


@dataclass
class EchoStats:
    """Counters of one endpoint (reset never; read any time).

    Attributes:
        sent: messages sent (confirmed, unconfirmed and error reports).
        received: messages received, echoes included.
        echoed: received messages echoed back.
        confirmed: confirmed sends whose echo arrived.
        timeouts: confirmed sends that timed out.
        dropped: received messages dropped as malformed.
        refused: messages ignored from hosts outside the ``allow`` list.
        retransmits: reliable mode: messages sent again for want of an echo.
        duplicates: reliable mode: retransmitted messages re-echoed, not dispatched.
        rtt_count: echo round trips measured.
        rtt_total: sum of echo round-trip times, seconds.
        rtt_min: shortest round trip, seconds (``inf`` before the first).
        rtt_max: longest round trip, seconds.
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
    rtt_count: int = 0
    rtt_total: float = 0.0
    rtt_min: float = math.inf
    rtt_max: float = 0.0

    @property
    def rtt_mean(self) -> float:
        """Mean echo round-trip time in seconds (``nan`` before the first)."""
        return self.rtt_total / self.rtt_count if self.rtt_count else math.nan


class EchoProtocol(Events):
    """An endpoint of the echo protocol over UDP or TCP.

    Do not instantiate directly: use :meth:`server` or :meth:`client`, which
    return async context managers::

        async with EchoProtocol.client("udp://10.0.0.2:11001", name="video") as video:
            await video.init({"subject": "mouse1"})

    In the ``"server"`` role the URI is the local address to bind or listen on,
    and every send names the peer ``addr``; in the ``"client"`` role the URI is
    the one remote host this endpoint talks to (iblutil's naming).
    """

    default_echo_timeout: float = 1.0
    """Seconds to wait for an echo when no timeout is passed (class default)."""

    def __init__(
        self,
        server_uri: str,
        role: Role,
        *,
        name: str | None = None,
        logger: logging.Logger | None = None,
        echo_timeout: float | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        reliable: bool = False,
        allow: Iterable[str] | None = None,
        reconnect: bool = False,
        max_connections: int = 256,
    ) -> None:
        super().__init__()
        if role not in ("client", "server"):
            raise ValueError(f'role must be "server" or "client", not {role!r}')
        self._server_uri = server_uri
        self._role: Role = role
        self.name: str = name or server_uri
        """An arbitrary label used in logs and errors (defaults to the URI)."""
        self.logger: logging.Logger = logger or log
        """The logger this endpoint writes to (``trio_rignet.echo`` by default)."""
        if echo_timeout is not None:
            self.default_echo_timeout = _check_timeout(echo_timeout)
        parts = split_uri(server_uri)
        self._parts = parts
        self._peer: Address = (parts.host, parts.port)
        self._transport: Transport = open_transport(
            parts.transport,
            role,
            parts.host,
            parts.port,
            max_message_size=max_message_size,
            reconnect=reconnect,
            max_connections=max_connections,
        )
        self._reliable = reliable and parts.transport == "udp"
        self._filter = None if allow is None else PeerFilter(allow)
        self._rng = random.Random()
        self._pending: dict[tuple[Address, bytes], list[_Waiter]] = {}
        self._addr_cache: dict[Address, Address] = {}
        # (peer, bytes) whose echo may still come after the send stopped waiting
        self._late = Recent(_LATE_ECHOES, _LATE_TTL)
        # reliable mode: (peer, bytes) recently handled, to recognise retransmissions
        self._handled = Recent(_LATE_ECHOES * 4, _DEDUP_TTL)
        self._known_peers: set[Address] = set()
        self._refused_log = RateLimit()
        self._stats = EchoStats()
        self._tg: TaskGroup | None = None
        self._closing = False
        self._stopped = anyio.Event()

    # ------------------------------------------------------------------ opening

    @classmethod
    def server(
        cls,
        server_uri: str,
        *,
        name: str | None = None,
        logger: logging.Logger | None = None,
        **options: Unpack[EndpointOptions],
    ) -> contextlib.AbstractAsyncContextManager[EchoProtocol]:
        """Bind (UDP) or listen (TCP) on the local ``server_uri`` and talk to any peer.

        Port 0 binds a free port: read it from :attr:`local_address`.

        Args:
            server_uri: local address, e.g. ``"udp://0.0.0.0:11001"`` or
                ``"ws://127.0.0.1:0"`` (``ws://`` and ``tcp://`` are plain TCP).
            name: a label for logs and errors.
            logger: logger to use instead of ``trio_rignet.echo``.
            options: see :class:`EndpointOptions` (``echo_timeout``,
                ``max_message_size``, ``reliable``, ``allow``,
                ``max_connections``).

        Raises:
            ValueError, TypeError: invalid URI.
            OSError: the address cannot be bound.
        """
        return cls._open(server_uri, "server", name, logger, options)

    @classmethod
    def client(
        cls,
        server_uri: str,
        *,
        name: str | None = None,
        logger: logging.Logger | None = None,
        **options: Unpack[EndpointOptions],
    ) -> contextlib.AbstractAsyncContextManager[EchoProtocol]:
        """Talk to the one remote host at ``server_uri``.

        Over TCP this connects first; over UDP nothing is sent until you send.
        Arguments as for :meth:`server` (options: ``echo_timeout``,
        ``max_message_size``, ``reliable``, ``reconnect``).

        Raises:
            ValueError, TypeError: invalid URI.
            PeerUnavailable: a TCP connection was refused.
        """
        return cls._open(server_uri, "client", name, logger, options)

    @classmethod
    @asynccontextmanager
    async def _open(
        cls,
        server_uri: str,
        role: Role,
        name: str | None,
        logger: logging.Logger | None,
        options: EndpointOptions,
    ) -> AsyncIterator[EchoProtocol]:
        uri = await resolve_uri(server_uri)
        self = cls(uri, role, name=name, logger=logger, **options)
        with collapse_single():
            async with anyio.create_task_group() as tg:
                await tg.start(self._run)
                try:
                    yield self
                finally:
                    await self.aclose()

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        transport = self._transport
        try:
            await transport.open()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                transport.start(tg, self)
                if self._role == "server":
                    self.logger.info(
                        "[%s] listening on %s", self.name, self.uri_of(transport.local_address)
                    )
                task_status.started()
                # Stay open until aclose(), even if a TCP client's connection
                # drops: sends then fail with PeerUnavailable, not EndpointClosed.
                await anyio.sleep_forever()
        finally:
            self._closing = True
            self._fail_all(EndpointClosed(f"{self.name}: endpoint closed"))
            with anyio.CancelScope(shield=True):
                await transport.aclose()
            self._stopped.set()

    async def aclose(self) -> None:
        """Close the endpoint: stop its tasks, close its sockets, fail pending waits.

        Idempotent. Pending confirmed sends, :meth:`on_event` calls and
        subscriptions end with :class:`~trio_rignet.EndpointClosed`. Leaving the
        ``async with`` block calls this.

        Cancellation: the endpoint is closed whatever happens; if the caller is
        cancelled while waiting for the tasks to finish, they still finish
        before the ``async with`` block exits.
        """
        if not self._closing:
            self._closing = True
            self._fail_all(EndpointClosed(f"{self.name}: endpoint closed"))
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
        await self._stopped.wait()

    def _fail_all(self, exc: BaseException) -> None:
        for waiters in self._pending.values():
            for waiter in waiters:
                _resolve(waiter, exc)
        self._pending.clear()
        self._close_subscriptions()

    # --------------------------------------------------------------- properties

    @property
    def role(self) -> Role:
        """``"client"`` or ``"server"``."""
        return self._role

    @property
    def server_uri(self) -> str:
        """The validated URI: the peer for a client, the local address for a server."""
        return self._server_uri

    @property
    def hostname(self) -> str:
        """Host (IP address) of :attr:`server_uri`."""
        return self._parts.host

    @property
    def port(self) -> int:
        """Port of :attr:`server_uri` (0 if a server asked for any free port)."""
        return self._parts.port

    @property
    def protocol(self) -> str:
        """The URI scheme: ``"udp"``, ``"ws"``, ``"wss"`` or ``"tcp"``."""
        return self._parts.scheme

    @property
    def local_address(self) -> Address:
        """``(host, port)`` actually bound: the real port when port 0 was asked for."""
        return self._transport.local_address

    @property
    def is_connected(self) -> bool:
        """True while open (a TCP client: while its connection is up)."""
        return not self._closing and self._transport.is_connected

    async def wait_connected(self) -> None:
        """Wait until :attr:`is_connected`: for a TCP client with ``reconnect``, until it
        has reconnected. Returns at once for UDP, servers, and connected clients.

        Raises:
            EndpointClosed: the endpoint closed first.

        Cancellation: nothing to undo.
        """
        await self._transport.wait_connected()
        self._check_open()

    @property
    def stats(self) -> EchoStats:
        """Message counters and echo round-trip times."""
        return self._stats

    def uri_of(self, addr: Address) -> str:
        """Return ``addr`` as a URI with this endpoint's scheme."""
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"{self.protocol}://{host}:{addr[1]}"

    def awaiting_response(self, addr: Address | None = None) -> bool:
        """True if a confirmed send (to ``addr``, or to anyone) awaits its echo."""
        if addr is None:
            return any(self._pending.values())
        addr = self._normalize(addr)
        return any(waiters for (a, _), waiters in self._pending.items() if a == addr)

    def __repr__(self) -> str:
        return f"<EchoProtocol {self._role} {self.name!r} {self._server_uri}>"

    # ------------------------------------------------------------------ sending

    def _target(self, addr: Address | None) -> Address:
        if self._role == "server":
            if not addr:
                raise TypeError(
                    "a server endpoint talks to many peers: pass addr=(host, port) of the peer"
                )
            return self._normalize(addr)
        if addr is None:
            return self._peer
        norm = self._normalize(addr)
        if norm != self._peer:
            raise ValueError(
                f"Unexpected remote address {addr!r}: this client talks only to {self._peer!r}; "
                "omit addr"
            )
        return norm

    def _normalize(self, addr: Address) -> Address:
        cached = self._addr_cache.get(addr)
        if cached is not None:
            return cached
        try:
            host, port = addr
            norm = (normalize_host(host), int(port))
        except (TypeError, ValueError):
            raise TypeError(
                f"addr must be a (host, port) tuple with an IP address, got {addr!r}"
            ) from None
        if len(self._addr_cache) < 1024:
            self._addr_cache[addr] = norm
        return norm

    def _check_open(self) -> None:
        if self._closing:
            raise EndpointClosed(f"{self.name}: endpoint is closed")

    def _check_size(self, payload: bytes) -> None:
        if self._transport.kind == "udp" and len(payload) > UDP_MAX_PAYLOAD:
            raise ValueError(
                f"message of {len(payload)} bytes exceeds the UDP limit of {UDP_MAX_PAYLOAD} "
                "bytes; use a ws:// (TCP) URI for large messages"
            )

    async def send(self, data: Any, addr: Address | None = None) -> None:
        """Send a message without waiting for its echo.

        ``data`` is encoded with :func:`~trio_rignet.encode` (bytes pass
        through). Cancellation: the message was sent or not, nothing is left
        registered.

        Raises:
            TypeError, ValueError: as :meth:`confirmed_send`.
            PeerUnavailable: the peer cannot be reached.
        """
        self._check_open()
        target = self._target(addr)
        payload = encode(data)
        self._check_size(payload)
        await anyio.lowlevel.checkpoint()
        # The peer echoes the message back: expect that echo (registered before
        # sending, so it cannot arrive first) and swallow it, instead of taking
        # it for a new message and echoing it again (an endless ping-pong).
        # Error reports are never echoed.
        key = (target, payload)
        expect_echo = not payload.startswith(b"[0,")
        if expect_echo:
            # Short-lived: if the echo is lost, an identical message the peer sends
            # later must not be swallowed in its place.
            self._late.add(key, anyio.current_time(), ttl=2 * self.default_echo_timeout)
        try:
            await self._transport.send(payload, target)
        except BaseException:
            if expect_echo:
                self._late.take(key, anyio.current_time())
            raise
        self._stats.sent += 1

    async def confirmed_send(
        self, data: Any, addr: Address | None = None, timeout: float | None = None
    ) -> None:
        """Send a message and wait until the peer echoes it back.

        Several confirmed sends may be in flight at once, to one peer or many.
        The signal methods (:meth:`init`, :meth:`start`, ...) call this.

        Args:
            data: the message (encoded with :func:`~trio_rignet.encode`).
            addr: the peer ``(host, port)``; required for a server, optional for
                a client (and then it must be the client's peer).
            timeout: seconds to wait for the echo (default
                :attr:`default_echo_timeout`).

        Raises:
            EchoTimeout: no echo within ``timeout``; the endpoint stays usable.
            PeerUnavailable: the peer disconnected or refuses datagrams.
            EndpointClosed: the endpoint was closed meanwhile.
            TypeError: a server was not given ``addr``.
            ValueError: ``addr`` is not a client's peer, ``timeout`` is not
                positive, or a UDP message is over 65507 bytes.

        Cancellation: the message may or may not have been sent; the wait for
        its echo is removed, so a late echo is ignored.
        """
        self._check_open()
        target = self._target(addr)
        timeout = self.default_echo_timeout if timeout is None else _check_timeout(timeout)
        payload = encode(data)
        self._check_size(payload)
        await self._confirmed_send(payload, target, timeout)

    async def _confirmed_send(
        self,
        payload: bytes,
        target: Address,
        timeout: float,
        on_sent: Callable[[], object] | None = None,
    ) -> None:
        """Confirmed send of checked arguments; ``on_sent()`` runs once the bytes are out."""
        if self._reliable:
            payload += nonce(self._rng)
        waiter = _Waiter()
        key = (target, payload)
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = [waiter]
        else:
            waiters.append(waiter)
        stats = self._stats
        start = anyio.current_time()
        try:
            await self._transport.send(payload, target)
            stats.sent += 1
            if on_sent is not None:
                on_sent()
            # fail_after's semantics with a bare cancel scope: no context-manager
            # generator on the hot path.
            with anyio.CancelScope(deadline=start + timeout) as scope:
                if self._reliable:
                    await self._retransmit(waiter, payload, target, timeout)
                else:
                    await waiter.event.wait()
            # The echo may have been delivered just as the deadline hit.
            if scope.cancelled_caught and not waiter.done:
                stats.timeouts += 1
                raise EchoTimeout(self.name, target, timeout)
        finally:
            if not waiter.done:
                # No echo came (timeout, cancellation or error): remember the
                # payload so a late echo is swallowed instead of being taken
                # for a new message and echoed back (an endless ping-pong with
                # a peer that is no longer waiting either).
                waiter.done = True
                waiters = self._pending.get(key)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._pending[key]
                    self._bury(key)
        if waiter.result is not None:
            raise waiter.result
        rtt = anyio.current_time() - start
        stats.confirmed += 1
        stats.rtt_count += 1
        stats.rtt_total += rtt
        stats.rtt_min = min(stats.rtt_min, rtt)
        stats.rtt_max = max(stats.rtt_max, rtt)

    def _bury(self, key: tuple[Address, bytes]) -> None:
        self._late.add(key, anyio.current_time(), uses=1 << 30 if self._reliable else 1)

    async def _retransmit(
        self, waiter: _Waiter, payload: bytes, target: Address, timeout: float
    ) -> None:
        """Wait for the echo, resending with exponential backoff (reliable mode).

        The first resend comes after 4x the mean round trip (at least 10 ms);
        the interval doubles up to an eighth of the timeout, so a send keeps
        being retried until its timeout however slow the first round trips were.
        """
        stats = self._stats
        rto = max(_RTO_MIN, 4 * stats.rtt_mean) if stats.rtt_count else 4 * _RTO_MIN
        max_rto = max(4 * _RTO_MIN, timeout / 8)
        while True:
            with anyio.move_on_after(min(rto, max_rto)):
                await waiter.event.wait()
            if waiter.done:
                return
            await self._transport.send(payload, target)
            stats.sent += 1
            stats.retransmits += 1
            rto *= 2

    async def init(self, data: Any = None, addr: Address | None = None) -> None:
        """Signal EXPINIT ``[1, data]`` and wait for its echo.

        Raises and cancellation as :meth:`confirmed_send`.
        """
        await self.confirmed_send(build_init(data), addr)

    async def start(
        self, exp_ref: str | Mapping[str, Any] | None, data: Any = None, addr: Address | None = None
    ) -> None:
        """Signal EXPSTART ``[2, exp_ref, data]`` and wait for its echo.

        ``exp_ref`` is ``"yyyy-mm-dd_n_subject"`` or a dict with ``date``,
        ``sequence`` and ``subject``. Raises and cancellation as :meth:`confirmed_send`.
        """
        await self.confirmed_send(build_start(exp_ref, data), addr)

    async def stop(
        self, data: Any = None, immediately: bool = False, addr: Address | None = None
    ) -> None:
        """Signal EXPEND ``[4, data]`` (EXPINTERRUPT ``[16, data]`` if ``immediately``).

        Raises and cancellation as :meth:`confirmed_send`.
        """
        await self.confirmed_send(build_stop(data, immediately), addr)

    async def cleanup(self, data: Any = None, addr: Address | None = None) -> None:
        """Signal EXPCLEANUP ``[8, data]`` and wait for its echo.

        Raises and cancellation as :meth:`confirmed_send`.
        """
        await self.confirmed_send(build_cleanup(data), addr)

    async def status(self, status: StatusLike, addr: Address | None = None) -> None:
        """Send EXPSTATUS ``[32, status]`` and wait for its echo.

        Raises and cancellation as :meth:`confirmed_send`.
        """
        await self.confirmed_send(build_status(status), addr)

    async def info(self, status: StatusLike, data: Any = None, addr: Address | None = None) -> None:
        """Send EXPINFO ``[64, status, data]`` and wait for its echo.

        Raises and cancellation as :meth:`confirmed_send`.
        """
        await self.confirmed_send(build_info(status, data), addr)

    def _may_receive_token(self, target: Address) -> bool:
        if self._filter is not None:
            return self._filter.allows(target[0])
        return target in self._known_peers

    async def alyx(
        self, alyx: AlyxLike | None = None, addr: Address | None = None
    ) -> tuple[str | None, dict[str, Any]] | None:
        """Send a logged-in Alyx client's token, or request one from the peer.

        With a logged-in ``alyx`` (duck-typed: ``base_url``, ``user``,
        ``_token``, ``is_logged_in``) this sends ``[128, base_url, {user: token}]``
        and returns None. Otherwise it sends a request ``[128, base_url, {}]``
        and waits, without timeout (wrap in ``anyio.fail_after``), for the peer's
        ALYX message, returning ``(base_url, {user: token})``.

        The token travels in clear text on the iblutil wire format: use it on
        a trusted network only. A server endpoint sends a token only to a peer
        in its ``allow`` list, or (without one) to a peer it has already
        received a message from.

        Raises:
            PeerNotAllowed: a server was asked to send a token to a stranger.

        Cancellation: as :meth:`confirmed_send`; a pending request's wait for the
        reply is unregistered.
        """
        payload = build_alyx(alyx)
        if alyx is not None and alyx.is_logged_in and alyx.base_url:
            target = self._target(addr)
            if self._role == "server" and not self._may_receive_token(target):
                raise PeerNotAllowed(
                    target,
                    "an Alyx token is only sent to a peer this endpoint already talks to "
                    "(one in its allow list, or one it has received a message from)",
                )
            await self.confirmed_send(payload, target)
            return None
        target = self._target(addr)
        async with self._subscribe((int(ExpMessage.ALYX),), target) as replies:
            await self.confirmed_send(payload, target)
            async for msg in replies:
                base_url = msg.data[0] if msg.data else None
                token = msg.data[1] if len(msg.data) > 1 and isinstance(msg.data[1], dict) else {}
                return base_url, token
        raise EndpointClosed(f"{self.name}: endpoint closed while awaiting an Alyx token")

    # ---------------------------------------------------------------- receiving

    async def _message_received(self, raw: bytes, addr: Address) -> None:
        """Transport callback: route an echo to its waiter, else echo and dispatch."""
        self._stats.received += 1
        if self._filter is not None and not self._filter.allows(addr[0]):
            self._stats.refused += 1
            if self._refused_log.ready(anyio.current_time()):
                self.logger.warning(
                    "[%s] ignored %d message(s) from %s, which is not in the allow list",
                    self.name,
                    self._refused_log.take(),
                    self.uri_of(addr),
                )
            return
        key = (addr, raw)
        waiters = self._pending.get(key)
        if waiters:
            # An echo: wake the oldest sender of these bytes to this peer.
            while waiters:
                if _resolve(waiters.pop(0), None):
                    break
            if not waiters:
                del self._pending[key]
            if self._reliable:
                # Duplicated or retransmitted echoes may follow: swallow them.
                # (Here, not in the sender, which runs only later.)
                self._late.add(key, anyio.current_time(), uses=1 << 30)
            return
        if self._late and self._late.take(key, anyio.current_time()):
            # The echo of a send that already gave up waiting (or, in reliable
            # mode, a duplicate of an echo that already arrived).
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("[%s] late echo from %s ignored: %r", self.name, addr, raw)
            return
        if self._reliable and self._handled.seen(key, anyio.current_time()):
            # A retransmission of a message already handled: echo it again (the
            # first echo was lost), do not dispatch it twice.
            self._stats.duplicates += 1
            await self._echo(raw, addr)
            return
        try:
            msg = parse_message(raw, addr)
        except MessageError as exc:
            self._stats.dropped += 1
            self.logger.warning(
                "[%s] dropped a malformed message from %s: %s", self.name, self.uri_of(addr), exc
            )
            return
        if msg.event:
            if self._reliable:
                self._handled.add(key, anyio.current_time())
            await self._echo(raw, addr)
        else:
            self.logger.error(
                "[%s] %s reported an error handling %s: %s",
                self.name,
                self.uri_of(addr),
                _event_name(msg.data[1]),
                msg.data[0],
            )
        if self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug("[%s] received %r from %s", self.name, raw, self.uri_of(addr))
        if len(self._known_peers) < _LATE_ECHOES:
            self._known_peers.add(addr)
        await self._dispatch(msg)

    async def _echo(self, raw: bytes, addr: Address) -> None:
        try:
            await self._transport.send(raw, addr)
        except PeerUnavailable as exc:
            self.logger.warning("[%s] could not echo to %s: %s", self.name, addr, exc)
        else:
            self._stats.echoed += 1
            self._stats.sent += 1

    def _allows(self, addr: Address) -> bool:
        """Transport callback: may ``addr`` connect (TCP) or send to this endpoint?"""
        return self._filter is None or self._filter.allows(addr[0])

    async def _report_callback_error(
        self, callback: Callback, msg: Message, exc: Exception
    ) -> None:
        self.logger.error(
            "[%s] callback %r for %s failed: %s: %s",
            self.name,
            callback,
            msg.event.name,
            type(exc).__name__,
            exc,
        )
        if msg.event and msg.addr is not None:
            try:
                await self._transport.send(build_error(exc, msg.event), msg.addr)
                self._stats.sent += 1
            except PeerUnavailable as send_exc:
                self.logger.warning(
                    "[%s] could not report the error to %s: %s", self.name, msg.addr, send_exc
                )

    def _peer_lost(self, addr: Address, reason: str) -> None:
        """Transport callback: fail every pending send to ``addr`` at once."""
        exc = PeerUnavailable(addr, reason)
        self.logger.info("[%s] %s: %s", self.name, self.uri_of(addr), reason)
        for key in [k for k in self._pending if k[0] == addr]:
            for waiter in self._pending.pop(key):
                _resolve(waiter, exc)


def _event_name(code: int) -> str:
    try:
        return ExpMessage(code).name or str(code)
    except ValueError:
        return str(code)


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"Timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _resolve(waiter: _Waiter, value: BaseException | None) -> bool:
    """Deliver ``value`` (None: echoed) to a confirmed send's waiter; False if it is done."""
    if waiter.done:
        return False
    waiter.done = True
    waiter.result = value
    waiter.event.set()
    return True
