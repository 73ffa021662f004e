"""``RigService``, the rig-side helper, in-process on Trio and asyncio, over UDP and TCP.

A rig listens on loopback port 0; the "main PC" is a plain ``EchoProtocol.client``
(or ``Services``) that subscribes to the events it expects before it sends
anything. Nothing here sleeps to wait for something: every wait is on an event,
a subscription or a task group, and ``anyio.fail_after(SAFETY)`` is only a
safety net so that a bug fails the test instead of hanging it.

To prove that a rig sent *nothing* after a signal, a test waits until the rig
has completely finished handling it (:func:`handled`, a spy on the private
``RigService._handle``), then makes one more echo round trip from the main PC:
its receive loop is sequential, so anything the rig had sent before is
dispatched before that echo comes back.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from trio_rignet import (
    LISTEN_PORT,
    EchoProtocol,
    ExpMessage,
    ExpStatus,
    Message,
    RigService,
    Services,
)

pytestmark = pytest.mark.anyio

SAFETY = 10  # seconds: a safety net against hangs, never an assertion
LONG = 30  # an echo timeout that must never be reached in a passing test
LOCALHOST = "127.0.0.1"
EXP_REF = "2024-01-01_1_mouse"
TOKEN = ("https://alyx.example.org", {"experimenter": "0123456789abcdef"})

INIT = ExpMessage.EXPINIT
START = ExpMessage.EXPSTART
END = ExpMessage.EXPEND
CLEANUP = ExpMessage.EXPCLEANUP
INTERRUPT = ExpMessage.EXPINTERRUPT
STATUS = ExpMessage.EXPSTATUS
INFO = ExpMessage.EXPINFO
ALYX = ExpMessage.ALYX


@pytest.fixture(params=["udp", "ws"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport: UDP, or plain TCP under iblutil's ``ws://`` scheme."""
    return str(request.param)


def new_rig(scheme: str, **options: Any) -> RigService:
    options.setdefault("echo_timeout", LONG)
    return RigService(f"{scheme}://{LOCALHOST}:0", name="cam", **options)


@asynccontextmanager
async def main_pc(rig: RigService) -> AsyncIterator[EchoProtocol]:
    """The main PC: a client endpoint talking to the running ``rig``."""
    async with EchoProtocol.client(rig.local_uri, name="main", echo_timeout=LONG) as main:
        yield main


@asynccontextmanager
async def running(rig: RigService) -> AsyncIterator[EchoProtocol]:
    """Run ``rig`` and yield a main-PC client connected to it."""
    with anyio.fail_after(SAFETY):
        async with rig, main_pc(rig) as main:
            yield main


@asynccontextmanager
async def handled(rig: RigService) -> AsyncIterator[MemoryObjectReceiveStream[Message]]:
    """Yield a stream of the messages ``rig`` has completely finished handling.

    A message appears once the rig's handling task is over: handler run and
    completion update (or error report) sent and confirmed, or nothing sent.
    """
    send, receive = anyio.create_memory_object_stream[Message](100)
    original = rig._handle

    async def spy(endpoint: EchoProtocol, msg: Message) -> None:
        await original(endpoint, msg)
        send.send_nowait(msg)

    rig._handle = spy  # type: ignore[method-assign]
    try:
        with send, receive:
            yield receive
    finally:
        del rig._handle


async def next_message(messages: AsyncIterator[Message]) -> Message:
    async for msg in messages:
        return msg
    raise AssertionError("the subscription ended: the endpoint closed")


def make_handler(kind: str, result: Callable[[Message], Any], seen: list[Message]) -> Any:
    """A ``kind`` ("sync" or "async") handler recording its messages and returning ``result``."""
    if kind == "sync":

        def sync_handler(msg: Message) -> Any:
            seen.append(msg)
            return result(msg)

        return sync_handler

    async def async_handler(msg: Message) -> Any:
        await anyio.lowlevel.checkpoint()
        seen.append(msg)
        return result(msg)

    return async_handler


async def barrier(main: EchoProtocol) -> None:
    """One echo round trip: whatever the rig sent before has been dispatched at ``main``."""
    await main.confirmed_send([ExpMessage.EXPSTATUS, int(ExpStatus.CONNECTED)])


# --------------------------------------------------------------- signal shapes


@dataclass(frozen=True)
class Case:
    """One signal: how the main PC sends it and what each side sees."""

    event: ExpMessage
    send: Callable[[EchoProtocol], Awaitable[None]]
    received: list[Any]  # Message.data at the rig
    completion: Callable[[Any], list[Any]]  # handler result -> Message.data at the main PC


CASES = {
    "init": Case(INIT, lambda m: m.init({"x": 1}), [{"x": 1}], lambda r: [r]),
    "start": Case(
        START,
        lambda m: m.start(EXP_REF, {"x": 1}),
        [EXP_REF, {"x": 1}],
        lambda r: [EXP_REF, r],
    ),
    "start-dict-ref": Case(
        START,
        lambda m: m.start({"date": "2024-01-01", "sequence": 1, "subject": "mouse"}),
        [EXP_REF, None],
        lambda r: [EXP_REF, r],
    ),
    "stop": Case(END, lambda m: m.stop({"x": 1}), [{"x": 1}], lambda r: [r]),
    "interrupt": Case(
        INTERRUPT, lambda m: m.stop({"x": 1}, immediately=True), [{"x": 1}], lambda r: [r]
    ),
    "cleanup": Case(CLEANUP, lambda m: m.cleanup({"x": 1}), [{"x": 1}], lambda r: [r]),
    "status": Case(
        STATUS,
        lambda m: m.status("RUNNING"),
        [int(ExpStatus.RUNNING)],
        # the handler's result replaces the status; no result: the status is sent back
        lambda r: [int(ExpStatus.RUNNING) if r is None else r],
    ),
    "info": Case(
        INFO,
        lambda m: m.info(ExpStatus.STOPPED, {"x": 1}),
        [int(ExpStatus.STOPPED), {"x": 1}],
        lambda r: [int(ExpStatus.STOPPED), r],
    ),
}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_handler_result_is_the_completion_data(scheme: str, case: Case, kind: str) -> None:
    seen: list[Message] = []
    rig = new_rig(scheme)
    result = {"rig": "cam", "done": case.event.name}
    handler = make_handler(kind, lambda msg: result, seen)
    assert rig.handle(case.event)(handler) is handler  # the decorator returns the handler
    async with running(rig) as main, main.subscribe(case.event) as completions:
        await case.send(main)
        reply = await next_message(completions)
        assert reply.addr == (LOCALHOST, rig.local_address[1])
    assert reply.event == case.event
    assert reply.data == case.completion(result)
    assert len(seen) == 1
    assert seen[0].event == case.event
    assert seen[0].data == case.received
    assert seen[0].addr is not None
    assert seen[0].addr[0] == LOCALHOST


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_unhandled_signal_answered_with_null_data(scheme: str, case: Case) -> None:
    rig = new_rig(scheme)
    rig.handle(ALYX)(lambda msg: None)  # a handler for another event only
    async with running(rig) as main, main.subscribe(case.event) as completions:
        await case.send(main)
        reply = await next_message(completions)
        assert reply.event == case.event
        assert reply.data == case.completion(None)
        assert reply.addr == (LOCALHOST, rig.local_address[1])


async def test_handler_for_every_event_and_handlers_mapping(scheme: str) -> None:
    seen: list[ExpMessage] = []

    def any_signal(msg: Message) -> str:
        seen.append(msg.event)
        return f"any:{msg.event.name}"

    async def stopping(msg: Message) -> str:
        await anyio.lowlevel.checkpoint()
        return f"stopping:{msg.event.name}"

    rig = new_rig(scheme, handlers={"stop": stopping})
    rig.handle(ExpMessage.any())(any_signal)
    rig.handle(END | INTERRUPT)(stopping)  # registered later: replaces any_signal for both
    async with running(rig) as main, main.subscribe(INIT | END | INTERRUPT) as completions:
        await main.init()
        assert (await next_message(completions)).data == ["any:EXPINIT"]
        await main.stop()
        assert (await next_message(completions)).data == ["stopping:EXPEND"]
        await main.stop(immediately=True)
        assert (await next_message(completions)).data == ["stopping:EXPINTERRUPT"]
    assert seen == [INIT]


async def test_services_collects_completions_from_rigs(scheme: str) -> None:
    def handler(msg: Message) -> dict[str, Any]:
        return {"done": msg.event.name}

    rigs = {name: new_rig(scheme, handlers={ExpMessage.any(): handler}) for name in ("a", "b")}
    with anyio.fail_after(SAFETY):
        async with rigs["a"], rigs["b"]:
            uris = {name: rig.local_uri for name, rig in rigs.items()}
            async with Services.open(uris, timeout=LONG, echo_timeout=LONG) as services:
                assert await services.init() == {
                    "a": [{"done": "EXPINIT"}],
                    "b": [{"done": "EXPINIT"}],
                }
                assert await services.start(EXP_REF) == {
                    "a": [EXP_REF, {"done": "EXPSTART"}],
                    "b": [EXP_REF, {"done": "EXPSTART"}],
                }
                assert await services.info(ExpStatus.RUNNING) == {
                    "a": [20, {"done": "EXPINFO"}],
                    "b": [20, {"done": "EXPINFO"}],
                }


# ------------------------------------------------------------- no completion


async def test_no_ack_echoes_but_sends_no_completion(scheme: str) -> None:
    called = anyio.Event()

    def handler(msg: Message) -> str:
        called.set()
        return "done"

    rig = new_rig(scheme, ack=False, handlers={INIT: handler})
    async with (
        handled(rig) as finished,
        running(rig) as main,
        main.subscribe(INIT) as completions,
    ):
        await main.init({"x": 1})  # returns once the echo is confirmed
        assert (await finished.receive()).event == INIT
        assert called.is_set()
        await barrier(main)
        with pytest.raises(anyio.WouldBlock):
            completions.receive_nowait()  # type: ignore[attr-defined]
        assert rig.endpoint.stats.echoed == 2
        assert rig.endpoint.stats.sent == 2  # the two echoes, nothing else


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_raising_handler_sends_error_report_and_no_completion(scheme: str, kind: str) -> None:
    def fail(msg: Message) -> None:
        raise ValueError(f"bad data {msg.data[1]!r}")

    rig = new_rig(scheme)
    rig.handle(START)(make_handler(kind, fail, []))
    async with (
        handled(rig) as finished,
        running(rig) as main,
        main.subscribe(0) as errors,
        main.subscribe(START) as completions,
    ):
        await main.start(EXP_REF, 7)
        error = await next_message(errors)
        assert error.event == 0
        assert error.is_error
        assert error.data == ["ValueError: bad data 7", int(START)]
        assert (await finished.receive()).event == START
        await barrier(main)
        with pytest.raises(anyio.WouldBlock):
            completions.receive_nowait()  # type: ignore[attr-defined]
        # The rig keeps working: the next signal gets its completion.
        rig.handle(START)(lambda msg: "ok")
        await main.start(EXP_REF)
        assert (await next_message(completions)).data == [EXP_REF, "ok"]


async def test_unsendable_result_is_reported_and_rig_keeps_serving(scheme: str) -> None:
    rig = new_rig(scheme)
    rig.handle(INIT)(lambda msg: object())  # not JSON
    async with running(rig) as main, main.subscribe(0) as errors, main.subscribe(CLEANUP) as done:
        await main.init()
        error = await next_message(errors)
        assert error.data[1] == int(INIT)
        assert error.data[0].startswith("TypeError: ")
        assert "JSON" in error.data[0]
        await main.cleanup()
        assert (await next_message(done)).data == [None]
        assert rig.endpoint.is_connected


async def test_result_over_the_udp_limit(scheme: str) -> None:
    big = "x" * 70_000
    rig = new_rig(scheme)
    rig.handle(INIT)(lambda msg: big)
    async with running(rig) as main, main.subscribe(0) as errors, main.subscribe(INIT) as done:
        await main.init()
        if scheme == "udp":
            error = await next_message(errors)
            assert error.data[1] == int(INIT)
            assert error.data[0].startswith("ValueError: ")
            assert "too large" in error.data[0]
            assert "UDP" in error.data[0]
            assert "ws:// (TCP)" in error.data[0]
        else:
            assert (await next_message(done)).data == [big]


# ---------------------------------------------------------------------- alyx


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_alyx_request_answered_with_handler_token(scheme: str, kind: str) -> None:
    seen: list[Message] = []
    rig = new_rig(scheme)
    rig.handle("alyx")(make_handler(kind, lambda msg: TOKEN, seen))
    async with running(rig) as main:
        assert await main.alyx() == TOKEN
    assert [msg.data for msg in seen] == [[None, {}]]


@dataclass
class _Alyx:
    base_url: str = TOKEN[0]
    user: str = "experimenter"
    _token: str = "0123456789abcdef"
    is_logged_in: bool = True


@pytest.mark.parametrize("handler", ["none", "returns-none"])
async def test_alyx_not_answered_without_a_token(scheme: str, handler: str) -> None:
    seen: list[Message] = []
    rig = new_rig(scheme)
    if handler == "returns-none":
        rig.handle(ALYX)(make_handler("sync", lambda msg: None, seen))
    async with (
        handled(rig) as finished,
        running(rig) as main,
        main.subscribe(ALYX) as replies,
        main.subscribe(0) as errors,
    ):
        assert await main.alyx(_Alyx()) is None  # a token pushed to the rig: echo only
        assert (await finished.receive()).event == ALYX
        await main.confirmed_send([ALYX, None, {}])  # a request the rig cannot answer
        assert (await finished.receive()).event == ALYX
        await barrier(main)
        for stream in (replies, errors):
            with pytest.raises(anyio.WouldBlock):
                stream.receive_nowait()  # type: ignore[attr-defined]
    if handler == "returns-none":
        assert [msg.data for msg in seen] == [list(TOKEN), [None, {}]]


async def test_alyx_handler_returning_a_bad_value_is_reported(scheme: str) -> None:
    rig = new_rig(scheme)
    rig.handle(ALYX)(lambda msg: "not a (base_url, token) pair")
    async with running(rig) as main, main.subscribe(0) as errors:
        await main.confirmed_send([ALYX, None, {}])
        error = await next_message(errors)
        assert error.data[1] == int(ALYX)
        assert error.data[0].startswith("ValueError: ")


# ----------------------------------------------------------------- lifecycle


async def test_serve_in_task_group_returns_bound_address(scheme: str) -> None:
    rig = new_rig(scheme, handlers={INIT: lambda msg: "ready"})
    with anyio.fail_after(SAFETY):
        async with anyio.create_task_group() as tg:
            address = await tg.start(rig.serve)
            host, port = address
            assert host == LOCALHOST
            assert port > 0
            assert address == rig.local_address
            assert rig.local_uri == f"{scheme}://{LOCALHOST}:{port}"
            endpoint = rig.endpoint
            assert endpoint.is_connected
            async with main_pc(rig) as main, main.subscribe(INIT) as completions:
                await main.init()
                assert (await next_message(completions)).data == ["ready"]
            tg.cancel_scope.cancel()
    assert not endpoint.is_connected
    with pytest.raises(RuntimeError, match="not running"):
        rig.endpoint  # noqa: B018


async def test_async_with_runs_the_rig(scheme: str) -> None:
    rig = new_rig(scheme)
    with anyio.fail_after(SAFETY):
        async with rig as entered:
            assert entered is rig
            endpoint = rig.endpoint
            assert rig.endpoint.is_connected
            assert endpoint.role == "server"
            assert endpoint.name == "cam"
            host, port = rig.local_address
            assert (host, port) == endpoint.local_address
            assert rig.local_uri == f"{scheme}://{LOCALHOST}:{port}"
            async with main_pc(rig) as main:
                await main.cleanup()
    assert not endpoint.is_connected
    # Leaving the block ends the run; the rig can be started again.
    with anyio.fail_after(SAFETY):
        async with rig, main_pc(rig) as main, main.subscribe(INIT) as completions:
            await main.init()
            assert (await next_message(completions)).data == [None]


async def test_not_running_properties_raise() -> None:
    rig = RigService()
    assert rig.uri == f"udp://0.0.0.0:{LISTEN_PORT}"
    assert rig.name == rig.uri
    assert rig.ack is True
    for attribute in ("endpoint", "local_address", "local_uri"):
        with pytest.raises(RuntimeError, match=r"async with rig"):
            getattr(rig, attribute)


async def test_entering_twice_raises(scheme: str) -> None:
    rig = new_rig(scheme)
    with anyio.fail_after(SAFETY):
        async with rig:
            endpoint = rig.endpoint
            with pytest.raises(RuntimeError, match="already running"):
                async with rig:
                    pass  # pragma: no cover
            async with anyio.create_task_group() as tg:
                with pytest.raises(RuntimeError, match="already running"):
                    await tg.start(rig.serve)
            # The failed entries changed nothing.
            assert rig.endpoint is endpoint
            assert endpoint.is_connected
            async with main_pc(rig) as main:
                await main.init()
    assert not endpoint.is_connected


async def test_invalid_handler_or_event() -> None:
    rig = RigService("udp://127.0.0.1:0")
    with pytest.raises(TypeError, match="handler must be a function"):
        rig.handle("init")(42)  # type: ignore[type-var]
    with pytest.raises(ValueError, match="nope"):
        rig.handle("nope")(lambda msg: None)
    with pytest.raises(TypeError, match="handler must be a function"):
        RigService("udp://127.0.0.1:0", handlers={"init": None})  # type: ignore[dict-item]


async def test_invalid_uri_raises_on_entry() -> None:
    rig = RigService("bogus://127.0.0.1:0")
    with pytest.raises(ValueError, match="scheme"):
        async with rig:
            pass  # pragma: no cover
    with pytest.raises(RuntimeError, match="not running"):
        rig.endpoint  # noqa: B018


# -------------------------------------------------- cancellation, concurrency


@pytest.mark.parametrize("how", ["serve", "async-with", "body-raises"])
async def test_shutdown_cancels_running_handler(scheme: str, how: str) -> None:
    entered = anyio.Event()
    outcome: list[str] = []

    async def slow_start(msg: Message) -> str:
        entered.set()
        try:
            await anyio.sleep_forever()
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        return "never"  # pragma: no cover

    rig = new_rig(scheme, handlers={START: slow_start})

    async def signal_and_wait() -> EchoProtocol:
        async with main_pc(rig) as main:
            await main.start(EXP_REF)
            await entered.wait()
        return rig.endpoint

    endpoint: EchoProtocol | None = None

    async def run_and_raise() -> None:
        nonlocal endpoint
        async with rig:
            endpoint = await signal_and_wait()
            raise KeyError("boom")

    with anyio.fail_after(SAFETY):
        if how == "serve":
            async with anyio.create_task_group() as tg:
                await tg.start(rig.serve)
                endpoint = await signal_and_wait()
                tg.cancel_scope.cancel()
        elif how == "async-with":
            async with rig:
                endpoint = await signal_and_wait()
        else:
            with pytest.raises(KeyError, match="boom"):  # the body's error, not a group
                await run_and_raise()
    assert outcome == ["cancelled"]
    assert endpoint is not None
    assert not endpoint.is_connected
    with pytest.raises(RuntimeError, match="not running"):
        rig.endpoint  # noqa: B018


async def test_slow_handler_does_not_delay_another(scheme: str) -> None:
    start_entered = anyio.Event()
    release_start = anyio.Event()

    async def slow_start(msg: Message) -> str:
        start_entered.set()
        await release_start.wait()
        return "started"

    def stop(msg: Message) -> str:
        return "stopped"

    rig = new_rig(scheme, handlers={START: slow_start, END: stop})
    async with running(rig) as main, main.subscribe(START | END) as completions:
        await main.start(EXP_REF)
        await start_entered.wait()
        await main.stop()
        first = await next_message(completions)
        assert (first.event, first.data) == (END, ["stopped"])
        release_start.set()
        second = await next_message(completions)
        assert (second.event, second.data) == (START, [EXP_REF, "started"])


async def test_handlers_of_one_event_run_concurrently(scheme: str) -> None:
    """Two signals of the same event: the second completes while the first still runs."""
    first_entered = anyio.Event()
    release_first = anyio.Event()

    async def init(msg: Message) -> Any:
        (label,) = msg.data
        if label == "first":
            first_entered.set()
            await release_first.wait()
        return label

    rig = new_rig(scheme, handlers={INIT: init})
    async with running(rig) as main, main.subscribe(INIT) as completions:
        await main.init("first")
        await first_entered.wait()
        await main.init("second")
        assert (await next_message(completions)).data == ["second"]
        release_first.set()
        assert (await next_message(completions)).data == ["first"]


async def test_plain_handler_runs_in_a_worker_thread(scheme: str) -> None:
    """A plain handler may block (starting a camera program, say): it runs in a worker
    thread, so the rig keeps echoing and answering other signals meanwhile."""
    entered = threading.Event()
    release = threading.Event()
    threads: list[threading.Thread] = []

    def slow_init(msg: Message) -> str:
        threads.append(threading.current_thread())
        entered.set()
        release.wait(SAFETY)  # blocks its thread, never the rig's event loop
        return "ready"

    rig = new_rig(scheme, handlers={INIT: slow_init, STATUS: lambda msg: None})
    async with running(rig) as main, main.subscribe(INIT | STATUS) as completions:
        await main.init()
        assert await anyio.to_thread.run_sync(entered.wait, SAFETY)
        await main.status(ExpStatus.RUNNING)  # echoed and completed while init blocks
        assert (await next_message(completions)).data == [int(ExpStatus.RUNNING)]
        release.set()
        assert (await next_message(completions)).data == ["ready"]
    assert threads
    assert threads[0] is not threading.main_thread()


async def test_signals_beyond_max_handlers_are_answered_busy(scheme: str) -> None:
    """At most ``max_handlers`` handlers run at once; a signal beyond that is echoed and
    answered at once with an error report, never dropped silently."""
    release = anyio.Event()
    both_running = anyio.Event()
    entered: list[str] = []

    async def init(msg: Message) -> str:
        entered.append(msg.data[0])
        if len(entered) == 2:
            both_running.set()
        await release.wait()
        return str(msg.data[0])

    rig = new_rig(scheme, handlers={INIT: init}, max_handlers=2)
    async with (
        handled(rig) as finished,
        running(rig) as main,
        main.subscribe(INIT) as completions,
        main.subscribe(0) as errors,
    ):
        await main.init("a")
        await main.init("b")
        await both_running.wait()
        assert rig.running_handlers == 2
        await main.init("c")  # still echoed: confirmed
        error = await next_message(errors)
        assert error.data[1] == int(INIT)
        assert error.data[0].startswith("RuntimeError: ")
        assert "busy" in error.data[0]
        assert entered == ["a", "b"]
        release.set()
        done = [await next_message(completions) for _ in range(2)]
        assert sorted(msg.data[0] for msg in done) == ["a", "b"]
        # A handler counts until its completion is confirmed: wait until both are over.
        assert sorted([(await finished.receive()).data[0] for _ in range(2)]) == ["a", "b"]
        assert rig.running_handlers == 0
        await main.init("d")  # capacity is back
        assert (await next_message(completions)).data == ["d"]
    assert entered == ["a", "b", "d"]
