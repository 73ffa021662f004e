"""``RigService``: the auxiliary-PC side in a few lines.

It listens on a URI, runs the user's handler for each signal, and sends the
completion update (the same event back, with the handler's return value as
data). iblutil leaves every rig to write this loop by hand.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ._echo import EchoProtocol, EndpointOptions
from ._errors import RignetError
from ._events import EventLike, Subscription, event_codes
from ._groups import collapse_single
from ._liveness import Change, Watchers, watch_pings
from ._messages import LISTEN_PORT, ExpMessage, Message, build_error, encode
from ._ratelimit import RateLimit
from ._transport import Address

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["RigHandler", "RigService"]

log = logging.getLogger("trio_rignet.rig")

RigHandler = Callable[[Message], "Awaitable[Any] | Any"]
"""A signal handler: a plain or async function taking the :class:`Message`."""

_H = TypeVar("_H", bound=RigHandler)

_SIGNALS = ExpMessage.any()


class RigService:
    """An auxiliary rig: answers every signal with a completion update.

    For each signal received (init, start, stop, interrupt, cleanup, status,
    info) the rig echoes it (the endpoint does), runs the handler registered
    for its event, then sends the completion update: the same event with the
    handler's return value as data (``[1, result]`` for init,
    ``[2, exp_ref, result]`` for start, ``[32, result]`` for status (the
    received status if the handler returns None), ``[64, status, result]``
    for info). Signals without a handler are still answered, with null data.
    A handler that raises makes the rig send the error report
    ``[0, "Type: text", event]`` instead. An ALYX message is answered only if
    a handler returns ``(base_url, {user: token})``. Between trio-rignet
    endpoints the completion names the signal it answers.

    Handlers run concurrently, each in its own task, so a long ``start``
    handler does not delay a ``stop``: async handlers on the event loop,
    plain functions in a worker thread (so a handler that takes seconds,
    such as starting a camera program, never stalls the rig's echoes). At
    most ``max_handlers`` run at once; a signal beyond that is echoed and
    answered at once with an error report (``RuntimeError: ... busy``), with
    a log line, never dropped silently.

    Use it as an async context manager::

        rig = RigService("udp://0.0.0.0:11001", name="video")

        @rig.handle("init")
        async def init(msg):
            return {"camera": "ready"}

        async with rig:
            await anyio.sleep_forever()

    or start it in a task group: ``address = await tg.start(rig.serve)``.
    Leaving the block waits for running handlers to be cancelled (async) or
    to return (plain functions, which cannot be interrupted).

    Args:
        uri: local address to listen on (port 0: any free port).
        handlers: event -> handler, as an alternative to :meth:`handle`.
        name: label for logs.
        ack: send completion updates (False: only echo, like a bare endpoint).
        max_handlers: handlers running at once (64).
        lost_after: a main PC whose heartbeats stop for this long is ``lost``
            (see :meth:`watch`).
        options: endpoint options (see :class:`~trio_rignet.EndpointOptions`;
            ``clock`` is the clock its clock offsets are measured against).
    """

    def __init__(
        self,
        uri: str = f"udp://0.0.0.0:{LISTEN_PORT}",
        handlers: Mapping[EventLike, RigHandler] | None = None,
        *,
        name: str | None = None,
        ack: bool = True,
        max_handlers: int = 64,
        lost_after: float = 0.8,
        **options: Unpack[EndpointOptions],
    ) -> None:
        if isinstance(max_handlers, bool) or not isinstance(max_handlers, int) or max_handlers < 1:
            raise ValueError(f"max_handlers must be a positive whole number, got {max_handlers!r}")
        self.uri = uri
        self.name = name or uri
        self.ack = ack
        self.max_handlers = max_handlers
        self._options = options
        self._handlers: dict[int, RigHandler] = {}
        self._endpoint: EchoProtocol | None = None
        self._stack: AsyncExitStack | None = None
        self._threads: anyio.CapacityLimiter | None = None
        self._running = 0
        self._busy_log = RateLimit()
        if not lost_after > 0:
            raise ValueError(f"lost_after must be positive seconds, got {lost_after!r}")
        self.lost_after = lost_after
        self._watchers = Watchers()
        for event, handler in (handlers or {}).items():
            self.handle(event)(handler)

    def handle(self, event: EventLike) -> Callable[[_H], _H]:
        """Decorator registering a handler for ``event`` (or every event in ``a | b``)."""

        def register(handler: _H) -> _H:
            if not callable(handler):
                raise TypeError(f"handler must be a function or async function, not {handler!r}")
            for code in event_codes(event):
                self._handlers[code] = handler
            return handler

        return register

    @property
    def endpoint(self) -> EchoProtocol:
        """The listening endpoint (while running)."""
        if self._endpoint is None:
            raise RuntimeError(
                "the rig is not running: use `async with rig:` or tg.start(rig.serve)"
            )
        return self._endpoint

    @property
    def local_address(self) -> Address:
        """``(host, port)`` the rig listens on (while running)."""
        return self.endpoint.local_address

    @property
    def local_uri(self) -> str:
        """The URI a main PC connects to, e.g. ``udp://127.0.0.1:40123`` (while running)."""
        return self.endpoint.uri_of(self.local_address)

    def watch(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Change]]:
        """Liveness changes of the main PCs that send this rig heartbeats, from now on.

        Each :class:`~trio_rignet.Change` names a main PC by its URI: ``up``
        (its first heartbeat), ``lost`` (none for ``lost_after`` seconds),
        ``back`` (heartbeats again; ``restarted`` if from a new session).
        """
        return self._watchers.watch()

    @property
    def running_handlers(self) -> int:
        """Handlers running now."""
        return self._running

    async def serve(self, *, task_status: TaskStatus[Address] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; for ``await tg.start(rig.serve)``, which returns the bound address.

        Cancellation: the endpoint is closed and every handler task cancelled
        (plain handlers already running in a thread are waited for).
        """
        async with self:
            task_status.started(self.local_address)
            await anyio.sleep_forever()

    async def __aenter__(self) -> RigService:
        if self._stack is not None:
            raise RuntimeError("this RigService is already running")
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self._run())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        return await stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _run(self) -> AsyncIterator[None]:
        with collapse_single():
            async with (
                EchoProtocol.server(self.uri, name=self.name, **self._options) as endpoint,
                anyio.create_task_group() as tg,
            ):
                # Threads of its own for plain handlers: AnyIO's default limiter (40
                # threads, shared with the whole program) would hold some back.
                self._threads = anyio.CapacityLimiter(self.max_handlers)
                signals = endpoint.subscription(_SIGNALS, max_buffer=4 * self.max_handlers)
                tg.start_soon(self._receive, endpoint, signals, tg)
                tg.start_soon(watch_pings, endpoint, self.lost_after, self._watchers.notify)
                self._endpoint = endpoint
                try:
                    yield
                finally:
                    self._endpoint = None
                    signals.close()
                    tg.cancel_scope.cancel()

    async def _receive(self, endpoint: EchoProtocol, signals: Subscription, tg: TaskGroup) -> None:
        async for msg in signals:
            if self._running >= self.max_handlers:
                self._busy(endpoint, msg)
                continue
            self._running += 1
            tg.start_soon(self._handle, endpoint, msg)

    def _busy(self, endpoint: EchoProtocol, msg: Message) -> None:
        if self._busy_log.ready(anyio.current_time()):
            log.warning(
                "[%s] %d handlers already running: answered %s from %s with an error "
                "(%d answered so lately)",
                self.name,
                self._running,
                msg.event.name,
                msg.addr,
                self._busy_log.take(),
            )
        error = RuntimeError(f"rig {self.name} busy: {self._running} signals being handled")
        endpoint.send_nowait(build_error(error, msg.event), msg.addr, reply_to=msg)

    async def _handle(self, endpoint: EchoProtocol, msg: Message) -> None:
        try:
            await self._answer(endpoint, msg)
        finally:
            self._running -= 1

    async def _answer(self, endpoint: EchoProtocol, msg: Message) -> None:
        handler = self._handlers.get(int(msg.event))
        assert msg.addr is not None
        try:
            result = None
            if handler is not None:
                if inspect.iscoroutinefunction(handler):
                    result = await handler(msg)
                else:
                    result = await anyio.to_thread.run_sync(handler, msg, limiter=self._threads)
                    if inspect.isawaitable(result):
                        result = await result
            # Built here so that a result that cannot be sent (not JSON, too
            # large, a bad ALYX tuple) is reported like a raising handler
            # instead of crashing the rig's task group.
            reply = _completion(msg, result) if self.ack else None
            if reply is not None and len(reply) > endpoint.max_message_size:
                hint = (
                    " over UDP; use a ws:// (TCP) URI for large messages"
                    if endpoint.protocol == "udp"
                    else ""
                )
                raise ValueError(
                    f"the completion ({len(reply)} bytes) is too large for this endpoint "
                    f"(at most {endpoint.max_message_size} bytes{hint})"
                )
        except Exception as exc:
            log.error(
                "[%s] handler for %s failed: %s: %s",
                self.name,
                msg.event.name,
                type(exc).__name__,
                exc,
            )
            await _quietly(
                endpoint.send(build_error(exc, msg.event), msg.addr, reply_to=msg), self.name
            )
            return
        if reply is None:
            return
        await _quietly(endpoint.confirmed_send(reply, msg.addr, reply_to=msg), self.name)


def _completion(msg: Message, result: Any) -> bytes | None:
    """The completion update for ``msg`` carrying ``result``."""
    event = msg.event
    if event is ExpMessage.EXPSTART:
        exp_ref = msg.data[0] if msg.data else None
        return encode([event, exp_ref, result])
    if event is ExpMessage.EXPSTATUS:
        return encode([event, msg.data[0] if result is None and msg.data else result])
    if event is ExpMessage.EXPINFO:
        status = msg.data[0] if msg.data else None
        return encode([event, status, result])
    if event is ExpMessage.ALYX:
        if result is None:
            return None
        base_url, token = result
        return encode([event, base_url, token])
    return encode([event, result])


async def _quietly(send: Awaitable[None], name: str) -> None:
    try:
        await send
    except (RignetError, OSError) as exc:
        log.warning("[%s] could not answer: %s", name, exc)
