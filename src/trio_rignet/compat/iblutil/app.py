"""``iblutil.io.net.app`` 1.20.0 on trio-rignet: replace ``from iblutil.io.net import app``
with ``from trio_rignet.compat.iblutil import app``.

:class:`EchoProtocol` and :class:`Services` have iblutil's names, signatures,
return values, exception types and log lines; underneath, each communicator is
a :class:`trio_rignet.EchoProtocol` endpoint, so it frames TCP, matches echoes
by content (several sends in flight, no "Unexpected response"), stays open after
an echo timeout, paces TCP writes to peers that cannot frame (iblutil's), and
:class:`Services` signals every rig at once with each wait registered before
its signal goes out. The "Change one import" page of the docs lists every
difference from iblutil.

**The one exception to structured concurrency.** iblutil's
``await EchoProtocol.server(uri)`` returns an open object that lives until
``close()``, while trio-rignet's endpoints live inside ``async with`` blocks.
Each communicator therefore hosts its endpoint in a background asyncio task
(named ``trio-rignet compat <name>``) that enters
``trio_rignet.EchoProtocol.server/client(...)`` and stays inside until
:meth:`EchoProtocol.close` (synchronous, as iblutil's) asks it to leave; the
endpoint's sockets and tasks close as that task ends, one loop iteration
later. If the loop ends without ``close()`` (``asyncio.run`` cancels the
tasks left), the task is cancelled and the endpoint closes all the same; the
communicator then reports ``is_connected`` false and its futures are cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import re
import sys
from asyncio import isfuture
from collections import UserDict, deque
from collections.abc import Awaitable, Iterator
from functools import partial
from types import MappingProxyType
from typing import Any

import sniffio

from ..._calls import Call, run_calls
from ..._echo import EchoProtocol as _RignetEndpoint
from ..._echo import EndpointOptions
from ..._errors import (
    CompletionTimeout,
    EchoTimeout,
    EndpointClosed,
    PeerUnavailable,
    RemoteError,
    RignetError,
)
from ..._messages import ExpMessage as _RignetEvent
from ..._messages import Message
from ..._services import ServicesError
from . import base

__all__ = ["EchoProtocol", "Services", "main"]

Address = tuple[str, int]

_LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
_LOG_COLORS = {
    "DEBUG": "green",
    "INFO": "cyan",
    "WARNING": "bold_yellow",
    "ERROR": "bold_red",
    "CRITICAL": "bold_purple",
}
_CLOSED = "Close called on communicator"
_KEEP_FOR = 10.0
"""Seconds an unawaited reply is kept for the next ``on_event`` (Services' default timeout)."""
_KEEP_MAX = 16
"""Replies kept per event, at most (the oldest are dropped)."""
_EVENT_CODE = re.compile(rb"^\s*\[\s*(\d+)")
_HOSTS: set[asyncio.Task[None]] = set()
"""Every running host task (asyncio keeps only weak references to tasks)."""


def _setup_log(name: str, level: int = logging.DEBUG) -> logging.Logger:
    """iblutil's default logger: named after the communicator, DEBUG, to stdout.

    Coloured if ``colorlog`` is installed (iblutil's dependency), plain otherwise.
    """
    log = logging.getLogger(name)
    log.setLevel(level)
    log.handlers = []
    fmt_str = "%(asctime)s [%(name)s] %(levelname)-8s %(filename)s:%(lineno)-4d %(message)s"
    formatter: logging.Formatter
    try:
        colorlog = importlib.import_module("colorlog")
    except ImportError:
        formatter = logging.Formatter(fmt_str, _LOG_DATE_FORMAT)
    else:
        formatter = colorlog.ColoredFormatter(
            "%(log_color)s" + fmt_str, _LOG_DATE_FORMAT, log_colors=_LOG_COLORS
        )
    stream_handler = logging.StreamHandler(stream=sys.stdout)
    stream_handler.setFormatter(formatter)
    stream_handler.name = f"{name}_auto"
    stream_handler.setLevel(level)
    log.addHandler(stream_handler)
    return log


@contextlib.contextmanager
def _asyncio_marked() -> Iterator[None]:
    """Let AnyIO recognise asyncio in a synchronous call made outside any task.

    ``send()`` may be called from a plain ``loop.call_soon`` callback, where
    sniffio cannot tell which library runs the loop.
    """
    token = sniffio.current_async_library_cvar.set("asyncio")
    try:
        yield
    finally:
        sniffio.current_async_library_cvar.reset(token)


# --------------------------------------------------------------- exceptions
# iblutil raises TimeoutError whenever a rig does not answer, whatever the cause.
# trio-rignet tells the causes apart; these carry both types, so that
# ``except TimeoutError`` (iblutil code) and ``except trio_rignet.PeerUnavailable``
# (or EndpointClosed, ServicesError) both catch them.


class _Unreachable(PeerUnavailable, TimeoutError):
    """The peer cannot be reached (refused, disconnected): fails at once.

    iblutil waits for the echo timeout and raises ``TimeoutError``.
    """


class _Closed(EndpointClosed, TimeoutError):
    """A send on a communicator that is closed (iblutil times out)."""


if sys.version_info >= (3, 11):

    class _ServicesTimeout(ServicesError, TimeoutError):
        """Rigs failed a Services signal (iblutil raises ``[asyncio.]TimeoutError``)."""

else:  # pragma: no cover - Python 3.10: asyncio.TimeoutError is its own class

    class _ServicesTimeout(ServicesError, asyncio.TimeoutError, TimeoutError):
        """Rigs failed a Services signal (iblutil raises ``[asyncio.]TimeoutError``)."""


def _with_text(exc: BaseException, text: str) -> BaseException:
    exc.args = (text,)
    return exc


class _Endpoint(_RignetEndpoint):
    """trio-rignet's endpoint, also telling its communicator when a peer is lost."""

    lost_hook: Any = None

    def _peer_lost(self, addr: Address, reason: str) -> None:
        super()._peer_lost(addr, reason)
        hook = self.lost_hook
        if hook is not None:
            hook(addr, reason)


class _Server:
    """Stands in for the ``asyncio.Server`` of iblutil's TCP server (``EchoProtocol.Server``).

    The listener belongs to the communicator's endpoint: :meth:`close` closes
    the whole communicator, connections included.
    """

    def __init__(self, com: EchoProtocol) -> None:
        self._com = com

    def is_serving(self) -> bool:
        """True while the communicator listens."""
        return self._com.is_connected

    def close(self) -> None:
        """Stop listening and close the communicator."""
        self._com.close()

    async def wait_closed(self) -> None:
        """Wait until the listener and its connections are closed."""
        await self._com._wait_closed()

    async def serve_forever(self) -> None:
        """Serve until the communicator is closed; cancelling this closes it."""
        try:
            await self._com._wait_closed()
        except asyncio.CancelledError:
            self.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._com._wait_closed())
            raise


def _canonical_peer(addr: Any) -> Any:
    """``addr`` as a tuple for comparisons (a list from JSON, say)."""
    try:
        return tuple(addr[:2])
    except TypeError:
        return addr


# ------------------------------------------------------------- EchoProtocol


class EchoProtocol(base.Communicator):
    """An echo server implementing TCP/IP and UDP, on a trio-rignet endpoint.

    Create it with ``await EchoProtocol.server(uri)`` or
    ``await EchoProtocol.client(uri)``. In the client role the remote address
    is specified; in the server role, the local address.

    Attributes:
        Server: for a TCP server, a stand-in for iblutil's ``asyncio.Server``
            (``serve_forever()``, ``close()``, ``wait_closed()``,
            ``is_serving()``); None otherwise.
        default_echo_timeout: seconds to wait for an echo when no timeout is
            passed (1.0; set it on the class or on one communicator).
        max_message_size: kept for compatibility (iblutil's truncated-echo
            check); trio-rignet frames TCP and bounds messages itself.
        on_connection_lost: a future resolved by :meth:`close` (with
            ``"Close called on communicator"``) or, for a TCP client, when its
            connection drops (with None).
        on_error_received: a future resolved with a ``ConnectionRefusedError``
            when a UDP client's peer refuses datagrams; cancelled by :meth:`close`.
        on_eof_received: a future resolved with True when a TCP peer closes
            its connection; cancelled by :meth:`close`.
    """

    Server: Any = None
    _role: str | None = None
    default_echo_timeout: float = 1.0
    max_message_size: int = 65535

    def __init__(
        self,
        server_uri: Any,
        role: str,
        name: str | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(server_uri, name=name, logger=logger)
        self._endpoint: _Endpoint | None = None
        self._host: asyncio.Task[None] | None = None
        self._stop: asyncio.Future[None] | None = None
        self._closed = False
        self._tasks: set[asyncio.Future[Any]] = set()
        # Replies nobody awaited yet (see on_event): event -> deadline to keep them, and them.
        self._expect: dict[int, float] = {}
        self._kept: dict[int, deque[tuple[float, list[Any], Any]]] = {}
        self.role = role
        loop = asyncio.get_running_loop()
        self.on_connection_lost: asyncio.Future[Any] = loop.create_future()
        self.on_error_received: asyncio.Future[Any] = loop.create_future()
        self.on_eof_received: asyncio.Future[Any] = loop.create_future()

    # ------------------------------------------------------------ opening

    @staticmethod
    async def server(
        server_uri: Any, name: str | None = None, log: logging.Logger | None = None, **kwargs: Any
    ) -> EchoProtocol:
        """Listen on the local ``server_uri`` (bind for UDP) and return the open communicator.

        Args:
            server_uri: local address, an IP or host name with or without a
                port (11001 by default); ``ws://`` for TCP instead of UDP. Port 0
                binds a free port, written into :attr:`server_uri`.
            name: an optional, arbitrary label (default: the URI).
            log: the logger to use; by default one named after the
                communicator, at DEBUG level, writing to stdout (as iblutil).
            kwargs: trio-rignet endpoint options
                (:class:`~trio_rignet.EndpointOptions`); asyncio's socket
                arguments are not accepted.

        Raises:
            OSError: the address cannot be bound.
            ValueError, TypeError: invalid URI or option.
        """
        return await EchoProtocol._open(server_uri, "server", name, log, kwargs)

    @staticmethod
    async def client(
        server_uri: Any, name: str | None = None, log: logging.Logger | None = None, **kwargs: Any
    ) -> EchoProtocol:
        """Return an open communicator talking to the remote host at ``server_uri``.

        Arguments as for :meth:`server`.

        Raises:
            OSError: a TCP connection failed (``ConnectionRefusedError``, as iblutil).
            ValueError, TypeError: invalid URI or option.
        """
        return await EchoProtocol._open(server_uri, "client", name, log, kwargs)

    @staticmethod
    async def _open(
        server_uri: Any,
        role: str,
        name: str | None,
        log: logging.Logger | None,
        kwargs: dict[str, Any],
    ) -> EchoProtocol:
        unknown = set(kwargs) - set(EndpointOptions.__annotations__)
        if unknown:
            raise TypeError(
                f"unsupported argument(s) {sorted(unknown)}: trio-rignet opens its own sockets "
                "(no asyncio create_server/create_datagram_endpoint arguments); the endpoint "
                f"options are {sorted(EndpointOptions.__annotations__)}"
            )
        server_uri = await _validate(server_uri)
        log = log or _setup_log(name or server_uri)
        com = EchoProtocol(server_uri, role, name=name, logger=log)
        try:
            await com._start(kwargs)
        except PeerUnavailable as exc:
            if isinstance(exc.__cause__, OSError):  # the connection error, as iblutil raises it
                raise exc.__cause__ from None
            raise
        if role == "server":
            endpoint = com._endpoint
            assert endpoint is not None
            if com.port == 0:
                com.server_uri = endpoint.uri_of(endpoint.local_address)
            if com.protocol != "udp":
                com.Server = _Server(com)
            com.logger.info(f"Listening on {com.server_uri}")
        return com

    async def _start(self, options: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._stop = loop.create_future()
        task = loop.create_task(self._run(ready, options), name=f"trio-rignet compat {self.name}")
        _HOSTS.add(task)
        task.add_done_callback(_HOSTS.discard)
        self._host = task
        try:
            await ready
        except BaseException:
            self.close()
            raise

    async def _run(self, ready: asyncio.Future[None], options: dict[str, Any]) -> None:
        """The host task: inside the endpoint's ``async with`` until :meth:`close`."""
        opener = _Endpoint.server if self.role == "server" else _Endpoint.client
        opened = False
        try:
            async with opener(self.server_uri, name=self.name, **options) as endpoint:
                assert isinstance(endpoint, _Endpoint)
                if ready.done():  # the caller gave up while the endpoint opened
                    return
                endpoint.lost_hook = self._peer_lost
                endpoint.assign_callback(_RignetEvent.any(), self._dispatch)
                endpoint.assign_callback(0, self._dispatch)
                self._endpoint = endpoint
                opened = True
                ready.set_result(None)
                assert self._stop is not None
                await self._stop
        except Exception as exc:
            if not ready.done():
                ready.set_exception(exc)
            else:  # nobody awaits this task: say what ended the communicator
                self.logger.error("Communicator %s failed: %r", self.name, exc)
        finally:
            if not ready.done():
                ready.cancel()
            self._endpoint = None
            self.close()
            if opened:
                self.logger.info("Connection closed")

    async def _wait_closed(self) -> None:
        host = self._host
        if host is not None and not host.done():
            await asyncio.wait({host})

    # --------------------------------------------------------- properties

    @property
    def role(self) -> str:
        """The communicator's role, ``"client"`` or ``"server"``, set once when created."""
        return self._role  # type: ignore[return-value]

    @role.setter
    def role(self, value: str) -> None:
        if self._role is not None:
            raise AttributeError("can't set attribute")
        if (value or "").strip().lower() not in ("server", "client"):
            raise ValueError('role must be either "server" or "client"')
        self._role = value.strip().lower()

    @property
    def is_connected(self) -> bool:
        """True while the communicator is open (and, for a TCP client, connected; a
        TCP server is connected while it listens)."""
        endpoint = self._endpoint
        return not self._closed and endpoint is not None and endpoint.is_connected

    def awaiting_response(self, addr: Any = None) -> bool:
        """True if a confirmed send (to ``addr``, or to anyone) awaits its echo."""
        endpoint = self._endpoint
        if endpoint is None:
            return False
        try:
            return endpoint.awaiting_response(_canonical_peer(addr) if addr else None)
        except TypeError:  # not an address: nothing is sent there
            return False

    # ------------------------------------------------------------ signals

    async def cleanup(self, data: Any = None, addr: Any = None) -> None:
        """Send a cleanup message ``[8, data]`` and wait for its echo.

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
        """
        message = super().cleanup(data)
        await self.confirmed_send(message, addr=addr)

    async def start(self, exp_ref: Any, data: Any = None, addr: Any = None) -> None:
        """Send a start message ``[2, exp_ref, data]`` and wait for its echo.

        ``exp_ref`` is ``"yyyy-mm-dd_n_subject"`` or a dict with ``date``,
        ``sequence`` and ``subject``.

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
        """
        message = super().start(exp_ref, data)
        await self.confirmed_send(message, addr=addr)

    async def stop(self, data: Any = None, immediately: bool = False, addr: Any = None) -> None:
        """Send a stop message ``[4, data]`` (``[16, data]``, EXPINTERRUPT, if ``immediately``).

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
        """
        message = super().stop(data, immediately=immediately)
        await self.confirmed_send(message, addr=addr)

    async def status(self, status: Any, addr: Any = None) -> None:
        """Send a status message ``[32, status]`` and wait for its echo.

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
        """
        message = super().status(status)
        await self.confirmed_send(message, addr=addr)

    async def info(self, status: Any, data: Any = None, addr: Any = None) -> None:
        """Send an info message ``[64, status, data]`` and wait for its echo.

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
        """
        message = super().info(status, data)
        await self.confirmed_send(message, addr=addr)

    async def init(self, data: Any = None, addr: Any = None) -> None:
        """Send an initialization message ``[1, data]`` and wait for its echo.

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
        """
        message = super().init(data)
        await self.confirmed_send(message, addr=addr)

    async def alyx(self, alyx: Any = None, addr: Any = None) -> Any:
        """Send a logged-in Alyx client's token, or request one from the remote host.

        Returns:
            None after sending a token; after a request (``alyx`` None or not
            logged in), the token received: ``[base_url, {user: token}]``.

        Raises:
            TimeoutError: no echo within :attr:`default_echo_timeout`.
            trio_rignet.PeerNotAllowed: a server was asked to send a token to a
                host it has not exchanged messages with.
        """
        message = super().alyx(alyx)
        if all(message):  # send instance to remote host
            endpoint = self._check_target(addr)
            try:
                await endpoint.alyx(alyx, _canonical_peer(addr) if self.role == "server" else None)
            except RignetError as exc:
                self._raise_send_error(exc)
            self.logger.info("Confirmation received")
            return None
        # request instance from remote host
        fut = asyncio.get_running_loop().create_future()
        self.assign_callback("ALYX", fut)
        try:
            await self.confirmed_send(message, addr=addr)
            token, _ = await fut
        finally:
            if not fut.done():
                fut.cancel()
                self._forget("ALYX", fut)
        return token

    @staticmethod
    def encode(data: Any) -> bytes:
        """Serialize data for transmission (bytes pass through; str is UTF-8; else JSON)."""
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        if not isinstance(data, str):
            data = json.dumps(data)
        return data.encode()  # type: ignore[no-any-return]

    def _check_target(self, addr: Any) -> _Endpoint:
        """iblutil's argument checks of ``confirmed_send``; the open endpoint."""
        if self.role == "server":
            if not addr:
                raise TypeError("confirmed_send missing 1 required argument: 'addr'")
        elif addr and addr != (self.hostname, self.port):
            raise ValueError("Unexpected remote address")
        endpoint = self._endpoint
        if endpoint is None or self._closed:
            raise _Closed(f"{self.name}: the communicator is closed ({self.server_uri})")
        return endpoint

    def send(self, data: Any, addr: Any = None) -> None:
        """Send data without waiting for its echo.

        ``data`` is serialised with :meth:`encode` and must be a JSON array
        (``[event, ...]``). A server must name ``addr``; a client sends to its
        peer (a message for another address is not sent, with a warning).

        Raises:
            TypeError: a server was not given ``addr``.
            ValueError: the message is not a JSON array, or too large.
        """
        endpoint = self._endpoint
        if endpoint is None or self._closed:
            self.logger.warning("Message not sent: the communicator is closed")
            return
        payload = self.encode(data)
        if self.role == "client":
            peer = (self.hostname, self.port)
            if addr and _canonical_peer(addr) != peer:
                self.logger.warning(f"Message not sent: unexpected address {addr}")
                return
            addr, target = peer, None
        else:
            target = _canonical_peer(addr) if addr else None
        if addr:
            self.logger.debug(f'Send "{data!r}" to {self.protocol}://{addr[0]}:{addr[1]}')
        with _asyncio_marked():
            if not endpoint.send_nowait(payload, target):
                self.logger.warning(f"Message not sent to {addr}: too much is waiting to be sent")

    async def confirmed_send(self, data: Any, addr: Any = None, timeout: Any = None) -> None:
        """Send a message and wait until the remote host echoes it back.

        Methods such as :meth:`start`, :meth:`stop`, :meth:`init`,
        :meth:`cleanup` and :meth:`alyx` should be used instead of calling this
        directly. Several confirmed sends may be in flight at once.

        Args:
            data: the message (a JSON array, or its bytes).
            addr: the remote ``(host, port)``; only (and always) required in
                the server role.
            timeout: seconds to wait for the echo (default
                :attr:`default_echo_timeout`).

        Raises:
            TimeoutError: no echo within ``timeout`` (the communicator stays
                open), or the peer cannot be reached (then at once, also a
                :class:`trio_rignet.PeerUnavailable`), or the communicator is
                closed (also a :class:`trio_rignet.EndpointClosed`).
            asyncio.CancelledError: :meth:`close` was called meanwhile.
            ValueError: ``timeout`` is not positive; in the client role,
                ``addr`` is not the remote host's; the message is not a JSON array.
            TypeError: in the server role, ``addr`` is missing.
        """
        endpoint = self._check_target(addr)
        if not (timeout := timeout or self.default_echo_timeout) > 0:
            raise ValueError("Timeout must be non-zero number")
        target = _canonical_peer(addr) if self.role == "server" else None
        payload = self.encode(data)
        if match := _EVENT_CODE.match(payload):  # a reply to this may come before on_event
            code = int(match.group(1))
            self._kept.pop(code, None)
            self._expect[code] = asyncio.get_running_loop().time() + _KEEP_FOR
        try:
            await endpoint.confirmed_send(payload, target, timeout=timeout)
        except RignetError as exc:
            self._raise_send_error(exc)
        self.logger.info("Confirmation received")

    def _raise_send_error(self, exc: RignetError) -> None:
        """Raise what iblutil code expects for trio-rignet's ``exc``."""
        if isinstance(exc, EchoTimeout):
            text = f"Failed to receive client response in time ({self.name}: {self.server_uri})"
            raise _with_text(exc, text) from None
        if isinstance(exc, PeerUnavailable):
            raise _Unreachable(exc.peer, exc.reason) from exc
        if isinstance(exc, EndpointClosed):
            if self._closed:
                raise asyncio.CancelledError(_CLOSED) from exc
            raise _Closed(f"{self.name}: the communicator is closed ({self.server_uri})") from exc
        raise exc

    async def on_event(self, event: Any) -> Any:
        """Wait for the next message of ``event``; return ``(data, addr)``.

        For a combination of events, ``(data, addr, event)``::

            data, addr = await com.on_event("EXPSTART")
            data, addr, event = await com.on_event(ExpMessage.EXPEND | ExpMessage.EXPINTERRUPT)

        A reply is not missed for arriving before this call: a message of
        ``event`` that came while no ``on_event`` awaited it, within 10 s after
        this communicator sent a message of that event or after an
        ``on_event`` for it returned, is returned at once (oldest first). So
        ``await com.init()`` then ``await com.on_event("EXPINIT")`` gets the
        rig's completion however fast it came, and a loop that awaits
        ``on_event`` again after handling each message misses none.

        Raises:
            asyncio.CancelledError: the communicator was closed meanwhile.
        """
        event = base.ExpMessage.validate(event)
        codes = [int(e) for e in event] if event else [0]
        now = asyncio.get_running_loop().time()
        oldest: tuple[float, int] | None = None
        for code in codes:
            kept = self._kept.get(code)
            while kept and kept[0][0] + _KEEP_FOR <= now:
                kept.popleft()
            if kept and (oldest is None or kept[0][0] < oldest[0]):
                oldest = (kept[0][0], code)
        if oldest is None:
            return await super().on_event(event)
        _, code = oldest
        _, data, addr = self._kept[code].popleft()
        for waited in codes:
            self._expect[waited] = now + _KEEP_FOR
        if event not in base.ExpMessage:  # a combination: the event too, as iblutil
            return data, addr, base.ExpMessage(code)
        return data, addr

    # -------------------------------------------------------------- close

    def close(self) -> None:
        """Close the connection, de-register callbacks and cancel outstanding futures.

        :attr:`on_connection_lost` is resolved; every other future, and every
        confirmed send still waiting for its echo, is cancelled. The sockets
        close as the communicator's host task ends, on the next loop iteration
        (a TCP server's listener too). Idempotent.
        """
        self._closed = True
        stop = self._stop
        if stop is not None and not stop.done():
            stop.set_result(None)
        super().close()  # Deregister callbacks, cancel event futures
        self._kept.clear()
        self._expect.clear()
        for task in list(self._tasks):
            task.cancel()
        if self.on_error_received and not self.on_error_received.done():
            self.on_error_received.cancel(_CLOSED)
        if self.on_eof_received and not self.on_eof_received.done():
            self.on_eof_received.cancel(_CLOSED)
        if self.on_connection_lost and not self.on_connection_lost.done():
            self.on_connection_lost.set_result(_CLOSED)

    # ---------------------------------------------------------- receiving

    def _dispatch(self, msg: Message) -> None:
        """trio-rignet callback: a message arrived (and was echoed); notify listeners."""
        if self._closed:
            return
        addr = msg.addr
        assert addr is not None
        host, port = addr
        code = int(msg.event)
        data = list(msg.data)
        text = json.dumps([code, *data])
        self.logger.info("Received %r from %s://%s:%i", text, self.protocol, host, port)
        event = base.ExpMessage(code)
        if code:
            self.logger.debug("Echo %r to %s://%s:%i", text, self.protocol, host, port)
        else:  # An error in the remote callback function occurred
            err, evt = data
            self.logger.error(
                "Callback for %s on %s://%s:%i failed with %s",
                base.ExpMessage(evt).name,
                self.protocol,
                host,
                port,
                err,
            )
        self._keep(code, data, addr)
        if not self._callbacks.get(event):
            self.logger.debug("No callbacks to execute for event %s", event.name)
            return
        reported = False
        now = asyncio.get_running_loop().time()
        for f, return_event in self._callbacks[event].copy():
            args = (data, addr, event) if return_event else (data, addr)
            if isfuture(f):
                if f.done():
                    self.logger.warning("Future %s already resolved", f)
                elif not f.cancelled():
                    f.set_result(args)
                self.clear_callbacks(event, f)  # Remove future from list
                # ... and from the other events it waited for; expect more of them
                waited = [code, *self._forget(base.ExpMessage.any(), f)] if return_event else [code]
                for evt in waited:
                    self._expect[evt] = now + _KEEP_FOR
                continue
            try:
                result = f(*args)
            except Exception as ex:
                self.logger.error('Callback "%s" failed with error "%s"', f, ex)
                if not reported:  # one error report per message, as iblutil
                    reported = True
                    self._report(ex, event, msg)
                continue
            if inspect.isawaitable(result):
                self._spawn(result, f, event, msg)

    def _keep(self, code: int, data: list[Any], addr: Any) -> None:
        """Keep a message nobody awaits, if a reply of its event is expected (see on_event)."""
        if not code or self._expect.get(code, 0.0) <= asyncio.get_running_loop().time():
            return
        if any(isfuture(f) and not f.done() for f, _ in self._callbacks.get(code, ())):
            return  # an on_event gets it now
        kept = self._kept.get(code)
        if kept is None:
            kept = self._kept[code] = deque(maxlen=_KEEP_MAX)
        kept.append((asyncio.get_running_loop().time(), data, addr))

    def _spawn(self, awaitable: Awaitable[Any], f: Any, event: int, msg: Message) -> None:
        """Run an async callback's coroutine as a task; report its failure like a plain one's."""
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)

        def done(task: asyncio.Future[Any]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                return
            ex = task.exception()
            if isinstance(ex, Exception):
                self.logger.error('Callback "%s" failed with error "%s"', f, ex)
                self._report(ex, event, msg)

        task.add_done_callback(done)

    def _report(self, ex: Exception, event: int, msg: Message) -> None:
        """Send the sender an error report ``[0, "Type: text", event]``."""
        endpoint = self._endpoint
        if endpoint is None or self._closed:
            return
        report = self.encode([0, f"{type(ex).__name__}: {ex}", event])
        target = msg.addr if self.role == "server" else None
        try:
            with _asyncio_marked():
                endpoint.send_nowait(report, target, reply_to=msg)
        except (RignetError, ValueError) as exc:
            self.logger.warning("Error report not sent to %s: %s", msg.addr, exc)

    def _peer_lost(self, addr: Address, reason: str) -> None:
        """The endpoint lost a peer: resolve iblutil's transport futures."""
        if self._closed:
            return
        if self.protocol == "udp":
            exc = ConnectionRefusedError(reason)
            self.logger.error("Error received: %s", exc)
            if not self.on_error_received.done():
                self.on_error_received.set_result(exc)
            return
        self.logger.debug("EOF received")
        if not self.on_eof_received.done():
            self.on_eof_received.set_result(True)
        if self.role == "client":
            self.logger.info("Connection closed")
            if not self.on_connection_lost.done():
                self.on_connection_lost.set_result(None)

    # ------------------------------------------------------ Services' use

    def _message(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """The bytes ``self.<method>(*args, **kwargs)`` would send."""
        if method == "confirmed_send":
            data = kwargs["data"] if "data" in kwargs else args[0]
            return self.encode(data)
        if method in ("init", "start", "stop", "cleanup", "status", "info"):
            return self.encode(getattr(base.Service, method)(self, *args, **kwargs))
        raise ValueError(
            f"Services cannot signal with {method!r}: use init, start, stop, cleanup, "
            "status, info or confirmed_send"
        )

    def _new_call(self, payload: bytes, event: int, timeout: float | None) -> Call:
        endpoint = self._check_target(None)
        if not (echo := self.default_echo_timeout) > 0:
            raise ValueError("Timeout must be non-zero number")
        return endpoint.new_call(payload, event=event, echo_timeout=echo, timeout=timeout)


async def _validate(uri: Any) -> str:
    """``base.validate_uri(uri)``, resolving a host name in a thread (not in the loop)."""
    try:
        text = base.validate_uri(uri, resolve_host=False)
    except ValueError:
        text = None
    if text is not None and base.is_valid_ip(text.split("://", 1)[1].rsplit(":", 1)[0].strip("[]")):
        return text
    return await asyncio.to_thread(base.validate_uri, uri)


# ------------------------------------------------------------------ Services


class Services(base.Service, UserDict):  # type: ignore[type-arg]
    """Handler for multiple remote rig services.

    An immutable mapping of rig name to :class:`EchoProtocol` client. Each
    signal method sends the signal to every rig at once (one after another
    with ``concurrent=False``) and returns each rig's completion data.

    Args:
        remote_rigs: the rigs' communicators (:class:`EchoProtocol` clients),
            keyed by their ``name``.
        timeout: seconds to wait for the rigs' completion updates (None or 0:
            forever).

    Raises:
        TypeError: an item is not a :class:`~trio_rignet.compat.iblutil.base.Service`.
    """

    __slots__ = ("server", "timeout")

    def __init__(self, remote_rigs: Any, timeout: float | None = 10.0) -> None:
        super().__init__()
        remote_rigs = list(remote_rigs)
        if not all(isinstance(x, base.Service) for x in remote_rigs):
            raise TypeError(f"Remote services must be of type {type(base.Service)}")
        self.data = MappingProxyType({rig.name: rig for rig in remote_rigs})  # type: ignore[assignment]
        self.timeout = timeout

    @property
    def is_connected(self) -> bool:
        """All services are connected."""
        return any(self.values()) and all(rig.is_connected for rig in self.values())

    def assign_callback(self, event: Any, callback: Any, return_service: bool = False) -> None:
        """Assign a callback (or future) to every rig for ``event``.

        With ``return_service`` the callback is called as
        ``callback(data, addr, service)`` (``callback(data, addr, event,
        service)`` for a combination of events).
        """

        def _callback(service: Any, *args: Any) -> Any:
            return callback(*args, service)

        for service in self.values():
            if return_service:
                cb = partial(_callback, service)
                # keep track of original callback id
                cb.id = getattr(callback, "id", None) or hash(callback)  # type: ignore[attr-defined]
                service.assign_callback(event, cb)
            else:
                service.assign_callback(event, callback)

    def clear_callbacks(self, event: Any, callback: Any = None) -> dict[str, int]:
        """Clear ``callback`` (or every callback) for ``event`` on every rig.

        Returns:
            Rig name -> number of callbacks removed.
        """
        removed = {}
        for rig in self.values():
            removed[rig.name] = rig.clear_callbacks(event, callback=callback)
        return removed

    async def await_all(self, event: Any) -> dict[str, Any]:
        """Wait for every rig to send ``event``.

        Every wait is registered before the first checkpoint.

        Returns:
            Rig name -> the data received, in order of arrival.

        Raises:
            asyncio.TimeoutError: a rig did not send it within :attr:`timeout`
                (also a :class:`trio_rignet.ServicesError` naming them).
        """
        event = base.ExpMessage.validate(event)
        loop = asyncio.get_running_loop()
        responses: dict[str, Any] = {}
        waits: dict[str, tuple[Any, asyncio.Future[Any]]] = {}
        for rig in self.values():
            fut = loop.create_future()
            rig.assign_callback(event, fut)
            fut.add_done_callback(partial(_record, responses, rig.name))
            waits[rig.name] = (rig, fut)
        futures = [fut for _, fut in waits.values()]
        try:
            if self.timeout:
                _, pending = await asyncio.wait(futures, timeout=self.timeout)
                if pending:
                    failed = set(self.keys()).difference(responses.keys())
                    raise self._timed_out(
                        event,
                        responses,
                        {
                            name: CompletionTimeout(name, event, self.timeout)
                            for name in self
                            if name in failed
                        },
                        f"The following services failed to respond in time: {failed}",
                    )
            elif futures:
                await asyncio.gather(*futures)
        finally:
            for rig, fut in waits.values():
                if not fut.done():
                    fut.cancel()
                    rig._forget(event, fut)
        return responses

    def close(self) -> None:
        """Close all communication."""
        for rig in self.values():
            rig.close()

    async def init(self, data: Any = None, concurrent: bool = True) -> dict[str, Any]:
        """Send EXPINIT to every rig and return each one's completion data.

        Args:
            data: optional extra data to send to the remote hosts.
            concurrent: if false, wait for each rig's completion before
                signalling the next.

        Returns:
            Rig name -> the data of its completion update.

        Raises:
            TimeoutError: a rig did not echo in time, or cannot be reached.
            asyncio.TimeoutError: a rig did not complete in time, or reported
                an error (both are also a :class:`trio_rignet.ServicesError`).
        """
        event = base.ExpMessage["EXPINIT"]
        return await self._signal(event, "init", data=data, concurrent=concurrent)

    async def cleanup(self, data: Any = None, concurrent: bool = True) -> dict[str, Any]:
        """Send EXPCLEANUP to every rig (in reverse order); return their completion data.

        Arguments, result and exceptions as for :meth:`init`.
        """
        event = base.ExpMessage.EXPCLEANUP
        return await self._signal(event, "cleanup", data=data, reverse=True, concurrent=concurrent)

    async def start(
        self, exp_ref: Any, data: Any = None, concurrent: bool = True
    ) -> dict[str, Any]:
        """Send EXPSTART with ``exp_ref`` to every rig; return their completion data.

        ``exp_ref`` is ``"yyyy-mm-dd_n_subject"`` or a dict with ``date``,
        ``sequence`` and ``subject``. Otherwise as for :meth:`init`.
        """
        event = base.ExpMessage.EXPSTART
        return await self._signal(event, "start", exp_ref, data=data, concurrent=concurrent)

    async def stop(
        self, data: Any = None, immediately: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """Send EXPEND (EXPINTERRUPT if ``immediately``) to every rig, in reverse order.

        ``concurrent=False`` may be passed. Otherwise as for :meth:`init`.
        """
        event = base.ExpMessage.EXPEND if not immediately else base.ExpMessage.EXPINTERRUPT
        return await self._signal(
            event, "stop", data=data, immediately=immediately, reverse=True, **kwargs
        )

    async def status(self, status: Any, **kwargs: Any) -> dict[str, Any]:
        """Send EXPSTATUS with ``status`` to every rig; return their completion data.

        ``concurrent=False`` may be passed. Otherwise as for :meth:`init`.
        """
        event = base.ExpMessage.EXPSTATUS
        return await self._signal(event, "status", status, **kwargs)

    async def info(self, status: Any, data: Any = None, **kwargs: Any) -> dict[str, Any]:
        """Send EXPINFO with ``status`` and ``data`` to every rig; return their completion data.

        ``concurrent=False`` may be passed. Otherwise as for :meth:`init`.
        """
        event = base.ExpMessage.EXPINFO
        return await self._signal(event, "info", status, data=data, **kwargs)

    async def _signal(
        self,
        event: Any,
        method: str,
        *args: Any,
        concurrent: bool = True,
        reverse: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Send ``rig.<method>(*args, **kwargs)``'s message to every rig; collect completions.

        ``method`` is a signal method's name or ``"confirmed_send"`` (iblutil's
        private method, which iblrig calls).
        """
        event = base.ExpMessage.validate(event, allow_bitwise=False)
        rigs = list(self.values())
        if reverse:
            rigs.reverse()
        planned: list[tuple[EchoProtocol, bytes]] = []
        for rig in rigs:
            if not isinstance(rig, EchoProtocol):
                raise TypeError(
                    f"Services signals only EchoProtocol communicators, not {type(rig).__name__}"
                )
            planned.append((rig, rig._message(method, args, kwargs)))
        timeout = self.timeout or None
        responses: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        if concurrent:
            calls: list[tuple[EchoProtocol, Call]] = []
            for rig, payload in planned:
                try:
                    calls.append((rig, rig._new_call(payload, int(event), timeout)))
                except _Closed as exc:
                    failures[rig.name] = exc
            await run_calls([call for _, call in calls])
            for rig, call in calls:
                _collect(rig, call, responses, failures)
        else:
            for rig, payload in planned:
                try:
                    call = rig._new_call(payload, int(event), timeout)
                except _Closed as exc:
                    failures[rig.name] = exc
                    break
                await run_calls([call])
                _collect(rig, call, responses, failures)
                if failures:
                    break
        if failures:
            raise self._failure(event, responses, failures, [rig.name for rig, _ in planned])
        return {name: responses[name] for name in self if name in responses}

    def _failure(
        self,
        event: base.ExpMessage,
        responses: dict[str, Any],
        failures: dict[str, BaseException],
        order: list[str],
    ) -> BaseException:
        """iblutil's exception for a failed signal, carrying every rig's outcome."""
        unechoed = [
            name
            for name in order
            if isinstance(failures.get(name), (EchoTimeout, PeerUnavailable, EndpointClosed))
        ]
        if unechoed:
            rig = self[unechoed[0]]
            text = f"Failed to receive client response in time ({rig.name}: {rig.server_uri})"
        else:
            failed = set(failures)
            text = f"The following services failed to respond in time: {failed}"
        return self._timed_out(event, responses, failures, text)

    @staticmethod
    def _timed_out(
        event: Any, responses: dict[str, Any], failures: dict[str, BaseException], text: str
    ) -> BaseException:
        exc = _ServicesTimeout(_RignetEvent(int(event)), responses, failures)
        detail = "; ".join(
            said if (said := str(failure)).startswith(f"{name}: ") else f"{name}: {said}"
            for name, failure in failures.items()
        )
        return _with_text(exc, f"{text} ({detail})")

    async def alyx(self, alyx: Any) -> None:
        """Send an Alyx token to every rig (or, if ``alyx`` is not logged in,
        request one from each), concurrently.

        Raises:
            TimeoutError: a rig did not echo in time (the first in rig order).
        """
        results = await asyncio.gather(
            *(service.alyx(alyx) for service in self.values()), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result


def _record(responses: dict[str, Any], name: str, fut: asyncio.Future[Any]) -> None:
    """Done callback of an ``await_all`` wait: keep the data, in order of arrival."""
    if not fut.cancelled():
        responses[name] = fut.result()[0]


def _collect(
    rig: EchoProtocol,
    call: Call,
    responses: dict[str, Any],
    failures: dict[str, BaseException],
) -> None:
    """File a finished call's completion data or failure under the rig's name."""
    result = call.result
    if isinstance(result, Message):
        rig.logger.info("Confirmation received")
        responses[rig.name] = list(result.data)
        return
    assert isinstance(result, BaseException)
    if isinstance(result, (CompletionTimeout, RemoteError)):
        rig.logger.info("Confirmation received")  # echoed, then no completion
    try:
        if isinstance(result, RignetError):
            rig._raise_send_error(result)
        raise result
    except asyncio.CancelledError:
        failures[rig.name] = _Closed(f"{rig.name}: {_CLOSED}")
    except BaseException as exc:
        failures[rig.name] = exc


# --------------------------------------------------------------------- main


async def main(role: str, server_uri: Any, name: str | None = None, **kwargs: Any) -> None:
    """An example of an entry point for creating an individual communicator.

    ``role="server"`` listens on ``server_uri`` (for an hour over UDP, until
    cancelled over TCP); ``role="client"`` sends an EXPSTART to ``server_uri``.
    """
    if role == "server":
        print("Starting server")
        com = await EchoProtocol.server(server_uri, name=name, **kwargs)
        try:
            if com.server_uri.startswith("udp"):
                await asyncio.sleep(60 * 60)  # Serve for 1 hour.
            else:
                await com.Server.serve_forever()
        finally:
            com.close()
    elif role == "client":
        print("Starting client")
        com = await EchoProtocol.client(server_uri, name=name)
        try:
            # Here you would send a message
            await com.start("2022-01-01_1_subject")
        finally:
            com.close()
    else:
        raise ValueError(f'Unknown role "{role}"')


if __name__ == "__main__":  # pragma: no cover - iblutil's command line
    parser = argparse.ArgumentParser(description="UDP Experiment Communicator.")
    parser.add_argument(
        "role", choices=("server", "client"), help="communicator role i.e. server or client"
    )
    parser.add_argument("--host", "-H", help="the host address", default=base.hostname2ip())
    parser.add_argument("--verbose", "-v", action="count", default=0)
    cli_args = parser.parse_args()
    asyncio.run(main(cli_args.role, cli_args.host))
