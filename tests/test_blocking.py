"""The blocking facade (``trio_rignet.blocking``), from plain threads, on Trio and asyncio.

The rigs are :class:`RigService` instances running in one Trio event loop in a
background thread of this process (an AnyIO blocking portal), on loopback
sockets bound to port 0. Their handlers are async functions that the tests
steer from the test thread: a :class:`Gate` holds a signal until released, a
:class:`Meeting` completes signals only once two of them are being handled at
the same time. The facade under test runs its own event loop thread, on the
backend of the ``anyio_backend`` fixture of conftest.py (asyncio under
ProactorEventLoop's rules).

Nothing asserts on wall-clock time. Waits for other threads are bounded by
``SAFETY`` as a safety net only; the short real-time waits are a ``fail_after``
or ``timeout`` that must pass.
"""

from __future__ import annotations

import _thread
import contextlib
import inspect
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from tests.helpers import FakeAlyx

from trio_rignet import (
    CompletionTimeout,
    EchoProtocol,
    EchoTimeout,
    EndpointClosed,
    ExpMessage,
    ExpStatus,
    Message,
    RemoteError,
    RigService,
    ServicesError,
    blocking,
)

SAFETY = 10.0  # seconds: a safety net against hangs, never an assertion
SHORT = 0.2  # a fail_after or timeout that must pass
EXP_REF = "2024-05-01_1_mouse"

Handler = Callable[[Message], Any]


# ------------------------------------------------------------------ rigs


@pytest.fixture(scope="module")
def rig_loop() -> Iterator[BlockingPortal]:
    """A Trio event loop in a background thread, where the rigs of every test run."""
    with start_blocking_portal("trio") as portal:
        yield portal


async def did(msg: Message) -> str:
    return f"did {msg.event.name}"


async def fails(msg: Message) -> str:
    raise ValueError("no subject called mouse1")


class Gate:
    """A rig handler that holds each signal until :meth:`release` (called from any thread)."""

    def __init__(self, loop: BlockingPortal) -> None:
        self.loop = loop
        self.arrived = threading.Event()
        self._open: anyio.Event = loop.call(anyio.Event)

    async def handler(self, msg: Message) -> str:
        self.arrived.set()
        await self._open.wait()
        return "released"

    def release(self) -> None:
        self.loop.call(self._open.set)


class Meeting:
    """A rig handler that completes a signal only while ``size`` signals are handled at once."""

    def __init__(self, loop: BlockingPortal, size: int) -> None:
        self.size = size
        self.waiting = 0
        self._all_here: anyio.Event = loop.call(anyio.Event)

    async def handler(self, msg: Message) -> Any:
        self.waiting += 1
        if self.waiting >= self.size:
            self._all_here.set()
        await self._all_here.wait()
        return msg.data[0]


@contextmanager
def serve(
    loop: BlockingPortal, rigs: Mapping[str, Mapping[str, Handler]]
) -> Iterator[dict[str, str]]:
    """Run a RigService per entry (name -> {event: handler}); yield name -> URI."""
    with ExitStack() as stack:
        uris = {}
        for name, handlers in rigs.items():
            events: dict[Any, Handler] = dict(handlers)
            rig = RigService("udp://127.0.0.1:0", events, name=name)
            stack.enter_context(loop.wrap_async_context_manager(rig))
            uris[name] = rig.local_uri
        yield uris


EVERY_SIGNAL = dict.fromkeys(("info", "init", "start", "stop", "interrupt", "cleanup"), did)


@pytest.fixture
def backend(anyio_backend: Any) -> dict[str, Any]:
    """``backend=`` and ``backend_options=`` of the facade, from conftest's parameters."""
    if isinstance(anyio_backend, tuple):
        name, options = anyio_backend
        return {"backend": name, "backend_options": options}
    return {"backend": anyio_backend}


@contextmanager
def no_new_threads() -> Iterator[None]:
    """Fail if a thread started in the block is still alive after it."""
    before = set(threading.enumerate())
    yield
    left = [t.name for t in threading.enumerate() if t not in before]
    assert left == [], f"threads left behind: {left}"


def in_thread(func: Callable[[], Any]) -> Future[Any]:
    """Run ``func`` in a new thread; its outcome as a future (the thread is joined by then)."""
    future: Future[Any] = Future()

    def run() -> None:
        try:
            future.set_result(func())
        except BaseException as exc:
            future.set_exception(exc)

    thread = threading.Thread(target=run, name="caller")
    thread.start()
    future.thread = thread  # type: ignore[attr-defined]
    return future


def joined(future: Future[Any]) -> Any:
    """The outcome of an :func:`in_thread` future, once its thread has ended."""
    future.thread.join(SAFETY)  # type: ignore[attr-defined]
    assert future.done(), "the caller thread is still blocked"
    return future.result()


# ---------------------------------------------------------- same results


def test_signals_return_what_the_async_api_returns(
    rig_loop: BlockingPortal, backend: dict[str, Any]
) -> None:
    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL, "ephys": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        assert rigs.backend == backend["backend"]
        assert list(rigs) == ["video", "ephys"]
        assert rigs["video"].name == "video"
        assert rigs["video"].server_uri == uris["video"]
        assert rigs.info(ExpStatus.CONNECTED) == {
            "video": [0, "did EXPINFO"],
            "ephys": [0, "did EXPINFO"],
        }
        assert rigs.init({"subject": "mouse"}) == {
            "video": ["did EXPINIT"],
            "ephys": ["did EXPINIT"],
        }
        assert rigs.start(EXP_REF) == {
            "video": [EXP_REF, "did EXPSTART"],
            "ephys": [EXP_REF, "did EXPSTART"],
        }
        assert rigs.status("RUNNING") == {"video": [20], "ephys": [20]}
        assert rigs.stop(immediately=True, concurrent=False) == {
            "video": ["did EXPINTERRUPT"],
            "ephys": ["did EXPINTERRUPT"],
        }
        assert rigs.cleanup() == {"video": ["did EXPCLEANUP"], "ephys": ["did EXPCLEANUP"]}
        rigs.alyx(FakeAlyx())  # echo-confirmed by every rig, no completion
        assert rigs.is_connected
        assert {name: s.last_error for name, s in rigs.state.items()} == {
            "video": None,
            "ephys": None,
        }
        assert rigs["ephys"].stats.confirmed == 7
        assert rigs["ephys"].is_trio_peer()
        assert rigs["video"].call([ExpMessage.EXPINIT, "one rig"]).data == ["did EXPINIT"]
        rigs["video"].confirmed_send([ExpMessage.EXPSTATUS, 20])
        rigs["video"].wait_connected(fail_after=SAFETY)
        video = rigs.without("ephys")
        assert list(video) == ["video"]
        assert video["video"] is rigs["video"]
        assert video.init() == {"video": ["did EXPINIT"]}


def test_errors_keep_their_type(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL, "ephys": {"start": fails}}) as uris,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent,  # bound, never reads
    ):
        silent.bind(("127.0.0.1", 0))
        uris["timeline"] = f"udp://127.0.0.1:{silent.getsockname()[1]}"
        with blocking.Services.open(uris, timeout=SAFETY, echo_timeout=SHORT, **backend) as rigs:
            with pytest.raises(ServicesError) as info:
                rigs.start(EXP_REF)
            err = info.value
            assert err.event is ExpMessage.EXPSTART
            assert err.responses == {"video": [EXP_REF, "did EXPSTART"]}
            assert isinstance(err.failures["ephys"], RemoteError)
            assert err.failures["ephys"].text == "ValueError: no subject called mouse1"
            assert isinstance(err.failures["timeline"], EchoTimeout)
            assert isinstance(rigs.state["timeline"].last_error, EchoTimeout)
            with pytest.raises(ValueError, match="Unrecognized status"):
                rigs.status("SLEEPING")
            with pytest.raises(KeyError, match="no rig named 'audio'"):
                rigs.without("audio")
            with pytest.raises(ValueError, match="fail_after"):
                rigs.init(fail_after=0)
            assert rigs.without("ephys", "timeline").init() == {"video": ["did EXPINIT"]}
        with blocking.Services.open(uris, timeout=SHORT, echo_timeout=SHORT, **backend) as rigs:
            with pytest.raises(ServicesError) as info:
                rigs.without("timeline").await_all("stop")  # no rig sends it by itself
            assert {type(exc) for exc in info.value.failures.values()} == {CompletionTimeout}


def test_opening_errors(backend: dict[str, Any]) -> None:
    with no_new_threads():
        with pytest.raises(ServicesError) as info:
            blocking.Services.open({"video": "udp://not an address"}, **backend)
        assert info.value.event is None
        assert isinstance(info.value.failures["video"], ValueError)
        with pytest.raises(TypeError, match="mapping"):
            blocking.Services.open(["udp://127.0.0.1:11001"], **backend)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="backend"):
            blocking.Services.open({}, backend="curio")
        with pytest.raises(TypeError, match=r"Services\.open"):
            blocking.Services()


# ------------------------------------------------------------- threads


def test_two_threads_signal_at_once(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    """The rig completes a signal only while the other is in flight too: the calls of
    two threads run concurrently (one at a time, both would end in CompletionTimeout)."""
    meeting = Meeting(rig_loop, 2)
    with (
        no_new_threads(),
        serve(rig_loop, {"video": {"init": meeting.handler}}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        first = in_thread(lambda: rigs.init("first"))
        second = in_thread(lambda: rigs.init("second"))
        assert joined(first) == {"video": ["first"]}
        assert joined(second) == {"video": ["second"]}


def test_many_threads(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL, "ephys": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):

        def work(n: int) -> list[dict[str, Any]]:
            return [rigs.status(ExpStatus(10 * (i % 4))) for i in range(n, n + 10)]

        callers = [in_thread(lambda n=n: work(n)) for n in range(8)]  # type: ignore[misc]
        for n, caller in enumerate(callers):
            results = joined(caller)
            expected = [10 * (i % 4) for i in range(n, n + 10)]
            assert [r["video"][0] for r in results] == expected
            assert [r["ephys"][0] for r in results] == expected
        assert rigs["video"].stats.confirmed == 80


# ------------------------------------------------- timeouts, cancellation


def test_fail_after_cancels_the_call(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    gate = Gate(rig_loop)
    with (
        no_new_threads(),
        serve(rig_loop, {"video": {"init": gate.handler}, "ephys": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        with pytest.raises(TimeoutError, match="fail_after") as info:
            rigs.init(fail_after=SHORT)
        assert not isinstance(info.value, ServicesError)
        assert gate.arrived.is_set()  # the video rig had received the signal
        assert not rigs["video"].awaiting_response()
        gate.release()
        # still usable, and the late completion of the cancelled init is not taken
        # for the next init's
        assert rigs.init(fail_after=SAFETY) == {"video": ["released"], "ephys": ["did EXPINIT"]}


def test_close_from_another_thread_ends_calls_in_flight(
    rig_loop: BlockingPortal, backend: dict[str, Any]
) -> None:
    gate = Gate(rig_loop)
    with (
        no_new_threads(),
        serve(rig_loop, {"video": {"init": gate.handler}}) as uris,
    ):
        rigs = blocking.Services.open(uris, timeout=None, **backend)
        blocked = in_thread(rigs.init)
        reading = in_thread(lambda: list(rigs.subscribe("status")))
        assert gate.arrived.wait(SAFETY)
        closer = in_thread(rigs.close)
        with pytest.raises(EndpointClosed, match="init: the blocking Services is closed"):
            joined(blocked)
        assert joined(reading) == []  # the iteration ended
        joined(closer)
        assert rigs.closed
        rigs.close()  # idempotent
        with pytest.raises(EndpointClosed):
            rigs.status("RUNNING")
        with pytest.raises(EndpointClosed):
            rigs.subscribe("status")
        with pytest.raises(EndpointClosed):
            rigs["video"].send([ExpMessage.EXPSTATUS, 0])
        gate.release()


@pytest.mark.skipif(sys.platform == "win32", reason="signal.pthread_kill is POSIX")
def test_ctrl_c_while_blocked(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    """SIGINT in the main thread while it waits: KeyboardInterrupt, the call cancelled
    (nothing left awaiting), the Services still usable."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    gate = Gate(rig_loop)
    with (
        no_new_threads(),
        serve(rig_loop, {"video": {"init": gate.handler}}) as uris,
        blocking.Services.open(uris, timeout=None, **backend) as rigs,
    ):
        main = threading.main_thread().ident
        assert main is not None
        assert threading.current_thread().ident == main

        def interrupt() -> None:
            assert gate.arrived.wait(SAFETY)
            signal.pthread_kill(main, signal.SIGINT)

        interrupter = in_thread(interrupt)
        with pytest.raises(KeyboardInterrupt):
            rigs.init()
        joined(interrupter)
        assert not rigs["video"].awaiting_response()
        gate.release()
        assert rigs.init() == {"video": ["released"]}


def test_ctrl_c_with_sliced_waits(
    rig_loop: BlockingPortal, backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a lock wait cannot be interrupted (Windows), the main thread waits in
    slices; an interrupt is then raised between two slices."""
    monkeypatch.setattr(blocking, "_MAIN_THREAD_SLICE", 0.01)
    gate = Gate(rig_loop)
    with (
        no_new_threads(),
        serve(rig_loop, {"video": {"init": gate.handler, "status": did}}) as uris,
        blocking.Services.open(uris, timeout=None, **backend) as rigs,
    ):
        assert rigs.status("RUNNING") == {"video": ["did EXPSTATUS"]}

        def interrupt() -> None:
            assert gate.arrived.wait(SAFETY)
            _thread.interrupt_main()  # sets the flag only: the wait must wake to see it

        interrupter = in_thread(interrupt)
        with pytest.raises(KeyboardInterrupt):
            rigs.init()
        joined(interrupter)
        assert not rigs["video"].awaiting_response()
        gate.release()
        assert rigs.status("RUNNING") == {"video": ["did EXPSTATUS"]}


# ------------------------------------------------------------- events


def test_subscription_registered_before_the_signal(
    rig_loop: BlockingPortal, backend: dict[str, Any]
) -> None:
    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL, "ephys": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        with rigs.subscribe(ExpMessage.EXPSTART | ExpMessage.EXPEND, timeout=SAFETY) as updates:
            rigs.start(EXP_REF)  # the completion updates arrive before this returns
            got = sorted(updates.get(timeout=0) for _ in range(2))
            assert [(rig, msg.event, msg.data) for rig, msg in got] == [
                ("ephys", ExpMessage.EXPSTART, [EXP_REF, "did EXPSTART"]),
                ("video", ExpMessage.EXPSTART, [EXP_REF, "did EXPSTART"]),
            ]
            with pytest.raises(TimeoutError):
                updates.get(timeout=0)
            rigs.stop()
            ends = [next(updates), next(updates)]
            assert sorted(rig for rig, _ in ends) == ["ephys", "video"]
            assert {msg.event for _, msg in ends} == {ExpMessage.EXPEND}
            updates.timeout = SHORT
            with pytest.raises(TimeoutError):
                next(updates)
        assert updates.closed
        with pytest.raises(EndpointClosed):
            updates.get()
        assert list(updates) == []
        with rigs["ephys"].subscribe("init") as ephys_inits:
            rigs.init()
            assert ephys_inits.get(timeout=0).rig == "ephys"
            with pytest.raises(TimeoutError):
                ephys_inits.get(timeout=0)


def test_subscription_closed_from_another_thread(
    rig_loop: BlockingPortal, backend: dict[str, Any]
) -> None:
    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        sub = rigs.subscribe("init")
        reader = in_thread(lambda: [msg.data for _, msg in sub])
        rigs.init(1)
        rigs.init(2)
        sub.close()
        # The reader saw both (they were buffered before the close) or fewer: never more,
        # and its iteration ended.
        seen = joined(reader)
        assert seen in ([], [["did EXPINIT"]], [["did EXPINIT"], ["did EXPINIT"]])
        rigs.init(3)
        with pytest.raises(EndpointClosed):  # not delivered: the reader took the rest
            sub.get(timeout=0)
        assert sub.dropped == 0


# ------------------------------------------------------------- callbacks


def test_callbacks_run_in_the_callback_thread(
    rig_loop: BlockingPortal, backend: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, str, Any]] = []
    done = threading.Semaphore(0)

    def on_status(msg: Message, rig: blocking.Rig) -> None:
        seen.append((threading.current_thread().name, rig.name, msg.data))
        done.release()

    def broken(msg: Message) -> None:
        done.release()
        raise RuntimeError("a bug in a callback")

    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        rigs.assign_callback("status", broken)
        rigs.assign_callback("status", on_status, return_service=True)
        for status in ("CONNECTED", "RUNNING"):
            rigs.status(status)
        for _ in range(4):
            assert done.acquire(timeout=SAFETY)
        assert seen == [
            ("trio-rignet callbacks", "video", [0]),
            ("trio-rignet callbacks", "video", [20]),
        ]
        failures = [
            r
            for r in caplog.records
            if "a bug in a callback" in r.getMessage()
            or (r.exc_info and "a bug in a callback" in str(r.exc_info[1]))
        ]
        assert len(failures) == 2
        assert all(r.name == "trio_rignet.blocking" and r.exc_info for r in failures)
        assert all("from rig 'video' failed" in r.getMessage() for r in failures)
        assert rigs.clear_callbacks("status", broken) == {"video": 1}
        assert rigs.clear_callbacks("status") == {"video": 1}
        assert rigs.clear_callbacks("status") == {"video": 0}
        with pytest.raises(TypeError, match="plain function"):
            rigs.assign_callback("status", did)


def test_callbacks_in_an_executor(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    names: list[str] = []
    done = threading.Event()

    def on_init(msg: Message) -> None:
        names.append(threading.current_thread().name)
        done.set()

    with (
        no_new_threads(),
        ThreadPoolExecutor(1, thread_name_prefix="gui") as gui,
        serve(rig_loop, {"video": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        rigs.assign_callback("init", on_init, executor=gui)
        rigs.init()
        assert done.wait(SAFETY)
        assert names[0].startswith("gui")
        with pytest.raises(TypeError, match="Executor"):
            rigs.assign_callback("init", on_init, executor=object())  # type: ignore[arg-type]


class Inline(Executor):
    """A wrong executor: runs the function at once, in the thread that submits."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def test_calling_from_the_loop_thread_is_refused(
    rig_loop: BlockingPortal, backend: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        no_new_threads(),
        serve(rig_loop, {"video": EVERY_SIGNAL}) as uris,
        blocking.Services.open(uris, timeout=SAFETY, **backend) as rigs,
    ):
        rigs.assign_callback("init", lambda msg: rigs.status("RUNNING"), executor=Inline())
        rigs.init()  # the callback ran in the loop thread and was refused, with a log line
        assert any(
            r.exc_info and "own event loop thread" in str(r.exc_info[1]) for r in caplog.records
        )
        assert rigs.status("RUNNING") == {"video": [20]}


def test_close_from_a_callback(rig_loop: BlockingPortal, backend: dict[str, Any]) -> None:
    closed = threading.Event()
    with no_new_threads(), serve(rig_loop, {"video": EVERY_SIGNAL}) as uris:
        rigs = blocking.Services.open(uris, timeout=SAFETY, **backend)

        def close(msg: Message) -> None:
            rigs.close()  # returns at once in the callback thread: no deadlock
            closed.set()

        rigs.assign_callback("init", close)
        with contextlib.suppress(EndpointClosed):  # the close may overtake the end of init
            rigs.init()
        assert closed.wait(SAFETY)
        assert rigs.closed
        rigs.close()  # from this thread: waits for both threads to end


# ----------------------------------------------------------- structure


def test_with_block_exits_on_an_exception(
    rig_loop: BlockingPortal, backend: dict[str, Any]
) -> None:
    with no_new_threads(), serve(rig_loop, {"video": EVERY_SIGNAL}) as uris:
        rigs = blocking.Services.open(uris, **backend)
        rigs.assign_callback("init", lambda msg: None)  # the callback thread starts
        sub = rigs.subscribe("init")

        def block() -> None:
            with rigs:
                rigs.init()
                raise LookupError("raised in the block")

        with pytest.raises(LookupError, match="raised in the block"):
            block()
        assert rigs.closed
        assert sub.closed


class Boom(BaseException):
    """Not an Exception: it ends the event loop it is raised in."""


def test_a_failing_event_loop_is_not_silent(
    rig_loop: BlockingPortal, backend: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def boom() -> None:
        raise Boom("the loop thread fails")

    with no_new_threads(), serve(rig_loop, {"video": EVERY_SIGNAL}) as uris:
        rigs = blocking.Services.open(uris, **backend)
        sub = rigs.subscribe("init")
        with pytest.raises(Boom):  # raised in the calling thread
            rigs._loop.run("boom", boom)
        rigs._loop.thread.join(SAFETY)
        assert rigs.closed
        with pytest.raises(EndpointClosed, match="its event loop failed") as info:
            rigs.init()
        assert info.value.__cause__ is not None
        assert list(sub) == []
        assert any(r.levelno == logging.CRITICAL for r in caplog.records)
        rigs.close()


@pytest.mark.parametrize("anyio_backend", ["trio"], indirect=True)
def test_failing_endpoints_end_every_call(
    rig_loop: BlockingPortal,
    backend: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in an endpoint of the facade (here: its receive path raises, which ends the
    endpoint's tasks on Trio) closes the Services and is logged. A call in flight fails
    as the async call does when its endpoints close (a ServicesError of EndpointClosed),
    or with EndpointClosed; later calls raise EndpointClosed naming the failure."""
    gate = Gate(rig_loop)
    received = EchoProtocol._received
    armed = threading.Event()

    def faulty(self: EchoProtocol, raw: bytes, addr: Any) -> None:
        if armed.is_set() and self.role == "client" and raw.startswith(b"[32"):
            raise AssertionError("a bug in the receive path")
        received(self, raw, addr)

    monkeypatch.setattr(EchoProtocol, "_received", faulty)  # the transports bind it at start
    with no_new_threads(), serve(rig_loop, {"video": {"init": gate.handler}}) as uris:
        with blocking.Services.open(uris, timeout=None, **backend) as rigs:
            blocked = in_thread(rigs.init)
            assert gate.arrived.wait(SAFETY)
            armed.set()
            rigs["video"].send([ExpMessage.EXPSTATUS, 20])  # the rig echoes it: the bug
            with pytest.raises((ServicesError, EndpointClosed)) as info:
                joined(blocked)
            if isinstance(info.value, ServicesError):
                assert isinstance(info.value.failures["video"], EndpointClosed)
            rigs._loop.thread.join(SAFETY)  # the loop thread ends by itself
            assert rigs.closed
            with pytest.raises(EndpointClosed, match="a bug in the receive path") as closed:
                rigs.status(20)
            assert isinstance(closed.value.__cause__, AssertionError)
        gate.release()
    assert any("endpoints failed" in r.getMessage() for r in caplog.records)


def test_every_public_name_is_documented() -> None:
    for name in blocking.__all__:
        obj = getattr(blocking, name)
        assert inspect.getdoc(obj), name
        for member_name, member in vars(obj).items():
            if member_name.startswith("_") or member_name in ("_fields", "_field_defaults"):
                continue
            if callable(member) or isinstance(member, (property, classmethod)):
                assert inspect.getdoc(member), f"{name}.{member_name}"
