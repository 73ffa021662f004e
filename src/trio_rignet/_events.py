"""Events of an endpoint: subscriptions, callbacks and dispatch of received messages.

:class:`Events` is the base class of :class:`~trio_rignet.EchoProtocol`; it holds
the registries and delivers each new message to them. It never blocks the
receive loop: subscriptions have bounded buffers and async callbacks run as
tasks (bounded in number) in the endpoint's task group.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._errors import EndpointClosed
from ._messages import ExpMessage, Message, event_bits
from ._transport import Address

__all__ = ["Callback", "Collector", "EventLike", "Events", "event_codes"]

Callback: TypeAlias = Callable[[Message], "Awaitable[Any] | Any"]
"""A callback: a plain or async function taking the received :class:`Message`."""

EventLike: TypeAlias = "str | int | ExpMessage"

_MAX_CALLBACK_TASKS = 1024
_COLLECTOR_LIMIT = 1024


class _Subscription:
    """A public subscription: a bounded memory stream the subscriber iterates."""

    __slots__ = ("addr", "dropped", "send")

    def __init__(self, send: MemoryObjectSendStream[Message], addr: Address | None) -> None:
        self.send = send
        self.addr = addr
        self.dropped = 0

    def deliver(self, msg: Message, owner: Events) -> None:
        try:
            self.send.send_nowait(msg)
        except anyio.WouldBlock:
            self.dropped += 1
            owner.logger.warning(
                "[%s] subscriber buffer full: dropped %s from %s",
                owner.name,
                msg.event.name,
                msg.addr,
            )
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass

    def close(self) -> None:
        self.send.close()


class Collector:
    """An internal wait for messages: a short queue and an Event, registered synchronously.

    Lighter than a subscription's memory stream and async context manager, for
    the per-rig, per-signal waits of :class:`~trio_rignet.Services`.
    """

    __slots__ = ("addr", "closed", "event", "queue")

    def __init__(self, addr: Address | None) -> None:
        self.addr = addr
        self.queue: deque[Message] = deque()
        self.event = anyio.Event()
        self.closed = False

    def deliver(self, msg: Message, owner: Events) -> None:
        if len(self.queue) < _COLLECTOR_LIMIT:
            self.queue.append(msg)
            self.event.set()

    def close(self) -> None:
        self.closed = True
        self.event.set()

    async def get(self) -> Message:
        """The next message.

        Raises:
            EndpointClosed: the endpoint closed first.
        """
        while not self.queue:
            if self.closed:
                raise EndpointClosed("endpoint closed while awaiting a message")
            if self.event.is_set():
                self.event = anyio.Event()
            await self.event.wait()
        return self.queue.popleft()


class Events:
    """Subscriptions and callbacks for received messages (base of EchoProtocol)."""

    name: str
    logger: logging.Logger
    _tg: TaskGroup | None

    def __init__(self) -> None:
        self._subs: dict[int, list[_Subscription | Collector]] = {}
        self._callbacks: dict[int, list[Callback]] = {}
        self._callback_tasks = 0

    def _check_open(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    async def _report_callback_error(
        self, callback: Callback, msg: Message, exc: Exception
    ) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _close_subscriptions(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.close()
        self._subs.clear()

    def _collect(self, codes: tuple[int, ...], addr: Address | None = None) -> Collector:
        """Register a :class:`Collector` for ``codes``; pair with :meth:`_uncollect`."""
        self._check_open()
        collector = Collector(addr)
        for code in codes:
            self._subs.setdefault(code, []).append(collector)
        return collector

    def _uncollect(self, collector: Collector, codes: tuple[int, ...]) -> None:
        self._unregister(collector, codes)

    def _unregister(self, sub: _Subscription | Collector, codes: tuple[int, ...]) -> None:
        for code in codes:
            subs = self._subs.get(code)
            if subs is not None and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._subs[code]

    async def _dispatch(self, msg: Message) -> None:
        code = int(msg.event)
        subs = self._subs.get(code)
        if subs:
            for sub in subs:
                if sub.addr is None or sub.addr == msg.addr:
                    sub.deliver(msg, self)
        callbacks = self._callbacks.get(code)
        if not callbacks:
            return
        for callback in list(callbacks):
            if inspect.iscoroutinefunction(callback):
                self._spawn_callback(self._run_async_callback, callback, msg)
                continue
            try:
                result = callback(msg)
                if inspect.isawaitable(result):
                    self._spawn_callback(self._await_callback_result, callback, msg, result)
            except Exception as exc:
                await self._report_callback_error(callback, msg, exc)

    def _spawn_callback(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._callback_tasks >= _MAX_CALLBACK_TASKS:
            # A flooding peer must not grow the task count without bound.
            self.logger.warning(
                "[%s] %d async callbacks already running: dropped one for %s",
                self.name,
                self._callback_tasks,
                args[1].event.name,
            )
            if inspect.iscoroutine(args[-1]):
                args[-1].close()
            return
        assert self._tg is not None
        self._callback_tasks += 1
        self._tg.start_soon(func, *args)

    async def _run_async_callback(self, callback: Callback, msg: Message) -> None:
        try:
            await callback(msg)
        except Exception as exc:
            await self._report_callback_error(callback, msg, exc)
        finally:
            self._callback_tasks -= 1

    async def _await_callback_result(
        self, callback: Callback, msg: Message, result: Awaitable[Any]
    ) -> None:
        try:
            await result
        except Exception as exc:
            await self._report_callback_error(callback, msg, exc)
        finally:
            self._callback_tasks -= 1

    @asynccontextmanager
    async def subscribe(
        self, event: EventLike, *, max_buffer: int = 1024
    ) -> AsyncIterator[AsyncIterator[Message]]:
        """Receive every message of ``event`` (or of any of ``a | b``) from now on.

        Registered on entry, so nothing that arrives after entering the block
        is missed::

            async with rig.subscribe(ExpMessage.EXPSTART | ExpMessage.EXPEND) as messages:
                async for msg in messages:
                    ...

        Args:
            event: an event or a bitwise combination; ``0`` for error reports.
            max_buffer: messages held while the consumer lags; beyond that new
                ones are dropped with a warning (the receive loop never blocks).

        The iterator ends when the endpoint closes. Leaving the block (also by
        cancellation) unregisters the subscription; undelivered messages are
        discarded.
        """
        async with self._subscribe(event_codes(event), None, max_buffer) as messages:
            yield messages

    @asynccontextmanager
    async def _subscribe(
        self, codes: tuple[int, ...], addr: Address | None, max_buffer: int = 1024
    ) -> AsyncIterator[MemoryObjectReceiveStream[Message]]:
        self._check_open()
        send, receive = anyio.create_memory_object_stream[Message](max_buffer)
        sub = _Subscription(send, addr)
        for code in codes:
            self._subs.setdefault(code, []).append(sub)
        try:
            with receive:
                yield receive
        finally:
            send.close()
            self._unregister(sub, codes)

    async def on_event(self, event: EventLike) -> Message:
        """Wait for the next message of ``event`` (or of any event in ``a | b``).

        Registered when called; to be sure not to miss a reply to something
        you send, use :meth:`subscribe` around the send instead. No timeout:
        wrap in ``anyio.fail_after``.

        Raises:
            EndpointClosed: the endpoint closed first.

        Cancellation: the wait is unregistered.
        """
        async with self.subscribe(event) as messages:
            async for msg in messages:
                return msg
        raise EndpointClosed(f"{self.name}: endpoint closed while awaiting {event!r}")

    def assign_callback(self, event: EventLike, callback: Callback) -> None:
        """Call ``callback(message)`` for every message of ``event`` (or ``a | b``).

        Plain functions run inline in the receive task (keep them short);
        async functions run as tasks in the endpoint's task group and never
        block receiving. If a callback raises, the error is logged, the sender
        gets an error report ``[0, "Type: text", event]``, and the other
        callbacks still run.

        Raises:
            TypeError: ``callback`` is not callable, or ``event`` is invalid.
            ValueError: ``event`` is unknown.
        """
        if not callable(callback):
            raise TypeError(f"callback must be a function or async function, not {callback!r}")
        for code in event_codes(event):
            self._callbacks.setdefault(code, []).append(callback)

    def clear_callbacks(self, event: EventLike, callback: Callback | None = None) -> int:
        """Remove ``callback`` (or all callbacks) for ``event``; return how many were removed."""
        removed = 0
        for code in event_codes(event):
            callbacks = self._callbacks.get(code)
            if not callbacks:
                continue
            if callback is None:
                removed += len(callbacks)
                callbacks.clear()
            else:
                kept = [cb for cb in callbacks if cb != callback]
                removed += len(callbacks) - len(kept)
                callbacks[:] = kept
            if not callbacks:
                del self._callbacks[code]
        return removed


def event_codes(event: EventLike) -> tuple[int, ...]:
    value = ExpMessage.validate(event)
    if not value:
        return (0,)
    return tuple(int(bit) for bit in event_bits(value))
