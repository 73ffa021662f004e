"""Delivering received messages: subscriptions and callbacks.

:class:`Events` is owned by an endpoint (composition, not a base class). It
never blocks the receive path: a :class:`Subscription` buffers a bounded
number of messages for its consumer, plain callbacks run inline, and async
callbacks run as tasks in the endpoint's task group, bounded in number.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeAlias

import anyio

from ._errors import EndpointClosed
from ._messages import ExpMessage, Message, event_bits
from ._ratelimit import RateLimit

__all__ = ["Callback", "EventLike", "Events", "Subscription", "event_codes"]

Callback: TypeAlias = Callable[[Message], "Awaitable[Any] | Any"]
"""A callback: a plain or async function taking the received :class:`Message`."""

EventLike: TypeAlias = "str | int | ExpMessage"
"""An event as a name (``"start"``), a code (``2``) or an :class:`ExpMessage`."""

MAX_CALLBACK_TASKS = 1024
"""Async callbacks running at once per endpoint; beyond it, calls are dropped with a log line."""


def event_codes(event: EventLike) -> tuple[int, ...]:
    """The single event codes of ``event`` (``(0,)`` for error reports)."""
    value = ExpMessage.validate(event)
    if not value:
        return (0,)
    return tuple(int(bit) for bit in event_bits(value))


class Subscription:
    """Messages of some events, from one peer or any, buffered for one consumer.

    Iterate with ``async for`` (ends when the endpoint closes) or call
    :meth:`get`; close it (or use it in a ``with`` block) when done. At most
    ``max_buffer`` messages wait; newer ones are dropped with a warning (the
    receive loop never waits for a consumer).
    """

    __slots__ = (
        "_events",
        "_queue",
        "_ready",
        "addr",
        "closed",
        "codes",
        "dropped",
        "max_buffer",
    )

    def __init__(
        self,
        events: Events,
        codes: tuple[int, ...],
        addr: tuple[str, int] | None,
        max_buffer: int,
        notify: Any = None,
    ) -> None:
        self._events = events
        self.codes = codes
        self.addr = addr
        self.max_buffer = max_buffer
        self._queue: deque[Message] = deque()
        # Woken (``.set()``) on every delivery; a caller-given notifier instead of an
        # Event lets one task watch many subscriptions (then it uses receive_nowait).
        self._ready: Any = anyio.Event() if notify is None else notify
        self.closed = False
        self.dropped = 0

    def deliver(self, msg: Message) -> None:
        """Buffer ``msg`` for the consumer (drop it if the buffer is full)."""
        if len(self._queue) >= self.max_buffer:
            self.dropped += 1
            self._events.buffer_full(msg)
            return
        self._queue.append(msg)
        self._ready.set()

    def close(self) -> None:
        """End the subscription: :meth:`get` raises once the buffer is empty."""
        if not self.closed:
            self.closed = True
            self._events.unregister(self)
            self._ready.set()

    async def get(self) -> Message:
        """The next message.

        Raises:
            EndpointClosed: the subscription or its endpoint closed first.

        Cancellation: nothing is consumed.
        """
        queue = self._queue
        while not queue:
            if self.closed:
                raise EndpointClosed(
                    f"{self._events.name}: endpoint closed while awaiting a message"
                )
            if self._ready.is_set():
                self._ready = anyio.Event()
            await self._ready.wait()
        return queue.popleft()

    def receive_nowait(self) -> Message:
        """The next buffered message, without waiting.

        Raises:
            anyio.WouldBlock: none is buffered.
            EndpointClosed: none is buffered and the subscription is closed.
        """
        if self._queue:
            return self._queue.popleft()
        if self.closed:
            raise EndpointClosed(f"{self._events.name}: endpoint closed while awaiting a message")
        raise anyio.WouldBlock

    async def receive(self) -> Message:
        """The next message (as :meth:`get`; the name of AnyIO's receive streams)."""
        return await self.get()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.get()
        except EndpointClosed:
            raise StopAsyncIteration from None


class Events:
    """Subscriptions and callbacks of one endpoint.

    Args:
        name: the endpoint's name, for log lines.
        logger: where log lines go.
        report: called with ``(message, exception)`` when a callback raises
            (the endpoint sends the peer an error report).
    """

    def __init__(
        self, name: str, logger: logging.Logger, report: Callable[[Message, Exception], None]
    ) -> None:
        self.name = name
        self.logger = logger
        self._report = report
        self._subs: dict[int, list[Subscription]] = {}
        self._callbacks: dict[int, list[Callback]] = {}
        self._tasks = 0
        self._spawn: Callable[..., object] | None = None
        self._full_log = RateLimit()
        self._cap_log = RateLimit()

    def start(self, spawn: Callable[..., object]) -> None:
        """Async callbacks run with ``spawn(func, *args)`` from now on."""
        self._spawn = spawn

    # ----------------------------------------------------------- subscriptions

    def subscribe(
        self,
        codes: tuple[int, ...],
        addr: tuple[str, int] | None = None,
        max_buffer: int = 1024,
        notify: Any = None,
    ) -> Subscription:
        """Register a subscription now (pair it with :meth:`Subscription.close`).

        ``notify`` (anything with ``set()``) is woken on each delivery instead
        of the subscription's own event; its owner reads with ``receive_nowait``.
        """
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, got {max_buffer}")
        sub = Subscription(self, codes, addr, max_buffer, notify)
        for code in codes:
            self._subs.setdefault(code, []).append(sub)
        return sub

    def unregister(self, sub: Subscription) -> None:
        for code in sub.codes:
            subs = self._subs.get(code)
            if subs is not None and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._subs[code]

    def buffer_full(self, msg: Message) -> None:
        if self._full_log.ready(anyio.current_time()):
            self.logger.warning(
                "[%s] a subscriber is not keeping up: dropped %s from %s (%d dropped lately)",
                self.name,
                msg.event.name,
                msg.addr,
                self._full_log.take(),
            )

    def close(self) -> None:
        """Close every subscription (their consumers see the end)."""
        subs = {id(s): s for group in self._subs.values() for s in group}
        for sub in subs.values():
            sub.close()
        self._subs.clear()

    # --------------------------------------------------------------- callbacks

    def assign(self, event: EventLike, callback: Callback) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be a function or async function, not {callback!r}")
        for code in event_codes(event):
            self._callbacks.setdefault(code, []).append(callback)

    def clear(self, event: EventLike, callback: Callback | None = None) -> int:
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

    # ---------------------------------------------------------------- dispatch

    def dispatch(self, msg: Message) -> None:
        """Deliver ``msg`` to its subscriptions and callbacks; never blocks."""
        code = int(msg.event)
        subs = self._subs.get(code)
        if subs:
            for sub in subs:
                if sub.addr is None or sub.addr == msg.addr:
                    sub.deliver(msg)
        callbacks = self._callbacks.get(code)
        if not callbacks:
            return
        for callback in list(callbacks):
            if inspect.iscoroutinefunction(callback):
                self._start(self._run, callback, msg)
                continue
            try:
                result = callback(msg)
            except Exception as exc:
                self._failed(callback, msg, exc)
                continue
            if inspect.isawaitable(result):
                self._start(self._await, callback, msg, result)

    def _start(self, func: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._tasks >= MAX_CALLBACK_TASKS or self._spawn is None:
            # A flooding peer must not grow the task count without bound.
            if self._cap_log.ready(anyio.current_time()):
                self.logger.warning(
                    "[%s] %d async callbacks already running: dropped one for %s "
                    "(%d dropped lately)",
                    self.name,
                    self._tasks,
                    args[1].event.name,
                    self._cap_log.take(),
                )
            if inspect.iscoroutine(args[-1]):
                args[-1].close()
            return
        self._tasks += 1
        self._spawn(func, *args)

    async def _run(self, callback: Callback, msg: Message) -> None:
        try:
            await callback(msg)
        except Exception as exc:
            self._failed(callback, msg, exc)
        finally:
            self._tasks -= 1

    async def _await(self, callback: Callback, msg: Message, result: Awaitable[Any]) -> None:
        try:
            await result
        except Exception as exc:
            self._failed(callback, msg, exc)
        finally:
            self._tasks -= 1

    def _failed(self, callback: Callback, msg: Message, exc: Exception) -> None:
        self.logger.error(
            "[%s] callback %r for %s failed: %s: %s",
            self.name,
            callback,
            msg.event.name,
            type(exc).__name__,
            exc,
        )
        self._report(msg, exc)
