"""``EchoProtocol``: the I/O shell around the echo core.

An endpoint is an async context manager owning a task group. Inside it, the
transport (:mod:`._transport`) runs its receive and writer tasks and calls
:meth:`EchoProtocol._received` for every framed message; the endpoint asks the
core (:mod:`._core`) what each one is and carries out the answer: wake a
waiting send, echo, dispatch (:mod:`._events`), or drop with a log line.
Leaving the ``async with`` block cancels every task and closes every socket.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ._calls import Call, result_of, run_calls
from ._core import EchoCore, EchoStats, Outcome, Received, Send
from ._errors import (
    EchoTimeout,
    EndpointClosed,
    PeerNotAllowed,
    PeerUnavailable,
)
from ._events import Callback, EventLike, Events, Subscription, event_codes
from ._extensions import PeerStatus, PeerTable, build_ping, build_pong, parse_extension
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
)
from ._ratelimit import RateLimit
from ._transport import (
    UDP_MAX_PAYLOAD,
    Address,
    Role,
    TransportConfig,
    Waiter,
    clock,
    open_transport,
    waiter_class,
)
from ._uri import canonical_address, resolve_uri, split_uri

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["EchoProtocol", "EchoStats", "EndpointOptions", "StatusLike"]

log = logging.getLogger("trio_rignet.echo")

# Members as plain names: on the hot path, ``Received.ECHO`` costs an EnumType
# attribute lookup (a __getattr__ hook on Python 3.11).
_ECHO, _NEW = Received.ECHO, Received.NEW
_PENDING, _CONFIRMED = Outcome.PENDING, Outcome.CONFIRMED

StatusLike: TypeAlias = "str | int | ExpStatus"

TAG_ROOM = 64
"""Bytes a tag may add to a message (see :mod:`._tag`)."""


class EndpointOptions(TypedDict, total=False):
    """Options of an endpoint, accepted by :meth:`EchoProtocol.server`,
    :meth:`EchoProtocol.client`, :meth:`Services.open <trio_rignet.Services.open>`
    and :class:`~trio_rignet.RigService`.

    Attributes:
        echo_timeout: default seconds to wait for an echo, the write included (1.0).
        max_message_size: longest TCP message accepted from a peer (1 MiB).
        reliable: UDP between trio-rignet endpoints: retransmit unechoed
            messages with exponential backoff until the echo timeout (the
            receiver echoes repeats without dispatching them again).
        allow: accept messages (and TCP connections) only from these IP
            addresses or networks (``["10.0.0.2", "10.0.1.0/24"]``); anything
            else is never echoed or dispatched, and logged at a limited rate.
        reconnect: TCP clients: connect in the background if the server is
            down at open, and reconnect after the connection drops (sends fail
            with PeerUnavailable meanwhile).
        max_connections: TCP servers: connections served at once (256); at
            the cap an idle connection is closed to admit a new one.
        pace: TCP: seconds between two messages to a peer not known to run
            trio-rignet, unless it answered the first (0.05). iblutil reads a
            TCP stream without framing; see the protocol page.
        read_timeout: TCP: seconds a peer may leave a message half-sent (10).
        clock: the clock of the extension channel's timestamps (pings and
            pongs, hence clock offsets between trio-rignet peers): a function
            returning seconds, ``time.time`` by default. A rig recording with
            another clock passes that clock here.
    """

    echo_timeout: float | None
    max_message_size: int
    reliable: bool
    allow: Iterable[str] | None
    reconnect: bool
    max_connections: int
    pace: float
    read_timeout: float
    clock: Callable[[], float]


class EchoProtocol:
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
        options: EndpointOptions | None = None,
    ) -> None:
        if role not in ("client", "server"):
            raise ValueError(f'role must be "server" or "client", not {role!r}')
        opts: EndpointOptions = options or {}
        unknown = set(opts) - set(EndpointOptions.__annotations__)
        if unknown:
            raise TypeError(
                f"unknown endpoint option(s) {sorted(unknown)}; "
                f"the options are {sorted(EndpointOptions.__annotations__)}"
            )
        self._server_uri = server_uri
        self._role: Role = role
        self.name: str = name or server_uri
        """An arbitrary label used in logs and errors (defaults to the URI)."""
        self.logger: logging.Logger = logger or log
        """The logger this endpoint writes to (``trio_rignet.echo`` by default)."""
        echo_timeout = opts.get("echo_timeout")
        if echo_timeout is not None:
            self.default_echo_timeout = _check_timeout(echo_timeout)
        parts = split_uri(server_uri)
        self._parts = parts
        self._peer: Address = canonical_address((parts.host, parts.port))
        config = TransportConfig(
            max_message_size=_positive_int(
                "max_message_size", opts.get("max_message_size", DEFAULT_MAX_MESSAGE_SIZE)
            ),
            reconnect=bool(opts.get("reconnect", False)),
            max_connections=_positive_int("max_connections", opts.get("max_connections", 256)),
            pace=_non_negative("pace", opts.get("pace", 0.05)),
            read_timeout=_check_timeout(opts.get("read_timeout", 10.0)),
        )
        stream = parts.transport == "tcp"
        self._max_size = config.max_message_size if stream else UDP_MAX_PAYLOAD
        self._transport = open_transport(parts.transport, role, parts.host, parts.port, config)
        self._core = EchoCore(
            stream=stream,
            reliable=bool(opts.get("reliable", False)) and not stream,
            allow=opts.get("allow"),
        )
        self._events = Events(self.name, self.logger, self._report_failure)
        clock_ = opts.get("clock", time.time)
        if not callable(clock_):
            raise TypeError(f"clock must be a function returning seconds, got {clock_!r}")
        self._clock: Callable[[], float] = clock_
        self._peers = PeerTable()
        self.last_message: Message | None = None
        """The last message dispatched (received new, echoes excluded), or None."""
        self._log = RateLimit()
        self._addresses: dict[Any, Address] = {}
        self._tg: TaskGroup | None = None
        self._now = anyio.current_time  # the loop's own clock once running (see _run)
        self._waiter: Callable[[], Waiter] = _new_waiter  # the backend's own, once running
        self._closing = False
        self._stopped: Any = None  # an Event, made when aclose() must wait for the tasks
        self._finished = False

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
            options: see :class:`EndpointOptions`.

        Raises:
            ValueError, TypeError: invalid URI or option.
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

        Over TCP this connects first (with ``reconnect=True`` a server that is
        down is connected to in the background instead); over UDP nothing is
        sent until you send. Arguments as for :meth:`server`.

        Raises:
            ValueError, TypeError: invalid URI or option.
            PeerUnavailable: a TCP connection failed (without ``reconnect``).
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
        self = cls(uri, role, name=name, logger=logger, options=options)
        with collapse_single():
            async with anyio.create_task_group() as tg:
                await tg.start(self._run)
                if self._role == "server":
                    self.logger.info(
                        "[%s] listening on %s",
                        self.name,
                        self.uri_of(self._transport.local_address),
                    )
                try:
                    yield self
                finally:
                    await self.aclose()

    async def _run(self, *, task_status: TaskStatus[None]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._now = clock()
                self._waiter = waiter_class()
                self._events.start(tg.start_soon)
                # The transport runs in this task (one task per endpoint, not
                # two); it reports started once its sockets are open.
                await self._transport.run(self, task_status=task_status)
                # Stay open until aclose(), even if a TCP client's connection
                # drops: sends then fail with PeerUnavailable, not EndpointClosed.
                await anyio.sleep_forever()
        finally:
            self._shut()
            self._finished = True
            if self._stopped is not None:
                self._stopped.set()

    def _shut(self) -> None:
        self._closing = True
        for send in self._core.close():
            _wake(send)
        self._events.close()

    async def aclose(self) -> None:
        """Close the endpoint: stop its tasks, close its sockets, end pending waits.

        Idempotent. Pending confirmed sends, calls, :meth:`on_event` calls and
        subscriptions end with :class:`~trio_rignet.EndpointClosed`. Leaving
        the ``async with`` block calls this.

        Cancellation: the endpoint is closed whatever happens; if the caller is
        cancelled while waiting for the tasks to finish, they still finish
        before the ``async with`` block exits.
        """
        if not self._closing:
            self._shut()
            if self._tg is not None:
                self._tg.cancel_scope.cancel()
        if not self._finished:
            if self._stopped is None:
                self._stopped = anyio.Event()
            await self._stopped.wait()

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
    def max_message_size(self) -> int:
        """The largest message this endpoint sends (UDP: what fits one datagram)."""
        return self._max_size - TAG_ROOM

    @property
    def is_connected(self) -> bool:
        """True while open (a TCP client: while its connection is up)."""
        return not self._closing and self._transport.is_connected

    async def wait_connected(self) -> None:
        """Wait until :attr:`is_connected`: for a TCP client with ``reconnect``, until it
        has (re)connected. Returns at once for UDP, servers, and connected clients.

        Raises:
            EndpointClosed: the endpoint closed first.

        Cancellation: nothing to undo.
        """
        await self._transport.wait_connected()
        self._check_open()

    @property
    def stats(self) -> EchoStats:
        """Message counters and echo round-trip times."""
        return self._core.stats

    def is_trio_peer(self, addr: Address | None = None) -> bool:
        """True if the peer (``addr``, or a client's peer) has sent a message tagged
        by trio-rignet, so it runs trio-rignet (see the protocol page)."""
        return self._core.is_trio_peer(self._target(addr))

    def ping(self, addr: Address | None = None) -> None:
        """Send the peer a heartbeat ping (extension channel); its pong updates :meth:`peer_status`.

        Only for a peer that runs trio-rignet (:meth:`is_trio_peer`, or one you
        know does): an iblutil peer would echo it and print a warning.
        :class:`~trio_rignet.Services` pings its rigs itself.

        Raises:
            PeerUnavailable: the peer cannot be reached (e.g. TCP down).
            EndpointClosed: the endpoint is closed.
        """
        self._check_open()
        target = self._target(addr)
        t1 = self._clock()
        self._peers.get(target).pinged(t1)
        self._transport.transmit(self._core.post(target, build_ping(t1)), target)

    def peer_status(self, addr: Address | None = None) -> PeerStatus | None:
        """What the extension channel knows of the peer (None if it never answered or pinged)."""
        return self._peers.status(self._target(addr))

    def peer_statuses(self) -> dict[Address, PeerStatus]:
        """Every peer the extension channel knows, by address (a rig sees its main PCs here)."""
        return self._peers.statuses()

    def uri_of(self, addr: Address) -> str:
        """Return ``addr`` as a URI with this endpoint's scheme."""
        host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        return f"{self.protocol}://{host}:{addr[1]}"

    def awaiting_response(self, addr: Address | None = None) -> bool:
        """True if a confirmed send (to ``addr``, or to anyone) awaits its echo."""
        if addr is None:
            return self._core.pending()
        return self._core.pending(self._canonical(addr))

    def __repr__(self) -> str:
        return f"<EchoProtocol {self._role} {self.name!r} {self._server_uri}>"

    # ------------------------------------------------------------------ sending

    def _canonical(self, addr: Any) -> Address:
        """``addr`` checked and in canonical form (see :func:`canonical_address`)."""
        try:
            known = self._addresses.get(addr)
        except TypeError:  # unhashable
            known = None
        if known is not None:
            return known
        try:
            host, port = addr
            ipaddress.ip_address(str(host).partition("%")[0])
            if not 0 <= int(port) <= 65535:
                raise ValueError
            key = canonical_address((str(host), int(port)))
        except (TypeError, ValueError):
            raise TypeError(
                f"addr must be a (host, port) tuple with an IP address, got {addr!r}"
            ) from None
        if len(self._addresses) >= 1024:
            self._addresses.clear()
        self._addresses[addr] = key
        return key

    def _target(self, addr: Address | None) -> Address:
        if self._role == "server":
            if not addr:
                raise TypeError(
                    "a server endpoint talks to many peers: pass addr=(host, port) of the peer"
                )
            return self._canonical(addr)
        if addr is None:
            return self._peer
        target = self._canonical(addr)
        if target != self._peer:
            raise ValueError(
                f"Unexpected remote address {addr!r}: this client talks only to {self._peer!r}; "
                "omit addr"
            )
        return target

    def _check_open(self) -> None:
        if self._closing:
            raise EndpointClosed(f"{self.name}: endpoint is closed")

    def _payload(self, data: Any) -> bytes:
        payload = encode(data)
        if len(payload) > self._max_size - TAG_ROOM:  # max_message_size
            if self.protocol == "udp":
                raise ValueError(
                    f"a message of {len(payload)} bytes is too large for UDP (a datagram holds "
                    f"{UDP_MAX_PAYLOAD} bytes, {TAG_ROOM} of them kept for the tag); use a "
                    "ws:// (TCP) URI for large messages"
                )
            raise ValueError(
                f"a message of {len(payload)} bytes exceeds this endpoint's max_message_size "
                f"({self._max_size} bytes, {TAG_ROOM} of them kept for the tag)"
            )
        return payload

    async def send(
        self, data: Any, addr: Address | None = None, *, reply_to: Message | None = None
    ) -> None:
        """Send a message without waiting for its echo.

        ``data`` is encoded with :func:`~trio_rignet.encode` (bytes pass
        through) and must be a JSON array. Its echo, whenever it comes, is
        recognised and dropped. ``reply_to`` marks it as the answer to a
        received message (see :meth:`confirmed_send`).

        Raises:
            TypeError, ValueError: as :meth:`confirmed_send`.
            PeerUnavailable: the peer cannot be reached.

        Cancellation: the message was sent or not; nothing is left registered.
        """
        self._check_open()
        target = self._target(addr)
        payload = self._payload(data)
        transport = self._transport
        if not transport.has_room(target):
            await transport.wait_room(target)
        else:
            await anyio.lowlevel.checkpoint()
        self._check_open()
        transport.transmit(self._core.post(target, payload, reply_to=_ref(reply_to)), target)

    def send_nowait(
        self, data: Any, addr: Address | None = None, *, reply_to: Message | None = None
    ) -> bool:
        """Send a message now, without waiting for room or for its echo.

        For code that must not wait (a callback, a busy rig answering with an
        error report). Returns False if the message was dropped because too
        much is already waiting to be written to that peer (logged).

        Raises:
            TypeError, ValueError: as :meth:`confirmed_send`.
            EndpointClosed: the endpoint is closed.
        """
        self._check_open()
        target = self._target(addr)
        payload = self._payload(data)
        return self._transmit(self._core.post(target, payload, reply_to=_ref(reply_to)), target)

    async def confirmed_send(
        self,
        data: Any,
        addr: Address | None = None,
        timeout: float | None = None,
        *,
        reply_to: Message | None = None,
    ) -> None:
        """Send a message and wait until the peer echoes it back.

        Several confirmed sends may be in flight at once, to one peer or many.
        The signal methods (:meth:`init`, :meth:`start`, ...) call this.

        Args:
            data: the message, a JSON array (encoded with
                :func:`~trio_rignet.encode`; bytes pass through).
            addr: the peer ``(host, port)``; required for a server, optional for
                a client (and then it must be the client's peer).
            timeout: seconds for the whole send, writing included (default
                :attr:`default_echo_timeout`).
            reply_to: the received message this one answers: a trio-rignet
                peer then knows which of its calls it completes.

        Raises:
            EchoTimeout: no echo within ``timeout`` (or the peer did not read
                the message in time); the endpoint stays usable.
            PeerUnavailable: the peer disconnected or refuses datagrams.
            EndpointClosed: the endpoint was closed meanwhile.
            TypeError: a server was not given ``addr``.
            ValueError: ``addr`` is not a client's peer, ``timeout`` is not
                positive, the message is not a JSON array or is too large.

        Cancellation: the message was sent, or not, or (TCP) its connection is
        closed because it was cancelled part-way through writing; the wait
        for its echo is removed, and a late echo is recognised and dropped.
        """
        self._check_open()
        target = self._target(addr)
        timeout = self.default_echo_timeout if timeout is None else _check_timeout(timeout)
        payload = self._payload(data)
        await self._confirmed(
            payload, target, timeout, None if reply_to is None else _ref(reply_to)
        )

    async def _confirmed(
        self, payload: bytes, target: Address, timeout: float, reply_to: int | None = None
    ) -> Send:
        """Send ``payload`` to ``target`` and wait for its echo; the ended send."""
        transport = self._transport
        now = self._now()
        deadline = now + timeout
        if not transport.has_room(target):
            with anyio.CancelScope(deadline=deadline):
                await transport.wait_room(target)
            self._check_open()
            if not transport.has_room(target):
                self._core.stats.timeouts += 1
                raise EchoTimeout(
                    self.name, target, timeout, "the peer is not reading what is sent to it"
                )
            now = self._now()
        send = self._core.open_send(target, payload, now, deadline - now, reply_to=reply_to)
        send.waiter = waiter = self._waiter()
        core = self._core
        try:
            transport.transmit(send.wire, target, send)
            # Wait until the send ends, retransmitting when the core says so.
            while True:
                await waiter.wait(min(send.retry_at, send.deadline))  # send.wake_at
                if send.outcome is not _PENDING:
                    break
                resend = core.on_timer(send, self._now())
                if resend is not None:
                    self._transmit(resend, send.addr)
        except BaseException:
            if self._core.end(send, Outcome.CANCELLED):
                transport.abandon(send)
            raise
        outcome = send.outcome
        if outcome is _CONFIRMED:
            return send
        if outcome is Outcome.TIMED_OUT:
            transport.abandon(send)
            raise EchoTimeout(self.name, target, timeout)
        if outcome is Outcome.UNAVAILABLE:
            raise PeerUnavailable(target, send.reason or "the peer is unreachable or disconnected")
        raise EndpointClosed(f"{self.name}: endpoint closed")

    def _transmit(self, data: bytes, addr: Address) -> bool:
        """Write an echo, reply or retransmission; log and drop it if it cannot go."""
        try:
            return self._transport.transmit(data, addr)
        except (PeerUnavailable, ValueError) as exc:
            if self._log.ready(anyio.current_time()):
                self.logger.warning(
                    "[%s] could not send to %s: %s", self.name, self.uri_of(addr), exc
                )
            return False

    def new_call(
        self,
        data: Any,
        addr: Address | None = None,
        *,
        event: EventLike | None = None,
        echo_timeout: float | None = None,
        timeout: float | None = 10.0,
    ) -> Call:
        """A call of :meth:`call`, to run with others in one task by
        :func:`~trio_rignet.run_calls` (how :class:`~trio_rignet.Services`
        signals every rig at once).

        Arguments and the checks made here as for :meth:`call`; nothing is sent
        until :func:`~trio_rignet.run_calls`.
        """
        self._check_open()
        target = self._target(addr)
        payload = self._payload(data)
        code = _event_of(payload) if event is None else int(ExpMessage.validate(event, False))
        echo = self.default_echo_timeout if echo_timeout is None else _check_timeout(echo_timeout)
        if timeout is not None:
            timeout = _check_timeout(timeout)
        parts = (self._core, self._events, self._transport, self._transmit)
        return Call(self.name, parts, target, payload, code, echo, timeout)

    async def call(
        self,
        data: Any,
        addr: Address | None = None,
        *,
        event: EventLike | None = None,
        echo_timeout: float | None = None,
        timeout: float | None = 10.0,
    ) -> Message:
        """Signal the peer and wait for its completion update: the primitive of
        :class:`~trio_rignet.Services`.

        Sends ``data`` (a message of event E) as :meth:`confirmed_send` does,
        then waits for the peer's next message of event E, its completion
        update, and returns it. The wait is registered before anything is
        sent, so an instant reply is not missed. If the peer runs trio-rignet
        its completion names the signal it answers, so a late completion of
        an earlier, cancelled call is not taken for this call's; from an
        iblutil peer the next message of event E is the completion.

        Args:
            data: the signal, e.g. ``build_init(...)`` bytes or ``[1, None]``.
            addr: as for :meth:`confirmed_send`.
            event: the signal's event (read from ``data`` if not given).
            echo_timeout: seconds for the echo, the write included (default
                :attr:`default_echo_timeout`).
            timeout: seconds for the completion after the echo (None: no limit).

        Raises:
            EchoTimeout, PeerUnavailable, EndpointClosed, TypeError, ValueError:
                as :meth:`confirmed_send`.
            RemoteError: the peer reported that handling the signal failed.
            CompletionTimeout: no completion update within ``timeout``.

        Cancellation: as :meth:`confirmed_send`; the wait for the completion is
        removed, and a completion arriving later is an ordinary message.
        """
        one = self.new_call(data, addr, event=event, echo_timeout=echo_timeout, timeout=timeout)
        await run_calls([one])
        return result_of(one)

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
        in its ``allow`` list, or (without one) to a peer that has echoed one
        of its messages or sent it one lately.

        Raises:
            PeerNotAllowed: a server was asked to send a token to a stranger.

        Cancellation: as :meth:`confirmed_send`; a pending request's wait for the
        reply is unregistered.
        """
        payload = build_alyx(alyx)
        target = self._target(addr)
        if alyx is not None and alyx.is_logged_in and alyx.base_url:
            if self._role == "server" and not self._may_receive_token(target):
                raise PeerNotAllowed(
                    target,
                    "an Alyx token is only sent to a peer this endpoint already talks to "
                    "(one in its allow list, or one it has exchanged messages with)",
                )
            await self.confirmed_send(payload, target)
            return None
        replies = self._events.subscribe((int(ExpMessage.ALYX),), target)
        try:
            await self.confirmed_send(payload, target)
            msg = await replies.get()
        finally:
            replies.close()
        base_url = msg.data[0] if msg.data else None
        token = msg.data[1] if len(msg.data) > 1 and isinstance(msg.data[1], dict) else {}
        return base_url, token

    def _may_receive_token(self, target: Address) -> bool:
        core = self._core
        if core.filter is not None:
            return core.filter.allows(target[0])
        return core.knows(target)

    # ------------------------------------------------------------------- events

    @asynccontextmanager
    async def subscribe(
        self, event: EventLike, *, addr: Address | None = None, max_buffer: int = 1024
    ) -> AsyncIterator[Subscription]:
        """Receive every message of ``event`` (or of any of ``a | b``) from now on.

        Registered on entry, so nothing that arrives after entering the block
        is missed::

            async with rig.subscribe(ExpMessage.EXPSTART | ExpMessage.EXPEND) as messages:
                async for msg in messages:
                    ...

        Args:
            event: an event or a bitwise combination; ``0`` for error reports.
            addr: only messages from this peer.
            max_buffer: messages held while the consumer lags; beyond that new
                ones are dropped with a warning (the receive loop never blocks).

        The iterator ends when the endpoint closes. Leaving the block (also by
        cancellation) unregisters the subscription; undelivered messages are
        discarded.
        """
        with self.subscription(event, addr=addr, max_buffer=max_buffer) as sub:
            await anyio.lowlevel.checkpoint()
            yield sub

    def subscription(
        self, event: EventLike, *, addr: Address | None = None, max_buffer: int = 1024
    ) -> Subscription:
        """Register a subscription now, synchronously; close it when done.

        The same as :meth:`subscribe` for code that must register several
        waits before its first checkpoint (as :class:`~trio_rignet.Services`
        does for every rig)::

            with rig.subscription("start") as starts:
                ...
                msg = await starts.get()

        Raises:
            EndpointClosed: the endpoint is closed.
        """
        self._check_open()
        codes = event_codes(event)
        peer = None if addr is None else self._canonical(addr)
        return self._events.subscribe(codes, peer, max_buffer)

    async def on_event(self, event: EventLike) -> Message:
        """Wait for the next message of ``event`` (or of any event in ``a | b``).

        Registered when called; to be sure not to miss a reply to something
        you send, use :meth:`subscribe` around the send (or :meth:`call`).
        No timeout: wrap in ``anyio.fail_after``.

        Raises:
            EndpointClosed: the endpoint closed first.

        Cancellation: the wait is unregistered.
        """
        self._check_open()
        sub = self._events.subscribe(event_codes(event))
        try:
            return await sub.get()
        finally:
            sub.close()

    def assign_callback(self, event: EventLike, callback: Callback) -> None:
        """Call ``callback(message)`` for every message of ``event`` (or ``a | b``).

        Plain functions run inline on the receive path (keep them short);
        async functions run as tasks in the endpoint's task group (at most
        1,024 at once) and never block receiving. If a callback raises, the
        error is logged, the sender gets an error report
        ``[0, "Type: text", event]``, and the other callbacks still run.

        Raises:
            TypeError: ``callback`` is not callable, or ``event`` is invalid.
            ValueError: ``event`` is unknown.
        """
        self._events.assign(event, callback)

    def clear_callbacks(self, event: EventLike, callback: Callback | None = None) -> int:
        """Remove ``callback`` (or all callbacks) for ``event``; return how many were removed."""
        return self._events.clear(event, callback)

    # ---------------------------------------------------- transport callbacks

    def _received(self, raw: bytes, addr: Address) -> None:
        """A framed message arrived: handle it; a failure is logged, never fatal.

        Whatever a peer sends must not end the endpoint: should handling one
        message raise (a bug this input reveals), that message is dropped with
        a rate-limited log line and its traceback, and the endpoint goes on.
        Once the endpoint is closing nothing more is handled (a transport may
        still be going through datagrams that were waiting).
        """
        if self._closing:
            return
        try:
            verdict, detail = self._core.receive(addr, raw, self._now())
            if verdict is _ECHO:  # the common case, handled inline
                _wake(detail)
                self._transport.release(addr, detail)
            else:
                self._handle(verdict, detail, raw, addr)
        except Exception:
            if self._log.ready(anyio.current_time()):
                self.logger.exception(
                    "[%s] dropped a message from %s that could not be handled (%.60r); "
                    "please report this",
                    self.name,
                    self.uri_of(addr),
                    raw,
                )

    def _handle(self, verdict: Received, detail: Any, raw: bytes, addr: Address) -> None:
        """Do what the core decided about a message that is not an awaited echo."""
        if verdict is _NEW:
            msg: Message = detail
            if msg.event:
                if self._transmit(raw, addr):
                    stats = self._core.stats
                    stats.echoed += 1
                    stats.sent += 1
                if msg.tag is not None:
                    self._transport.trust(addr)
            else:
                self.logger.error(
                    "[%s] %s reported an error handling %s: %s",
                    self.name,
                    self.uri_of(msg.addr or addr),
                    _event_name(msg.data[1]),
                    msg.data[0],
                )
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug("[%s] received %r from %s", self.name, raw, self.uri_of(addr))
            self.last_message = msg
            self._events.dispatch(msg)
        elif verdict is Received.EXTENSION:
            self._extension(addr, *detail)
        elif verdict is Received.DUPLICATE:
            if self._transmit(raw, addr):
                self._core.stats.echoed += 1
                self._core.stats.sent += 1
        elif verdict is Received.MALFORMED or verdict is Received.REFUSED:
            if self._log.ready(anyio.current_time()):
                what = (
                    f"a malformed message ({detail})"
                    if verdict is Received.MALFORMED
                    else "a message from a host not in the allow list"
                )
                self.logger.warning(
                    "[%s] dropped %s from %s (%d dropped lately)",
                    self.name,
                    what,
                    self.uri_of(canonical_address(addr)),
                    self._log.take(),
                )
        elif self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug(
                "[%s] %s from %s dropped: %r", self.name, verdict.name, self.uri_of(addr), raw
            )

    def _extension(self, addr: Address, tag: tuple[int, int, int | None], body: bytes) -> None:
        """A ping to answer or a pong to take (see :mod:`._extensions`)."""
        now = self._clock()  # first: the receive timestamp of the exchange
        ext = parse_extension(body)
        if ext is None:
            if self._log.ready(self._now()):
                self.logger.warning(
                    "[%s] dropped a malformed extension message from %s", self.name, addr
                )
            return
        peer = canonical_address(addr)
        entry = self._peers.get(peer)
        if ext["rignet"] == "ping":
            pong = build_pong(ext["t"], now, self._clock())
            self._transmit(self._core.post(peer, pong, reply_to=tag[1]), peer)
        elif not entry.answered(ext, now):
            return
        entry.status.session = tag[0]
        entry.status.last_heard = self._now()

    def _peer_lost(self, addr: Address, reason: str) -> None:
        """Transport callback: fail every pending send to ``addr`` at once."""
        self.logger.info("[%s] %s: %s", self.name, self.uri_of(canonical_address(addr)), reason)
        for send in self._core.peer_lost(addr, reason):
            _wake(send)

    def _accepts(self, addr: Address) -> bool:
        """Transport callback: may ``addr`` connect (TCP)?"""
        return self._core.allows(addr)

    def _report_failure(self, msg: Message, exc: Exception) -> None:
        """A callback raised: send the peer an error report for its message."""
        if not msg.event or msg.addr is None or self._closing:
            return
        ref = msg.tag[1] if msg.tag is not None else None
        report = self._core.post(msg.addr, build_error(exc, msg.event), reply_to=ref)
        self._transmit(report, msg.addr)


def _new_waiter() -> Waiter:
    return waiter_class()()


def _wake(send: Send) -> None:
    waiter = send.waiter
    if waiter is not None:
        waiter.set()


def _ref(msg: Message | None) -> int | None:
    """The seq a reply to ``msg`` names (None if ``msg`` is untagged or None)."""
    if msg is None or msg.tag is None:
        return None
    return msg.tag[1]


def _event_of(payload: bytes) -> int:
    """The event code a message starts with (``[N, ...``)."""
    head = payload.lstrip(b" \t\r\n[")
    digits = head[: len(head) - len(head.lstrip(b"0123456789"))]
    if not digits:
        raise ValueError(f"cannot read the event code of {payload[:40]!r}; pass event=")
    return int(ExpMessage.validate(int(digits), allow_bitwise=False))


def _event_name(code: int) -> str:
    try:
        return ExpMessage(code).name or str(code)
    except ValueError:
        return str(code)


def _check_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"Timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return value


def _non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number of seconds, 0 or more, got {value!r}")
    return float(value)
