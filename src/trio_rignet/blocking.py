"""The blocking facade: trio-rignet for synchronous code (GUIs, task loops, scripts).

::

    from trio_rignet import blocking

    with blocking.Services.open({"video": "udp://10.0.0.2", "ephys": "ws://10.0.0.3"}) as rigs:
        rigs.init({"subject": "mouse1"})
        rigs.start("2024-01-01_1_mouse1")

:meth:`Services.open` starts one background thread that runs an event loop
(Trio by default, or asyncio) with an AnyIO :class:`~anyio.from_thread.BlockingPortal`,
and opens the rigs' endpoints in it with :meth:`trio_rignet.Services.open`.
Every method of the facade runs the async method of the same name as a task on
that loop and blocks the calling thread until it ends: it returns the same
value, or raises the same exception object, in the calling thread. Any number
of threads may call at once; their signals run concurrently on the loop.

Where code runs:

- the **loop thread** (``trio-rignet loop``) runs the protocol: sockets,
  echoes, timeouts. None of your code runs there.
- **your threads** block in the facade's methods, or in
  :meth:`Subscription.get` / iteration while they wait for messages.
- **callbacks** (:meth:`Services.assign_callback`) run in one facade-owned
  thread (``trio-rignet callbacks``), one after another in arrival order, or
  in the :class:`~concurrent.futures.Executor` you name.

Leaving the ``with`` block (or :meth:`Services.close`, from any thread) cancels
calls in flight (they raise :class:`~trio_rignet.EndpointClosed`), ends every
subscription, closes the endpoints, and joins both threads.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import inspect
import logging
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Executor, Future
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from ._core import EchoStats
from ._echo import EchoProtocol, EndpointOptions, StatusLike
from ._errors import EndpointClosed
from ._events import EventLike, event_codes
from ._messages import AlyxLike, Message
from ._ratelimit import RateLimit
from ._services import RigState, ServicesError
from ._services import Services as AsyncServices
from ._uri import validate_uri

if TYPE_CHECKING:
    from typing_extensions import Self, Unpack

__all__ = ["Rig", "RigMessage", "Services", "Subscription"]

log = logging.getLogger("trio_rignet.blocking")

T = TypeVar("T")

BACKENDS = ("trio", "asyncio")

MAX_PENDING_CALLBACKS = 1024
"""Callbacks waiting for the callback thread; beyond it, new ones are dropped with a warning."""

# Waits in the main thread are cut into slices on Windows, where Ctrl-C does not
# interrupt a lock wait without a timeout on every Python version; elsewhere a
# signal interrupts the wait, which needs no slicing. Only the main thread receives
# signals. A slice ends early as soon as what is awaited happens.
_MAIN_THREAD_SLICE: float | None = 0.1 if sys.platform == "win32" else None


def _slice(remaining: float | None) -> float | None:
    """How long one wait may block: ``remaining`` (None: no limit), cut for Ctrl-C."""
    step = _MAIN_THREAD_SLICE
    if step is None or threading.current_thread() is not threading.main_thread():
        return remaining
    return step if remaining is None else min(step, remaining)


def _wait_any(*futures: Future[Any]) -> None:
    """Block until one of ``futures`` is done (interruptible by Ctrl-C)."""
    while True:
        done, _ = concurrent.futures.wait(futures, _slice(None), FIRST_COMPLETED)
        if done:
            return


def _check_fail_after(fail_after: float | None) -> float | None:
    if fail_after is None:
        return None
    if (
        isinstance(fail_after, bool)
        or not isinstance(fail_after, (int, float))
        or not 0 < fail_after < math.inf
    ):
        raise ValueError(
            f"fail_after must be a positive number of seconds or None, got {fail_after!r}"
        )
    return float(fail_after)


def _check_wait_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(
            f"timeout must be a number of seconds, 0 or more, or None; got {timeout!r}"
        )
    return float(timeout)


class RigMessage(NamedTuple):
    """A message received from a rig, as a :class:`Subscription` yields it.

    Attributes:
        rig: the rig's name.
        message: the :class:`~trio_rignet.Message`.
    """

    rig: str
    message: Message


class _Closed(Exception):
    """A mailbox is closed and empty."""


class _Mailbox(Generic[T]):
    """A bounded FIFO: the loop thread puts, any thread gets (with a timeout)."""

    __slots__ = ("_cond", "_items", "closed", "dropped", "max_items")

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Add ``item``; False if it was dropped (the box is full or closed)."""
        with self._cond:
            if self.closed:
                return False
            if len(self._items) >= self.max_items:
                self.dropped += 1
                return False
            self._items.append(item)
            self._cond.notify()
            return True

    def get(self, timeout: float | None) -> T:
        """The oldest item; TimeoutError after ``timeout`` s; _Closed once closed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items:
                if self.closed:
                    raise _Closed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                self._cond.wait(_slice(remaining))
            return self._items.popleft()

    def close(self, discard: bool = False) -> None:
        """Wake every reader; they get what is left, then _Closed (nothing if ``discard``)."""
        with self._cond:
            self.closed = True
            if discard:
                self._items.clear()
            self._cond.notify_all()


Delivery = Callable[[Callable[..., Any], tuple[Any, ...], str], None]
"""Hands ``callback``, its arguments and the rig's name to the thread that runs it."""


def _call_safely(callback: Callable[..., Any], args: tuple[Any, ...], rig: str) -> None:
    """Run a user callback; log anything it raises (the thread it runs in goes on)."""
    try:
        callback(*args)
    except BaseException:  # a callback must not end its thread silently
        log.exception("callback %r for %s from rig %r failed", callback, args[0].event.name, rig)


class _CallbackThread:
    """The facade's own callback thread: runs callbacks one at a time, in order."""

    def __init__(self, name: str) -> None:
        self.box: _Mailbox[tuple[Callable[..., Any], tuple[Any, ...], str]] = _Mailbox(
            MAX_PENDING_CALLBACKS
        )
        self._full_log = RateLimit()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, callback: Callable[..., Any], args: tuple[Any, ...], rig: str) -> None:
        """Queue a callback (called in the loop thread; never blocks)."""
        dropped = not self.box.put((callback, args, rig)) and not self.box.closed
        if dropped and self._full_log.ready(time.monotonic()):
            log.warning(
                "%d callbacks already wait for the callback thread (a callback is slow or "
                "blocked): dropped one for %s (%d dropped lately)",
                self.box.max_items,
                args[0].event.name,
                self._full_log.take(),
            )

    def _run(self) -> None:
        while True:
            try:
                callback, args, rig = self.box.get(None)
            except _Closed:
                return
            _call_safely(callback, args, rig)


class _Forward:
    """Registered on an endpoint: hands each message to a user callback's thread."""

    __slots__ = ("args", "callback", "codes", "deliver", "rig")

    def __init__(
        self,
        callback: Callable[..., Any],
        rig: Rig,
        with_rig: bool,
        deliver: Delivery,
        codes: set[int],
    ) -> None:
        self.callback = callback
        self.rig = rig.name
        self.args: tuple[Any, ...] = (rig,) if with_rig else ()
        self.deliver = deliver
        self.codes = codes

    def __call__(self, msg: Message) -> None:
        self.deliver(self.callback, (msg, *self.args), self.rig)


def _executor_delivery(executor: Executor) -> Delivery:
    def deliver(callback: Callable[..., Any], args: tuple[Any, ...], rig: str) -> None:
        try:
            executor.submit(_call_safely, callback, args, rig)
        except Exception as exc:  # e.g. the executor was shut down
            log.error(
                "could not hand the callback %r for %s to %r: %s: %s",
                callback,
                args[0].event.name,
                executor,
                type(exc).__name__,
                exc,
            )

    return deliver


class _Feed:
    """Registered on an endpoint: puts each message in a subscription's mailbox."""

    __slots__ = ("_full_log", "box", "codes", "name")

    def __init__(self, box: _Mailbox[RigMessage], name: str, codes: tuple[int, ...]) -> None:
        self.box = box
        self.name = name
        self.codes = codes
        self._full_log = RateLimit()

    def __call__(self, msg: Message) -> None:
        dropped = not self.box.put(RigMessage(self.name, msg)) and not self.box.closed
        if dropped and self._full_log.ready(time.monotonic()):
            log.warning(
                "a blocking subscription is not read fast enough: dropped %s from %s "
                "(%d dropped lately)",
                msg.event.name,
                self.name,
                self._full_log.take(),
            )


class _Job:
    """One call running on the loop: ``finished`` resolves when its task has ended."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished: Future[None] = Future()


class _Loop:
    """The loop thread, its portal, the async Services, and the callback thread.

    Shared by a :class:`Services` and every view of it (:meth:`Services.without`).
    """

    def __init__(self, backend: str, backend_options: Mapping[str, Any] | None) -> None:
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.portal: BlockingPortal | None = None
        self._scope: anyio.CancelScope | None = None
        self._ready: Future[None] = Future()
        self.opened: Future[AsyncServices] = Future()
        self.done: Future[None] = Future()  # the loop thread has ended
        self._lock = threading.Lock()
        self.closing = False
        self.reason: BaseException | None = None  # why the loop ended on its own
        self._active = 0  # calls running on the loop (touched in the loop thread only)
        self._jobs: set[anyio.CancelScope] = set()  # their cancel scopes (idem)
        self._idle: anyio.Event | None = None
        self.callbacks: _CallbackThread | None = None
        self.subscriptions: set[Subscription] = set()
        self.forwards: dict[str, list[_Forward]] = {}  # rig name -> its callbacks
        self.rigs: dict[str, Rig] = {}  # rig name -> its handle, shared by every view
        self._args: tuple[Mapping[str, str], float | None, float | None, EndpointOptions] | None
        self._args = None
        kwargs: dict[str, Any] = {}
        if sys.version_info >= (3, 14):  # pragma: no cover - a fresh context, as AnyIO does
            kwargs["context"] = contextvars.Context()
        self.thread = threading.Thread(
            target=self._thread_main, name=f"trio-rignet loop ({backend})", daemon=True, **kwargs
        )

    # ------------------------------------------------------------ loop thread

    def start(
        self,
        rigs: Mapping[str, str],
        timeout: float | None,
        wait: float | None,
        options: EndpointOptions,
    ) -> AsyncServices:
        """Start the loop thread, open the rigs in it; their Services."""
        self._args = (rigs, timeout, wait, options)
        self.thread.start()
        try:
            _wait_any(self.opened, self.done)
        except BaseException:  # Ctrl-C while opening: cancel it, leave nothing behind
            self._abort_open()
            raise
        if not self.opened.done():
            self.thread.join()
            raise self._ended_error("opening the rigs")
        try:
            return self.opened.result()
        except BaseException:
            self.thread.join()
            raise

    def _abort_open(self) -> None:
        self.closing = True
        _wait_any(self._ready, self.done)
        portal, scope = self.portal, self._scope
        if portal is not None and scope is not None and not self.done.done():
            with contextlib.suppress(RuntimeError):  # the loop has just ended
                portal.call(scope.cancel)
        self.thread.join()

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main, backend=self.backend, backend_options=self.backend_options)
        except BaseException as exc:  # the loop ended on an error: record it, never drop it
            self._ended(exc)
            if not self.opened.done():
                self.opened.set_exception(exc)
            else:
                log.critical(
                    "the trio-rignet event loop thread ended on an error; the blocking "
                    "Services is closed",
                    exc_info=exc,
                )
        finally:
            for future in (self._ready, self.opened):
                if not future.done():
                    future.set_exception(self._ended_error("opening the rigs"))
            self.done.set_result(None)

    async def _main(self) -> None:
        assert self._args is not None
        rigs, timeout, wait, options = self._args
        async with BlockingPortal() as portal:
            with anyio.CancelScope() as scope:
                self.portal, self._scope = portal, scope
                self._idle = anyio.Event()
                self._ready.set_result(None)
                try:
                    async with AsyncServices.open(
                        rigs, timeout=timeout, wait=wait, **options
                    ) as services:
                        self.opened.set_result(services)
                        await portal.sleep_until_stopped()
                        # close() cancelled every call in flight: let them end before
                        # the endpoints close, so that they raise EndpointClosed. (Not
                        # portal.stop(cancel_remaining=True): it would cancel this task,
                        # the portal's host, too.)
                        while self._active:
                            await self._idle.wait()
                            self._idle = anyio.Event()
                except Exception as exc:
                    if not self.opened.done():
                        self.opened.set_exception(exc)
                        return
                    # The rigs' endpoints failed while open: end every call, say why.
                    self._ended(exc)
                    log.error(
                        "the rigs' endpoints failed; the blocking Services is closed",
                        exc_info=exc,
                    )
                    self._cancel_jobs()
                    await portal.stop()
            if not self.opened.done():  # cancelled while opening
                self.opened.set_exception(EndpointClosed("opening the rigs was cancelled"))

    def _ended(self, exc: BaseException) -> None:
        with self._lock:
            if self.reason is None and not self.closing:
                self.reason = exc
            self.closing = True
            subscriptions = list(self.subscriptions)
        for sub in subscriptions:
            sub._box.close()

    async def _run_job(
        self,
        job: _Job,
        what: str,
        func: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        fail_after: float | None,
    ) -> T:
        self._active += 1
        try:
            with anyio.CancelScope() as scope:
                self._jobs.add(scope)
                if self.closing:
                    scope.cancel()
                if fail_after is None:
                    return await func(*args)
                with anyio.move_on_after(fail_after):
                    return await func(*args)
                raise TimeoutError(
                    f"{what} did not finish within fail_after={fail_after:g} s and was "
                    "cancelled (a rig may have received the signal; the endpoints are still open)"
                )
            raise self._ended_error(what)  # cancelled by close() (or a failure of the loop)
        finally:
            self._jobs.discard(scope)
            self._active -= 1
            if not self._active and self._idle is not None:
                self._idle.set()
            job.finished.set_result(None)

    def _cancel_jobs(self) -> None:
        """Cancel every call in flight (in the loop thread); each raises EndpointClosed."""
        for scope in self._jobs:
            scope.cancel()

    async def _shutdown(self) -> None:
        """close(), in the loop thread: end the calls in flight, then the main task."""
        assert self.portal is not None
        self._cancel_jobs()
        await self.portal.stop()

    # ----------------------------------------------------------- any thread

    def check_thread(self) -> None:
        if threading.current_thread() is self.thread:
            raise RuntimeError(
                "a blocking Services method was called from its own event loop thread (an "
                "executor whose submit() runs the function at once?): call it from another "
                "thread"
            )

    def check_open(self, what: str) -> None:
        if self.closing:
            raise self._ended_error(what)

    def _ended_error(self, what: str) -> EndpointClosed:
        reason = self.reason
        if reason is None:
            error = EndpointClosed(f"{what}: the blocking Services is closed")
        else:
            error = EndpointClosed(
                f"{what}: the blocking Services is closed: its event loop failed "
                f"({type(reason).__name__}: {reason})"
            )
        error.__cause__ = reason
        return error

    def run(
        self,
        what: str,
        func: Callable[..., Awaitable[T]],
        *args: Any,
        fail_after: float | None = None,
    ) -> T:
        """Run ``await func(*args)`` on the loop; block until it ends; its result or error."""
        self.check_thread()
        fail_after = _check_fail_after(fail_after)
        self.check_open(what)
        portal = self.portal
        assert portal is not None
        job = _Job()
        try:
            future: Future[T] = portal.start_task_soon(
                self._run_job, job, what, func, args, fail_after
            )
        except RuntimeError:  # the portal stopped meanwhile (closed)
            if self.closing or self.done.done():
                raise self._ended_error(what) from self.reason
            raise
        try:
            _wait_any(future, self.done)
        except BaseException:
            # Ctrl-C (or another exception) in this thread: cancel the call and
            # wait for it to end, so that nothing is left running on its behalf.
            future.cancel()
            _wait_any(job.finished, self.done)
            raise
        if not future.done() or future.cancelled():
            raise self._ended_error(what)
        return future.result()

    def call(self, what: str, func: Callable[..., T], *args: Any) -> T:
        """Run the plain function ``func(*args)`` in the loop thread; its result."""

        async def call() -> T:
            return func(*args)

        return self.run(what, call)

    def callback_thread(self) -> _CallbackThread:
        with self._lock:
            if self.closing:
                raise self._ended_error("assign_callback")
            if self.callbacks is None:
                self.callbacks = _CallbackThread("trio-rignet callbacks")
            return self.callbacks

    def close(self) -> None:
        # Every step is idempotent: concurrent calls, or a call after one that was
        # interrupted (Ctrl-C while joining), all end with everything closed.
        self.check_thread()
        with self._lock:
            self.closing = True
            subscriptions = list(self.subscriptions)
        for sub in subscriptions:
            sub._box.close()
        portal = self.portal
        if portal is not None and not self.done.done():
            with contextlib.suppress(RuntimeError):  # stopped already (or the loop ended)
                portal.call(self._shutdown)
        self.thread.join()  # the loop thread never waits for any other thread
        with self._lock:
            callbacks = self.callbacks
        if callbacks is not None:
            callbacks.box.close(discard=True)
            if threading.current_thread() is not callbacks.thread:
                callbacks.thread.join()


class Subscription(Iterator[RigMessage]):
    """Messages of some events from some rigs, buffered for the threads that read them.

    Get one from :meth:`Services.subscribe` or :meth:`Rig.subscribe`. It is
    registered before that call returns: every message that arrives later is
    buffered here, including the completion update of a signal sent after
    subscribing. Read it from any thread::

        with rigs.subscribe("status", timeout=5) as updates:
            rigs.start(exp_ref)
            for rig, msg in updates:  # each wait at most 5 s, then TimeoutError
                ...

    Iteration ends when the subscription or its Services is closed. At most
    ``max_buffer`` messages wait; newer ones are dropped with a warning (the
    event loop never waits for a reader). Several threads may read at once;
    each message goes to one of them.

    Attributes:
        timeout: seconds each step of the iteration waits (None: no limit).
    """

    _loop: _Loop
    _feeds: dict[str, _Feed]
    _box: _Mailbox[RigMessage]
    timeout: float | None

    def __init__(self) -> None:
        raise TypeError("subscriptions come from Services.subscribe() or Rig.subscribe()")

    @classmethod
    def _create(
        cls, loop: _Loop, feeds: dict[str, _Feed], box: _Mailbox[RigMessage], timeout: float | None
    ) -> Subscription:
        self = object.__new__(cls)
        self._loop = loop
        self._feeds = feeds
        self._box = box
        self.timeout = timeout
        return self

    @property
    def closed(self) -> bool:
        """True once closed (by :meth:`close` or by closing its Services)."""
        return self._box.closed

    @property
    def dropped(self) -> int:
        """Messages dropped because ``max_buffer`` of them were waiting."""
        return self._box.dropped

    def get(self, timeout: float | None = None) -> RigMessage:
        """The next message, waiting at most ``timeout`` seconds (None: no limit, 0: no wait).

        Raises:
            TimeoutError: no message within ``timeout``.
            EndpointClosed: the subscription (or its Services) is closed and
                every buffered message was read.
        """
        timeout = _check_wait_timeout(timeout)
        try:
            return self._box.get(timeout)
        except TimeoutError:
            raise TimeoutError(f"no message within {timeout:g} s") from None
        except _Closed:
            raise EndpointClosed("the subscription is closed") from self._loop.reason

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> RigMessage:
        """The next message, waiting at most :attr:`timeout` (then TimeoutError)."""
        try:
            return self._box.get(self.timeout)
        except TimeoutError:
            assert self.timeout is not None
            raise TimeoutError(f"no message within {self.timeout:g} s") from None
        except _Closed:
            raise StopIteration from None

    def close(self) -> None:
        """Unregister from the rigs and end the iteration (from any thread). Idempotent.

        Messages already buffered can still be read with :meth:`get`.
        """
        with self._loop._lock:
            self._loop.subscriptions.discard(self)
        if self._box.closed:
            return
        self._box.close()
        if self._loop.closing:
            return
        services = self._loop.opened.result()

        def unregister() -> None:
            for name, feed in self._feeds.items():
                rig = services[name]
                for code in feed.codes:
                    rig.clear_callbacks(code, feed)

        with contextlib.suppress(EndpointClosed):  # closed meanwhile: nothing to unregister
            self._loop.call("close the subscription", unregister)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _subscribe(
    loop: _Loop,
    services: AsyncServices,
    names: list[str],
    event: EventLike,
    timeout: float | None,
    max_buffer: int,
) -> Subscription:
    timeout = _check_wait_timeout(timeout)
    if isinstance(max_buffer, bool) or not isinstance(max_buffer, int) or max_buffer < 1:
        raise ValueError(f"max_buffer must be a positive whole number, got {max_buffer!r}")
    box: _Mailbox[RigMessage] = _Mailbox(max_buffer)

    def register() -> dict[str, _Feed]:
        codes = event_codes(event)
        feeds = {name: _Feed(box, name, codes) for name in names}
        for name, feed in feeds.items():
            services[name].assign_callback(event, feed)
        return feeds

    feeds = loop.call("subscribe", register)
    sub = Subscription._create(loop, feeds, box, timeout)
    with loop._lock:
        closing = loop.closing
        if not closing:
            loop.subscriptions.add(sub)
    if closing:
        box.close()
    return sub


class Rig:
    """One rig of a blocking :class:`Services`: ``rigs["video"]``.

    Its methods block the calling thread like those of :class:`Services`, and
    raise what the same methods of :class:`~trio_rignet.EchoProtocol` raise.
    ``fail_after`` bounds a call as for :meth:`Services.init`.
    """

    _loop: _Loop
    name: str
    """The rig's name in its Services."""

    def __init__(self) -> None:
        raise TypeError('a Rig comes from its blocking Services: rigs["video"]')

    @classmethod
    def _create(cls, loop: _Loop, name: str) -> Rig:
        self = object.__new__(cls)
        self._loop = loop
        self.name = name
        return self

    def _endpoint(self) -> EchoProtocol:
        return self._loop.opened.result()[self.name]

    def __repr__(self) -> str:
        return f"<blocking Rig {self.name!r}>"

    @property
    def server_uri(self) -> str:
        """The rig's URI (validated: an IP address and a port)."""
        return self._endpoint().server_uri

    @property
    def is_connected(self) -> bool:
        """True while the rig's endpoint can send (TCP: its connection is up)."""
        return self._loop.call("is_connected", lambda: self._endpoint().is_connected)

    @property
    def stats(self) -> EchoStats:
        """A copy of the endpoint's counters and echo round-trip times, taken now."""
        return self._loop.call("stats", lambda: replace(self._endpoint().stats))

    def is_trio_peer(self) -> bool:
        """True if the rig has sent a message tagged by trio-rignet."""
        return self._loop.call("is_trio_peer", lambda: self._endpoint().is_trio_peer())

    def awaiting_response(self) -> bool:
        """True if a confirmed send to this rig awaits its echo."""
        return self._loop.call("awaiting_response", lambda: self._endpoint().awaiting_response())

    def wait_connected(self, *, fail_after: float | None = None) -> None:
        """Block until the rig is connected (TCP with ``reconnect``); at once otherwise.

        Raises:
            TimeoutError: not connected within ``fail_after``.
            EndpointClosed: the Services was closed first.
        """
        self._loop.run(
            f"{self.name}: wait_connected",
            lambda: self._endpoint().wait_connected(),
            fail_after=fail_after,
        )

    def send(self, data: Any) -> None:
        """Send a message without waiting for its echo (see
        :meth:`EchoProtocol.send <trio_rignet.EchoProtocol.send>`)."""
        self._loop.run(f"{self.name}: send", lambda: self._endpoint().send(data))

    def confirmed_send(
        self, data: Any, timeout: float | None = None, *, fail_after: float | None = None
    ) -> None:
        """Send a message and block until the rig echoes it (see
        :meth:`EchoProtocol.confirmed_send <trio_rignet.EchoProtocol.confirmed_send>`;
        ``timeout`` is the echo timeout).

        Raises:
            EchoTimeout, PeerUnavailable, EndpointClosed, TypeError, ValueError:
                as the async method.
            TimeoutError: ``fail_after`` passed first (the send was cancelled).
        """
        self._loop.run(
            f"{self.name}: confirmed_send",
            lambda: self._endpoint().confirmed_send(data, timeout=timeout),
            fail_after=fail_after,
        )

    def call(
        self,
        data: Any,
        *,
        event: EventLike | None = None,
        echo_timeout: float | None = None,
        timeout: float | None = 10.0,
        fail_after: float | None = None,
    ) -> Message:
        """Signal the rig and block until its completion update; return that message (see
        :meth:`EchoProtocol.call <trio_rignet.EchoProtocol.call>`).

        Raises:
            EchoTimeout, CompletionTimeout, RemoteError, PeerUnavailable,
                EndpointClosed, TypeError, ValueError: as the async method.
            TimeoutError: ``fail_after`` passed first (the call was cancelled).
        """
        return self._loop.run(
            f"{self.name}: call",
            lambda: self._endpoint().call(
                data, event=event, echo_timeout=echo_timeout, timeout=timeout
            ),
            fail_after=fail_after,
        )

    def subscribe(
        self, event: EventLike, *, timeout: float | None = None, max_buffer: int = 1024
    ) -> Subscription:
        """Buffer every message of ``event`` (or ``a | b``) from this rig from now on.

        As :meth:`Services.subscribe`, for this rig only.
        """
        loop = self._loop
        loop.check_thread()
        loop.check_open("subscribe")
        return _subscribe(loop, loop.opened.result(), [self.name], event, timeout, max_buffer)


def _resolve(rigs: Mapping[str, str]) -> dict[str, str]:
    """Every rig's URI validated, its host resolved; ServicesError naming the rigs that fail."""
    resolved: dict[str, str] = {}
    failures: dict[str, BaseException] = {}
    for name, uri in rigs.items():
        try:
            resolved[name] = validate_uri(uri)
        except (ValueError, TypeError, OSError) as exc:
            failures[name] = exc
    if failures:
        raise ServicesError(None, dict.fromkeys(resolved), failures)
    return resolved


class Services(Mapping[str, Rig]):
    """Rigs signalled together, from synchronous code: :class:`trio_rignet.Services`
    behind a blocking facade.

    Open it with :meth:`open`; it is a mapping of rig name to :class:`Rig`. Its
    signal methods take the arguments of the async methods of the same name,
    block the calling thread until every rig has completed, and return what
    they return or raise what they raise (:class:`~trio_rignet.ServicesError`
    with ``.failures`` and ``.responses``, ``ValueError``, ...), in the
    calling thread. It is safe to use from any number of threads at once.

    Every blocking method also takes ``fail_after``: seconds after which the
    call is cancelled (as ``anyio.fail_after`` cancels the async call: every
    rig's part is cancelled at once and nothing stays registered) and
    ``TimeoutError`` is raised. A rig may already have received the signal.
    Without it, a call is bounded by the echo and completion timeouts only.

    If the calling thread is interrupted while it waits (Ctrl-C raises
    ``KeyboardInterrupt`` in the main thread), the call is cancelled the same
    way, and the exception propagates once the call has ended; the Services
    stays usable.

    :meth:`close` (or leaving the ``with`` block), from any thread, cancels the
    calls in flight: they raise :class:`~trio_rignet.EndpointClosed`, as does
    every later call. If the event loop itself fails (a bug), calls raise
    ``EndpointClosed`` with the failure as ``__cause__``, and the failure is
    logged: the loop thread never ends silently.

    Never call it from inside a callback run by an executor whose ``submit()``
    runs the function at once (that is the event loop thread): it raises
    ``RuntimeError``.
    """

    _loop: _Loop
    _services: AsyncServices
    _rigs: dict[str, Rig]

    def __init__(self) -> None:
        raise TypeError("open a blocking Services with blocking.Services.open(rigs)")

    @classmethod
    def _create(cls, loop: _Loop, services: AsyncServices) -> Services:
        self = object.__new__(cls)
        self._loop = loop
        self._services = services
        self._rigs = {name: loop.rigs[name] for name in services}
        return self

    @classmethod
    def open(
        cls,
        rigs: Mapping[str, str],
        *,
        backend: str = "trio",
        backend_options: Mapping[str, Any] | None = None,
        timeout: float | None = 10.0,
        wait: float | None = None,
        **options: Unpack[EndpointOptions],
    ) -> Services:
        """Start the event loop thread and open a client endpoint for every rig in it.

        Returns the open Services, which is also a context manager that
        closes it::

            with blocking.Services.open({"video": "udp://10.0.0.2"}) as rigs:
                rigs.init()

        Args:
            rigs: rig name -> URI.
            backend: the event loop: ``"trio"`` or ``"asyncio"``.
            backend_options: options for ``anyio.run`` (e.g. asyncio's
                ``{"loop_factory": ...}``).
            timeout: seconds to wait for each rig's completion update after its
                echo (None: no limit), as for :meth:`trio_rignet.Services.open`.
            wait: if given, seconds to wait for every TCP rig to be connected,
                as for :meth:`trio_rignet.Services.open`.
            options: endpoint options for every rig (see
                :class:`~trio_rignet.EndpointOptions`).

        Raises:
            ServicesError, TypeError, ValueError: as
                :meth:`trio_rignet.Services.open`; the thread is gone by then.
            ValueError: an unknown ``backend``.

        URIs are checked, and host names resolved, in the calling thread
        before the event loop starts (so that no worker thread is left behind
        by a DNS lookup): if some are invalid or do not resolve,
        :class:`~trio_rignet.ServicesError` names those (and no other rig is
        opened).

        If the calling thread is interrupted while the rigs open, opening is
        cancelled and the thread joined before the exception propagates.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        if isinstance(rigs, Mapping):
            rigs = _resolve(rigs)
        loop = _Loop(backend, backend_options)
        services = loop.start(rigs, timeout, wait, options)
        loop.rigs = {name: Rig._create(loop, name) for name in services}
        return cls._create(loop, services)

    # ---------------------------------------------------------------- mapping

    def __getitem__(self, name: str) -> Rig:
        return self._rigs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rigs)

    def __len__(self) -> int:
        return len(self._rigs)

    def __repr__(self) -> str:
        state = "closed" if self._loop.closing else self._loop.backend
        return f"<blocking Services {list(self._rigs)} ({state})>"

    def without(self, *names: str) -> Services:
        """The same rigs but ``names``, sharing this one's thread and endpoints.

        Closing either closes both (as for :meth:`trio_rignet.Services.without`).

        Raises:
            KeyError: a name is not a rig of this Services.
        """
        view = self._loop.call("without", self._services.without, *names)
        return Services._create(self._loop, view)

    # -------------------------------------------------------------- lifecycle

    @property
    def timeout(self) -> float | None:
        """The completion timeout of each rig, in seconds after its echo (None for no limit)."""
        return self._services.timeout

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called (or the event loop has failed)."""
        return self._loop.closing

    @property
    def backend(self) -> str:
        """The event loop running the rigs, ``"trio"`` or ``"asyncio"``."""
        return self._loop.backend

    @property
    def is_connected(self) -> bool:
        """True if there is at least one rig and every rig is connected."""
        return self._loop.call("is_connected", lambda: self._services.is_connected)

    @property
    def state(self) -> dict[str, RigState]:
        """Rig name -> a copy of its state, taken now (as :attr:`trio_rignet.Services.state`)."""

        def copy() -> dict[str, RigState]:
            return {name: replace(state) for name, state in self._services.state.items()}

        return self._loop.call("state", copy)

    def close(self) -> None:
        """Cancel the calls in flight, end every subscription, close the endpoints,
        and stop the event loop and callback threads.

        Idempotent, and safe from any thread (also after a call interrupted
        by Ctrl-C): it returns once both threads have ended; called from a
        callback in the facade's callback thread, once the event loop thread
        has ended (the callback thread ends after that callback). It waits
        for a callback that is running to return; callbacks not yet started
        are dropped.
        """
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- callbacks

    def assign_callback(
        self,
        event: EventLike,
        callback: Callable[..., Any],
        return_service: bool = False,
        *,
        executor: Executor | None = None,
    ) -> None:
        """Call ``callback(message)`` for every message of ``event`` (or ``a | b``) from every rig.

        With ``return_service`` it is called as ``callback(message, rig)``,
        ``rig`` being the :class:`Rig`.

        Where it runs: in the facade's callback thread, one callback at a
        time in the order the messages arrived, unless ``executor`` is given:
        then ``executor.submit(...)`` is called for each message (a
        ``ThreadPoolExecutor``, or an Executor of yours whose ``submit`` hands
        the function to your GUI thread; ``submit`` is called in the event loop
        thread, so it must return at once, and must not run the function itself).
        Never in the event loop thread, so a callback may block and may call
        this Services. While a callback runs, messages for the callback
        thread wait (1,024 at most; more are dropped with a warning).

        If a callback raises, the error is logged (logger
        ``trio_rignet.blocking``) and the thread goes on. Unlike an async
        callback, the rig is not sent an error report: the callback runs
        after the message was handled.

        Raises:
            TypeError: ``callback`` is not a plain function (async callbacks
                belong to the async API), or ``event`` is invalid.
            ValueError: ``event`` is unknown.
        """
        if not callable(callback) or inspect.iscoroutinefunction(callback):
            raise TypeError(
                f"callback must be a plain function (it runs in a thread), not {callback!r}"
            )
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(
                f"executor must be a concurrent.futures.Executor, not {type(executor).__name__}"
            )
        loop = self._loop
        loop.check_thread()
        loop.check_open("assign_callback")
        codes = set(event_codes(event))
        deliver = (
            loop.callback_thread().submit if executor is None else _executor_delivery(executor)
        )

        def register() -> None:
            for name, rig in self._services.items():
                forward = _Forward(callback, self._rigs[name], return_service, deliver, set(codes))
                rig.assign_callback(event, forward)
                loop.forwards.setdefault(name, []).append(forward)

        loop.call("assign_callback", register)

    def clear_callbacks(
        self, event: EventLike, callback: Callable[..., Any] | None = None
    ) -> dict[str, int]:
        """Remove ``callback`` (or every callback) for ``event`` from every rig.

        Returns rig name -> how many were removed. Callbacks already handed to
        their thread still run.
        """
        codes = set(event_codes(event))

        def clear() -> dict[str, int]:
            counts = {}
            for name, rig in self._services.items():
                removed = 0
                forwards = self._loop.forwards.get(name, [])
                for forward in list(forwards):
                    if callback is not None and forward.callback != callback:
                        continue
                    for code in forward.codes & codes:
                        removed += rig.clear_callbacks(code, forward)
                    forward.codes -= codes
                    if not forward.codes:
                        forwards.remove(forward)
                counts[name] = removed
            return counts

        return self._loop.call("clear_callbacks", clear)

    def subscribe(
        self, event: EventLike, *, timeout: float | None = None, max_buffer: int = 1024
    ) -> Subscription:
        """Buffer every message of ``event`` (or ``a | b``; ``0`` for error reports)
        from every rig, from now on, for the threads that read the :class:`Subscription`.

        Registered before this returns, so no message that arrives afterwards
        is missed: subscribe, then send the signal whose replies you want.

        Args:
            event: the event(s).
            timeout: seconds each step of the iteration waits before raising
                ``TimeoutError`` (None: no limit); :meth:`Subscription.get`
                takes its own.
            max_buffer: messages held for readers; newer ones are dropped
                with a warning.

        Raises:
            TypeError, ValueError: invalid ``event``, ``timeout`` or ``max_buffer``.
            EndpointClosed: the Services is closed.
        """
        loop = self._loop
        loop.check_thread()
        loop.check_open("subscribe")
        return _subscribe(loop, self._services, list(self._rigs), event, timeout, max_buffer)

    # ---------------------------------------------------------------- signals

    def _signal(
        self, name: str, func: Callable[..., Awaitable[T]], *args: Any, fail_after: float | None
    ) -> T:
        return self._loop.run(name, func, *args, fail_after=fail_after)

    def init(
        self, data: Any = None, concurrent: bool = True, *, fail_after: float | None = None
    ) -> dict[str, Any]:
        """Signal EXPINIT to every rig; block until each completes; rig name -> completion data.

        As :meth:`trio_rignet.Services.init`.

        Raises:
            ServicesError: a rig failed (``.failures``, ``.responses``).
            ValueError: the message is too large (nothing was sent).
            TimeoutError: ``fail_after`` passed (the call was cancelled).
            EndpointClosed: the Services was closed before or during the call.
        """
        return self._signal("init", self._services.init, data, concurrent, fail_after=fail_after)

    def start(
        self,
        exp_ref: str | Mapping[str, Any] | None,
        data: Any = None,
        concurrent: bool = True,
        *,
        fail_after: float | None = None,
    ) -> dict[str, Any]:
        """Signal EXPSTART with ``exp_ref`` to every rig; rig name -> completion data.

        As :meth:`trio_rignet.Services.start`; raises as :meth:`init`.
        """
        return self._signal(
            "start", self._services.start, exp_ref, data, concurrent, fail_after=fail_after
        )

    def stop(
        self,
        data: Any = None,
        immediately: bool = False,
        concurrent: bool = True,
        *,
        fail_after: float | None = None,
    ) -> dict[str, Any]:
        """Signal EXPEND (EXPINTERRUPT if ``immediately``), rigs in reverse order.

        As :meth:`trio_rignet.Services.stop`; raises as :meth:`init`.
        """
        return self._signal(
            "stop", self._services.stop, data, immediately, concurrent, fail_after=fail_after
        )

    def cleanup(
        self, data: Any = None, concurrent: bool = True, *, fail_after: float | None = None
    ) -> dict[str, Any]:
        """Signal EXPCLEANUP, rigs in reverse order; rig name -> completion data.

        As :meth:`trio_rignet.Services.cleanup`; raises as :meth:`init`.
        """
        return self._signal(
            "cleanup", self._services.cleanup, data, concurrent, fail_after=fail_after
        )

    def status(
        self, status: StatusLike, concurrent: bool = True, *, fail_after: float | None = None
    ) -> dict[str, Any]:
        """Send EXPSTATUS to every rig; rig name -> completion data.

        As :meth:`trio_rignet.Services.status`; raises as :meth:`init`.
        """
        return self._signal(
            "status", self._services.status, status, concurrent, fail_after=fail_after
        )

    def info(
        self,
        status: StatusLike,
        data: Any = None,
        concurrent: bool = True,
        *,
        fail_after: float | None = None,
    ) -> dict[str, Any]:
        """Send EXPINFO to every rig; rig name -> completion data.

        As :meth:`trio_rignet.Services.info`; raises as :meth:`init`.
        """
        return self._signal(
            "info", self._services.info, status, data, concurrent, fail_after=fail_after
        )

    def alyx(self, alyx: AlyxLike, *, fail_after: float | None = None) -> None:
        """Send a logged-in Alyx client's token to every rig, echo-confirmed.

        As :meth:`trio_rignet.Services.alyx`; raises as :meth:`init`.
        """
        self._signal("alyx", self._services.alyx, alyx, fail_after=fail_after)

    def await_all(self, event: EventLike, *, fail_after: float | None = None) -> dict[str, Any]:
        """Block until every rig has sent ``event``; rig name -> message data.

        As :meth:`trio_rignet.Services.await_all` (each rig's wait bounded by
        :attr:`timeout`); raises as :meth:`init`.
        """
        return self._signal("await_all", self._services.await_all, event, fail_after=fail_after)
