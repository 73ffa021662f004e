"""``Services``: one signal to many rigs, over real loopback sockets, on Trio and asyncio.

The rigs are :class:`RigService` instances of this library, or raw sockets that
play a silent rig or a rig that answers faster than any scheduler can interleave.
Every socket binds port 0. Tests wait through events, subscriptions and socket
reads, never by sleeping; ``anyio.fail_after(SAFETY)`` is only a safety net so a
bug fails the test instead of hanging it. The only real-time waits are the short
timeouts a silent or mute rig must run into, ``move_on_after`` cancelling a call
that cannot finish, and one rig handler that takes 50 ms; nothing asserts on
wall-clock durations (the concurrency test measures Trio's virtual time).
"""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
import trio
from tests.helpers import LOCALHOST, FakeAlyx, raw_server, raw_udp, untag

from trio_rignet import (
    CompletionTimeout,
    EchoProtocol,
    EchoTimeout,
    EndpointClosed,
    ExpMessage,
    ExpStatus,
    Message,
    PeerUnavailable,
    RemoteError,
    RigHandler,
    RigService,
    Services,
    ServicesError,
)
from trio_rignet._events import Subscription

pytestmark = pytest.mark.anyio

SAFETY = 10  # seconds: a safety net against hangs, never an assertion
LONG = 60.0  # an echo or completion timeout that a passing test never reaches
SHORT = 0.3  # the timeout a silent or mute rig must run into

INIT = ExpMessage.EXPINIT
START = ExpMessage.EXPSTART
END = ExpMessage.EXPEND
CLEANUP = ExpMessage.EXPCLEANUP
INTERRUPT = ExpMessage.EXPINTERRUPT
STATUS = ExpMessage.EXPSTATUS
INFO = ExpMessage.EXPINFO
ALYX = ExpMessage.ALYX
SIGNALS = INIT | START | END | CLEANUP | INTERRUPT | STATUS | INFO
REVERSED = {END, INTERRUPT, CLEANUP}

# Deliberately not in alphabetical order: the given order is what counts.
NAMES = ["video", "ephys", "timeline", "audio", "wheel", "bpod", "laser", "sync"]
EXP_REF = "2024-05-01_1_mouse"

both_modes = pytest.mark.parametrize("concurrent", [True, False], ids=["concurrent", "sequential"])


@pytest.fixture(params=["udp", "ws"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport: UDP, or plain TCP under iblutil's ``ws://`` scheme."""
    return str(request.param)


def subscriptions(rig: EchoProtocol) -> dict[int, int]:
    """Event code -> subscriptions (completion waits included) registered on ``rig``."""
    return {code: len(subs) for code, subs in rig._events._subs.items()}


def assert_nothing_registered(services: Mapping[str, EchoProtocol]) -> None:
    """No confirmed send, subscription or completion wait is left on any endpoint."""
    for name, rig in services.items():
        assert rig._core.table_sizes()["pending"] == 0, name
        assert subscriptions(rig) == {}, name
        assert not rig.awaiting_response(), name


# ------------------------------------------------------------------------------ rigs


def recording_handler(name: str, handled: list[tuple[str, str]]) -> RigHandler:
    """A rig's handler: logs ``(rig, event)`` and answers with what it got."""

    def handler(msg: Message) -> Any:
        handled.append((name, msg.event.name or ""))
        if msg.event is STATUS:
            return None  # the completion repeats the status
        return {"rig": name, "got": msg.data}

    return handler


HandlerFactory = Callable[[str, list[tuple[str, str]]], RigHandler]


@dataclass
class Fleet:
    """Real rigs on loopback and a :class:`Services` talking to them."""

    services: Services
    rigs: dict[str, RigService]
    handled: list[tuple[str, str]] = field(default_factory=list)
    """``(rig, event)`` appended when a rig's handler starts."""
    received: list[tuple[str, str]] = field(default_factory=list)
    """``(rig, event)`` appended when a rig's endpoint receives the signal (inline)."""

    _stoppers: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    def clear(self) -> None:
        self.handled.clear()
        self.received.clear()

    async def stop_rig(self, name: str) -> None:
        """Stop one rig's service (its socket is closed when this returns)."""
        await self._stoppers[name]()


async def run_rig(
    rig: RigService,
    stoppers: dict[str, Callable[[], Awaitable[None]]],
    *,
    task_status: anyio.abc.TaskStatus[tuple[str, int]],
) -> None:
    """``rig.serve`` in a cancel scope of its own, so that a test can stop it."""
    stopped = anyio.Event()

    async def stop() -> None:
        scope.cancel()
        await stopped.wait()

    stoppers[rig.name] = stop
    try:
        with anyio.CancelScope() as scope:
            await rig.serve(task_status=task_status)
    finally:
        stopped.set()


@asynccontextmanager
async def rig_fleet(
    names: Iterable[str],
    scheme: str = "udp",
    *,
    handlers: Mapping[str, HandlerFactory] | None = None,
    mute: Iterable[str] = (),
    timeout: float = LONG,
) -> AsyncIterator[Fleet]:
    """Start one :class:`RigService` per name, then :meth:`Services.open` on them.

    ``handlers`` overrides the :func:`recording_handler` of some rigs; rigs in
    ``mute`` are ``RigService(ack=False)``: they echo but never complete.
    """
    handlers = handlers or {}
    mute = set(mute)
    handled: list[tuple[str, str]] = []
    received: list[tuple[str, str]] = []
    rigs: dict[str, RigService] = {}
    uris: dict[str, str] = {}
    stoppers: dict[str, Callable[[], Awaitable[None]]] = {}
    async with anyio.create_task_group() as tg:
        for name in names:
            rig = RigService(
                f"{scheme}://{LOCALHOST}:0", name=name, ack=name not in mute, echo_timeout=LONG
            )
            rig.handle(SIGNALS)(handlers.get(name, recording_handler)(name, handled))
            host, port = await tg.start(run_rig, rig, stoppers)
            # A plain callback runs inline in the receive task: the moment of receipt.
            rig.endpoint.assign_callback(
                SIGNALS, lambda msg, name=name: received.append((name, msg.event.name or ""))
            )
            rigs[name] = rig
            uris[name] = f"{scheme}://{host}:{port}"
        async with Services.open(uris, timeout=timeout, echo_timeout=LONG) as services:
            yield Fleet(services, rigs, handled, received, stoppers)
        tg.cancel_scope.cancel()


@asynccontextmanager
async def watching(
    services: Mapping[str, EchoProtocol], event: ExpMessage
) -> AsyncIterator[dict[str, Subscription]]:
    """Subscribe to ``event`` on every endpoint: sees every completion, late ones too."""
    async with AsyncExitStack() as stack:
        streams = {}
        for name, rig in services.items():
            streams[name] = await stack.enter_async_context(rig.subscribe(event))
        yield streams


async def collect(watchers: Mapping[str, Subscription], names: Iterable[str]) -> dict[str, Message]:
    """The next message each of ``names`` sent (a completion, late or not)."""
    got = {}
    with anyio.fail_after(SAFETY):
        for name in names:
            got[name] = await watchers[name].receive()
    return got


def assert_addressed(
    got: list[tuple[str, str]], expected: list[tuple[str, str]], concurrent: bool
) -> None:
    """Sequential mode signals the rigs one by one in ``expected``'s order; concurrent
    mode signals them all at once, in no promised order, each exactly once."""
    if concurrent:
        assert sorted(got) == sorted(expected)
    else:
        assert got == expected


def assert_only_watchers(services: Mapping[str, EchoProtocol], event: ExpMessage) -> None:
    """Nothing is registered but the subscriptions of :func:`watching`."""
    for name, rig in services.items():
        assert rig._core.table_sizes()["pending"] == 0, name
        assert not rig.awaiting_response(), name
        assert subscriptions(rig) == {int(event): 1}, name


class BurstRig:
    """A raw UDP rig that sends the echo and the completion back to back.

    ``signals`` holds every signal as received (trio-rignet tags included).

    The two datagrams leave back to back, usually before the endpoint's receive
    task runs again, so the endpoint handles the completion right after the echo
    without the sender's task running in between: a completion wait registered
    only after the echo (iblutil's sequential ``Services``) misses it.
    """

    def __init__(self, sock: socket.socket, reply: Callable[[bytes], bytes | None]) -> None:
        self.sock = sock
        self.reply = reply
        self.port: int = sock.getsockname()[1]
        self.uri = f"udp://{LOCALHOST}:{self.port}"
        self.signals: list[bytes] = []
        self._unconfirmed: Counter[bytes] = Counter()

    def serve(self, stop: threading.Event) -> None:
        """Answer until ``stop`` is set (in a thread of its own: raw sockets need no event
        loop, which keeps this rig the same on every backend and AnyIO version)."""
        self.sock.settimeout(0.05)
        while not stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            if self._unconfirmed[data]:
                self._unconfirmed[data] -= 1  # the echo of one of our completions
                continue
            self.signals.append(data)
            completion = self.reply(data)
            self.sock.sendto(data, addr)  # the echo ...
            if completion is not None:
                self._unconfirmed[completion] += 1
                self.sock.sendto(completion, addr)  # ... and at once the completion


def same_bytes(signal: bytes) -> bytes | None:
    """Complete with the signal's iblutil bytes, as an iblutil rig calling ``init(data)``
    back does (its message carries no trio-rignet tag).

    ALYX gets no completion.
    """
    return None if json.loads(signal)[0] == ALYX else untag(signal)


@asynccontextmanager
async def burst_rigs(count: int) -> AsyncIterator[list[BurstRig]]:
    """``count`` running :class:`BurstRig` on loopback."""
    with ExitStack() as sockets:
        rigs = []
        for _ in range(count):
            sock = sockets.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((LOCALHOST, 0))
            rigs.append(BurstRig(sock, same_bytes))
        stop = threading.Event()
        threads = [threading.Thread(target=rig.serve, args=(stop,), daemon=True) for rig in rigs]
        for thread in threads:
            thread.start()
        try:
            yield rigs
        finally:
            stop.set()
            for thread in threads:
                thread.join()


# ------------------------------------------------------------------ every signal, in order


def answer(name: str, *got: Any) -> dict[str, Any]:
    """What :func:`recording_handler` of rig ``name`` returns for a signal's data."""
    return {"rig": name, "got": list(got)}


CASES: list[Any] = [
    pytest.param(
        INIT,
        lambda s, c: s.init({"subject": "mouse"}, concurrent=c),
        lambda n: [answer(n, {"subject": "mouse"})],
        id="init",
    ),
    pytest.param(
        START,
        lambda s, c: s.start(EXP_REF, {"n": 1}, concurrent=c),
        lambda n: [EXP_REF, answer(n, EXP_REF, {"n": 1})],
        id="start",
    ),
    pytest.param(
        START,
        lambda s, c: s.start(
            {"date": "2024-05-01", "sequence": 1, "subject": "mouse"}, concurrent=c
        ),
        lambda n: [EXP_REF, answer(n, EXP_REF, None)],
        id="start-dict-ref",
    ),
    pytest.param(
        STATUS,
        lambda s, c: s.status(ExpStatus.RUNNING, concurrent=c),
        lambda n: [20],
        id="status",
    ),
    pytest.param(
        INFO,
        lambda s, c: s.info("initialized", {"trial": 3}, concurrent=c),
        lambda n: [10, answer(n, 10, {"trial": 3})],
        id="info",
    ),
    pytest.param(
        END, lambda s, c: s.stop("bye", concurrent=c), lambda n: [answer(n, "bye")], id="stop"
    ),
    pytest.param(
        INTERRUPT,
        lambda s, c: s.stop(immediately=True, concurrent=c),
        lambda n: [answer(n, None)],
        id="interrupt",
    ),
    pytest.param(
        CLEANUP,
        lambda s, c: s.cleanup([42, "foo"], concurrent=c),
        lambda n: [answer(n, [42, "foo"])],
        id="cleanup",
    ),
]


@both_modes
@pytest.mark.parametrize("count", [1, 8])
async def test_every_signal_on_real_rigs(scheme: str, count: int, concurrent: bool) -> None:
    """Each rig's completion data comes back; stop and cleanup go in reverse order."""
    names = NAMES[:count]
    async with rig_fleet(names, scheme) as fleet:
        for case in CASES:
            event, call, expected = case.values
            fleet.clear()
            with anyio.fail_after(SAFETY):
                responses = await call(fleet.services, concurrent)
            assert responses == {name: expected(name) for name in names}, case.id
            assert list(responses) == names, "responses are in the given order"
            order = names[::-1] if event in REVERSED else names
            addressed = [(name, event.name) for name in order]
            assert_addressed(fleet.received, addressed, concurrent)
            assert_addressed(fleet.handled, addressed, concurrent)
            assert_nothing_registered(fleet.services)


# ------------------------------------------------------ instant, slow, mute and failing rigs


@both_modes
async def test_rigs_that_answer_instantly_are_not_missed(concurrent: bool) -> None:
    """Echo and completion arrive together: the completion wait is already registered.

    iblutil's sequential mode registers it after the echo and times out here.
    """
    async with (
        burst_rigs(3) as rigs,
        Services.open(
            {f"rig{i}": rig.uri for i, rig in enumerate(rigs)}, timeout=SAFETY, echo_timeout=LONG
        ) as services,
    ):
        with anyio.fail_after(SAFETY):
            for _ in range(10):
                assert await services.init(concurrent=concurrent) == {
                    "rig0": [None],
                    "rig1": [None],
                    "rig2": [None],
                }
                assert await services.status("running", concurrent=concurrent) == {
                    "rig0": [20],
                    "rig1": [20],
                    "rig2": [20],
                }
        assert_nothing_registered(services)
        for rig in rigs:
            assert [untag(signal) for signal in rig.signals] == [b"[1, null]", b"[32, 20]"] * 10


@both_modes
async def test_rigs_that_answer_after_a_delay(scheme: str, concurrent: bool) -> None:
    """A rig whose handler takes a while completes later; nothing times out."""
    delay = anyio.Event()

    def slow(name: str, handled: list[tuple[str, str]]) -> RigHandler:
        async def handler(msg: Message) -> Any:
            handled.append((name, msg.event.name or ""))
            await anyio.sleep(0.05)
            delay.set()
            return "slowly"

        return handler

    async with rig_fleet(["video", "slow", "ephys"], scheme, handlers={"slow": slow}) as fleet:
        with anyio.fail_after(SAFETY):
            responses = await fleet.services.init("go", concurrent=concurrent)
        assert delay.is_set()
        assert responses == {
            "video": [answer("video", "go")],
            "slow": ["slowly"],
            "ephys": [answer("ephys", "go")],
        }
        assert_nothing_registered(fleet.services)


@both_modes
async def test_rig_that_never_completes(scheme: str, concurrent: bool) -> None:
    """``RigService(ack=False)`` echoes but never completes: CompletionTimeout for it only."""
    async with rig_fleet(["video", "mute", "ephys"], scheme, mute=["mute"], timeout=SHORT) as fleet:
        with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
            await fleet.services.start(EXP_REF, concurrent=concurrent)
        err = info.value
        assert err.event is START
        assert list(err.failures) == ["mute"]
        exc = err.failures["mute"]
        assert isinstance(exc, CompletionTimeout)
        assert isinstance(exc, TimeoutError)
        assert (exc.rig, exc.event, exc.timeout) == ("mute", START, SHORT)
        assert str(exc).startswith("mute: ")
        assert "failed on 1 of 3 rigs: mute: confirmed EXPSTART" in str(err)  # named once
        assert err.responses == {
            "video": [EXP_REF, answer("video", EXP_REF, None)],
            "ephys": [EXP_REF, answer("ephys", EXP_REF, None)],
        }
        # The mute rig did get the signal, and every rig was addressed.
        assert_addressed(
            fleet.received, [(name, "EXPSTART") for name in ["video", "mute", "ephys"]], concurrent
        )
        assert_nothing_registered(fleet.services)


@both_modes
async def test_rig_whose_handler_raises(scheme: str, concurrent: bool) -> None:
    """The rig reports ``[0, "ValueError: ...", event]``: RemoteError with the remote text."""

    def broken(name: str, handled: list[tuple[str, str]]) -> RigHandler:
        def handler(msg: Message) -> Any:
            handled.append((name, msg.event.name or ""))
            if msg.event is END:
                raise ValueError("camera not found")
            return None

        return handler

    async with rig_fleet(["video", "ephys", "sync"], scheme, handlers={"ephys": broken}) as fleet:
        with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
            await fleet.services.stop(concurrent=concurrent)
        err = info.value
        assert err.event is END
        assert list(err.failures) == ["ephys"]
        exc = err.failures["ephys"]
        assert isinstance(exc, RemoteError)
        assert exc.text == "ValueError: camera not found"
        assert exc.event == END
        assert exc.peer == fleet.services["ephys"]._peer
        assert "camera not found" in str(err)
        assert err.responses == {"video": [answer("video", None)], "sync": [answer("sync", None)]}
        assert_addressed(
            fleet.handled,
            [("sync", "EXPEND"), ("ephys", "EXPEND"), ("video", "EXPEND")],
            concurrent,
        )
        assert_nothing_registered(fleet.services)
        # The same rig still answers other signals.
        with anyio.fail_after(SAFETY):
            assert await fleet.services.cleanup(concurrent=concurrent) == {
                "video": [answer("video", None)],
                "ephys": [None],
                "sync": [answer("sync", None)],
            }


@both_modes
async def test_rig_that_never_echoes(concurrent: bool) -> None:
    """A socket that never reads: EchoTimeout for that rig, the others still answer."""
    async with (
        rig_fleet(["video", "ephys"]) as fleet,
        raw_udp() as silent,
        EchoProtocol.client(
            f"udp://{LOCALHOST}:{silent.port}", name="silent", echo_timeout=SHORT
        ) as silent_rig,
    ):
        services = Services(
            {
                "video": fleet.services["video"],
                "silent": silent_rig,
                "ephys": fleet.services["ephys"],
            }
        )
        with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
            await services.info(ExpStatus.RUNNING, concurrent=concurrent)
        err = info.value
        assert err.event is INFO
        assert list(err.failures) == ["silent"]
        exc = err.failures["silent"]
        assert isinstance(exc, EchoTimeout)
        assert exc.timeout == SHORT
        assert exc.peer == (LOCALHOST, silent.port)
        assert err.responses == {
            "video": [20, answer("video", 20, None)],
            "ephys": [20, answer("ephys", 20, None)],
        }
        assert_nothing_registered(services)
        with anyio.fail_after(SAFETY):
            signal, addr = await silent.recv()
            assert (untag(signal), addr) == (b"[64, 20, null]", silent_rig.local_address)


@both_modes
async def test_rig_that_stopped_udp(concurrent: bool) -> None:
    """A stopped UDP rig: ICMP port unreachable makes it PeerUnavailable, no timeout."""
    async with rig_fleet(["video", "gone", "ephys"], "udp") as fleet:
        await fleet.stop_rig("gone")
        with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
            await fleet.services.init(concurrent=concurrent)
        err = info.value
        assert list(err.failures) == ["gone"]
        assert isinstance(err.failures["gone"], PeerUnavailable)
        assert err.responses == {"video": [answer("video", None)], "ephys": [answer("ephys", None)]}
        assert_nothing_registered(fleet.services)


@both_modes
async def test_rig_that_drops_the_tcp_connection(concurrent: bool) -> None:
    """A TCP rig that disconnects instead of echoing: PeerUnavailable at once."""
    async with (
        rig_fleet(["video", "ephys"], "ws") as fleet,
        raw_server("ws") as dropper,
        EchoProtocol.client(dropper.uri, name="dropper", echo_timeout=LONG) as dropper_rig,
        anyio.create_task_group() as tg,
    ):

        async def drop() -> None:
            assert untag(await dropper.recv()) == b"[8, null]"
            await dropper.disconnect()

        tg.start_soon(drop)
        services = Services([fleet.services["video"], dropper_rig, fleet.services["ephys"]])
        assert list(services) == ["video", "dropper", "ephys"]
        with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
            await services.cleanup(concurrent=concurrent)
        err = info.value
        assert list(err.failures) == ["dropper"]
        assert isinstance(err.failures["dropper"], PeerUnavailable)
        assert err.failures["dropper"].peer == (LOCALHOST, dropper.port)
        assert err.responses == {"video": [answer("video", None)], "ephys": [answer("ephys", None)]}
        assert_nothing_registered(services)
        # A TCP client endpoint is no longer connected once its connection is gone.
        assert not dropper_rig.is_connected
        assert not services.is_connected
        assert fleet.services.is_connected


async def test_closed_endpoints_fail_with_endpoint_closed() -> None:
    async with rig_fleet(["video", "ephys"]) as fleet:
        await fleet.services.aclose()
        with pytest.raises(ServicesError) as info:
            await fleet.services.init()
        assert set(info.value.failures) == {"video", "ephys"}
        assert all(isinstance(e, EndpointClosed) for e in info.value.failures.values())
        assert info.value.responses == {}


# ------------------------------------------------------------------------- Services.open


async def test_open_passes_options_and_closes_every_endpoint(scheme: str) -> None:
    async with rig_fleet(["video", "ephys"], scheme) as fleet:
        uris = {name: fleet.services[name].server_uri for name in ["ephys", "video"]}
        async with Services.open(uris, timeout=3.5, echo_timeout=2.5) as services:
            assert list(services) == ["ephys", "video"]
            assert services.timeout == 3.5
            for name, rig in services.items():
                assert rig.name == name
                assert rig.role == "client"
                assert rig.default_echo_timeout == 2.5
                assert rig.server_uri == uris[name]
            assert services.is_connected
            with anyio.fail_after(SAFETY):
                assert list(await services.init()) == ["ephys", "video"]
        assert not services.is_connected
        assert not any(rig.is_connected for rig in services.values())
        assert fleet.services.is_connected

        # An error in the body comes out as itself, every endpoint closed.
        with pytest.raises(LookupError, match="oops"):
            async with Services.open(uris) as services:
                raise LookupError("oops")
        assert not any(rig.is_connected for rig in services.values())


@contextmanager
def refused_tcp_port() -> Iterator[int]:
    """A loopback TCP port bound but not listening: a connection attempt is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as refuser:
        refuser.bind((LOCALHOST, 0))
        yield refuser.getsockname()[1]


async def test_open_with_a_rig_down_opens_the_others() -> None:
    """A ws:// rig with nothing listening does not stop ``Services.open``: it connects in
    the background, and each signal fails for that rig only until it is up."""
    with refused_tcp_port() as port:
        async with rig_fleet(["video", "ephys"]) as fleet:
            uris = {
                "video": fleet.services["video"].server_uri,
                "nobody": f"ws://{LOCALHOST}:{port}",
                "ephys": fleet.services["ephys"].server_uri,
            }
            with anyio.fail_after(SAFETY):
                async with Services.open(uris, echo_timeout=LONG, timeout=LONG) as services:
                    assert list(services) == ["video", "nobody", "ephys"]
                    state = services.state
                    assert not state["nobody"].connected
                    assert state["video"].connected
                    assert state["ephys"].connected
                    assert not services.is_connected
                    with pytest.raises(ServicesError) as info:
                        await services.init()
                    err = info.value
                    assert err.event is INIT
                    assert list(err.failures) == ["nobody"]
                    exc = err.failures["nobody"]
                    assert isinstance(exc, PeerUnavailable)
                    assert exc.peer == (LOCALHOST, port)
                    assert err.responses == {
                        "video": [answer("video", None)],
                        "ephys": [answer("ephys", None)],
                    }
                    assert services.state["nobody"].last_error is exc
                    assert services.state["video"].last_error is None
                    # Going on without it.
                    others = services.without("nobody")
                    assert list(others) == ["video", "ephys"]
                    assert await others.init() == err.responses
                    assert_nothing_registered(services)
        assert not any(rig.is_connected for rig in services.values())


@pytest.mark.parametrize("how", ["wait", "no-reconnect"])
async def test_open_fails_naming_the_rig_that_is_down(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Opening fails for a rig that is down if asked to: not connected within ``wait``, or
    refused with ``reconnect=False``. One ServicesError (``event`` None) names it; the
    body never runs; every endpoint that was opened is closed."""
    opened: list[EchoProtocol] = []
    others_open = anyio.Event()
    real_client = EchoProtocol.client

    @asynccontextmanager
    async def client(uri: str, **options: Any) -> AsyncIterator[EchoProtocol]:
        if options["name"] == "nobody":
            await others_open.wait()  # fail only once the other two are open
        async with real_client(uri, **options) as endpoint:
            opened.append(endpoint)
            if len(opened) == 2:
                others_open.set()
            yield endpoint

    body_ran = False
    options: dict[str, Any] = {"wait": SHORT} if how == "wait" else {"reconnect": False}
    with refused_tcp_port() as port:
        async with rig_fleet(["video", "ephys"]) as fleet:
            monkeypatch.setattr(EchoProtocol, "client", client)
            uris = {
                "video": fleet.services["video"].server_uri,
                "nobody": f"ws://{LOCALHOST}:{port}",
                "ephys": fleet.services["ephys"].server_uri,
            }
            with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
                async with Services.open(uris, **options):
                    body_ran = True  # pragma: no cover
    assert not body_ran
    err = info.value
    assert err.event is None
    assert list(err.failures) == ["nobody"]
    exc = err.failures["nobody"]
    assert isinstance(exc, PeerUnavailable)
    assert exc.peer == (LOCALHOST, port)
    assert str(err).startswith("opening failed on 1 of 3 rigs: nobody: ")
    assert sorted(err.responses) == ["ephys", "video"]
    expected = ["ephys", "nobody", "video"] if how == "wait" else ["ephys", "video"]
    assert sorted(rig.name for rig in opened) == expected
    assert not any(rig.is_connected for rig in opened)
    assert all(rig._stopped.is_set() for rig in opened)


async def test_open_needs_a_mapping() -> None:
    with pytest.raises(TypeError, match="mapping of rig name to URI"):
        async with Services.open([f"udp://{LOCALHOST}:11001"]):  # type: ignore[arg-type]
            pass  # pragma: no cover


# ---------------------------------------------------------------------------- cancellation


@both_modes
async def test_cancel_before_the_echo(concurrent: bool) -> None:
    """Cancelled while a silent rig's echo is awaited: nothing left behind, a late echo is
    swallowed, and the next call succeeds."""
    async with (
        rig_fleet(["video", "ephys"]) as fleet,
        raw_udp() as silent,
        EchoProtocol.client(
            f"udp://{LOCALHOST}:{silent.port}", name="silent", echo_timeout=LONG
        ) as silent_rig,
    ):
        services = Services(
            {
                "video": fleet.services["video"],
                "silent": silent_rig,
                "ephys": fleet.services["ephys"],
            },
            timeout=LONG,
        )
        async with watching(fleet.services, INIT) as watchers:
            with anyio.move_on_after(SHORT) as scope:
                await services.init("first", concurrent=concurrent)
            assert scope.cancelled_caught
            assert_nothing_registered({"silent": silent_rig})
            assert_only_watchers(fleet.services, INIT)
            addressed = ["video", "ephys"] if concurrent else ["video"]
            assert_addressed(fleet.received, [(name, "EXPINIT") for name in addressed], concurrent)
            late = await collect(watchers, addressed)
            assert {name: msg.data for name, msg in late.items()} == {
                name: [answer(name, "first")] for name in addressed
            }
        assert_nothing_registered(services)

        # The silent rig echoes at last: the endpoint swallows the late echo (it
        # does not echo it back) and handles what comes next as usual.
        with anyio.fail_after(SAFETY):
            signal, addr = await silent.recv()
            assert (untag(signal), addr) == (b'[1, "first"]', silent_rig.local_address)
            await silent.send(signal, addr)
            await silent.send(b"[32, 10]", addr)
            assert await silent.recv() == (b"[32, 10]", addr)
        assert silent_rig.stats.echoed == 1
        assert silent_rig.stats.late == 1
        assert silent_rig.stats.timeouts == 0

        # The next call succeeds, the silent rig now answering like a rig.
        async def answer_once() -> None:
            signal, addr = await silent.recv()
            assert untag(signal) == b'[1, "second"]'
            await silent.send(signal, addr)
            await silent.send(b'[1, "done"]', addr)
            assert await silent.recv() == (b'[1, "done"]', addr)

        async with anyio.create_task_group() as tg:
            tg.start_soon(answer_once)
            with anyio.fail_after(SAFETY):
                responses = await services.init("second", concurrent=concurrent)
        assert responses == {
            "video": [answer("video", "second")],
            "silent": ["done"],
            "ephys": [answer("ephys", "second")],
        }
        assert_nothing_registered(services)


@both_modes
async def test_cancel_while_awaiting_the_completion(scheme: str, concurrent: bool) -> None:
    """Cancelled after a mute rig's echo, while its completion is awaited."""
    names = ["video", "mute", "ephys"]
    async with rig_fleet(names, scheme, mute=["mute"]) as fleet:
        services = fleet.services
        async with watching(services, START) as watchers:
            with anyio.move_on_after(SHORT) as scope:
                await services.start(EXP_REF, concurrent=concurrent)
            assert scope.cancelled_caught
            assert services["mute"].stats.confirmed == 1, "the echo came before the cancel"
            assert_only_watchers(services, START)
            addressed = names if concurrent else ["video", "mute"]
            assert_addressed(fleet.received, [(name, "EXPSTART") for name in addressed], concurrent)
            late = await collect(watchers, [name for name in addressed if name != "mute"])
            assert late["video"].data == [EXP_REF, answer("video", EXP_REF, None)]
        assert_nothing_registered(services)

        fleet.rigs["mute"].ack = True
        with anyio.fail_after(SAFETY):
            responses = await services.start(EXP_REF, "again", concurrent=concurrent)
        assert responses == {name: [EXP_REF, answer(name, EXP_REF, "again")] for name in names}
        assert_nothing_registered(services)


@both_modes
async def test_cancel_from_a_rig_handler(scheme: str, concurrent: bool) -> None:
    """A cancel scope cancelled by the last rig's handler once every rig has the signal;
    its completion comes late."""
    scope = anyio.CancelScope()
    release = anyio.Event()
    all_handled = anyio.Event()
    names = ["video", "ephys", "sync"]

    def record(name: str, handled: list[tuple[str, str]], msg: Message) -> None:
        handled.append((name, msg.event.name or ""))
        if len(handled) == len(names):
            all_handled.set()

    def counted(name: str, handled: list[tuple[str, str]]) -> RigHandler:
        async def handler(msg: Message) -> Any:
            record(name, handled, msg)
            return {"rig": name, "got": msg.data}

        return handler

    def canceller(name: str, handled: list[tuple[str, str]]) -> RigHandler:
        async def handler(msg: Message) -> Any:
            record(name, handled, msg)
            if not release.is_set():
                await all_handled.wait()  # concurrent mode: the rigs' order is not promised
                scope.cancel()
                await release.wait()
                return "late"
            return "on time"

        return handler

    handlers = {"video": counted, "ephys": counted, "sync": canceller}
    async with rig_fleet(names, scheme, handlers=handlers) as fleet:
        services = fleet.services
        async with watching(services, INIT) as watchers:
            with scope:
                await services.init(concurrent=concurrent)
            assert scope.cancelled_caught
            assert_only_watchers(services, INIT)
            assert_addressed(fleet.handled, [(name, "EXPINIT") for name in names], concurrent)
            release.set()
            late = await collect(watchers, names)
            assert late["sync"].data == ["late"]
        assert_nothing_registered(services)

        with anyio.fail_after(SAFETY):
            responses = await services.init(concurrent=concurrent)
        assert responses == {
            "video": [answer("video", None)],
            "ephys": [answer("ephys", None)],
            "sync": ["on time"],
        }
        assert_nothing_registered(services)


# ------------------------------------------------------------------ concurrency, virtual time


@pytest.mark.trio
# pytest-trio runs this test; overriding ``anyio_backend`` keeps the module-wide
# anyio mark from adding a second, asyncio-labelled run of it.
@pytest.mark.parametrize("anyio_backend", ["trio"])
@both_modes
async def test_concurrent_mode_waits_for_rigs_together(
    autojump_clock: trio.testing.MockClock, scheme: str, concurrent: bool
) -> None:
    """8 rigs that each take 1 s: about 1 s together, 8 s one after another (virtual time)."""
    # Jump only after 10 ms of real idleness, so that no datagram is still on its
    # way through loopback when the clock jumps (this is not a time measurement).
    autojump_clock.autojump_threshold = 0.01

    def sleepy(name: str, handled: list[tuple[str, str]]) -> RigHandler:
        async def handler(msg: Message) -> Any:
            handled.append((name, msg.event.name or ""))
            await trio.sleep(1.0)
            return name

        return handler

    async with rig_fleet(NAMES, scheme, handlers=dict.fromkeys(NAMES, sleepy)) as fleet:
        start = trio.current_time()
        responses = await fleet.services.init(concurrent=concurrent)
        elapsed = trio.current_time() - start
        assert responses == {name: [name] for name in NAMES}
        assert_addressed(fleet.handled, [(name, "EXPINIT") for name in NAMES], concurrent)
        if concurrent:
            assert 1.0 <= elapsed < 2.0
        else:
            assert elapsed >= 8.0
            assert elapsed < 9.0


# -------------------------------------------------- iblutil's TestServices, adapted


@asynccontextmanager
async def server_and_clients(
    *names: str, scheme: str = "udp"
) -> AsyncIterator[tuple[EchoProtocol, list[EchoProtocol]]]:
    """A server endpoint (playing every rig) and one client endpoint per name."""
    async with (
        EchoProtocol.server(f"{scheme}://{LOCALHOST}:0", name="server") as server,
        AsyncExitStack() as stack,
    ):
        host, port = server.local_address
        clients = [
            await stack.enter_async_context(
                EchoProtocol.client(f"{scheme}://{host}:{port}", name=name)
            )
            for name in names
        ]
        yield server, clients


async def test_services_is_an_immutable_mapping() -> None:
    async with server_and_clients("client1", "client2") as (_, (client1, client2)):
        services = Services([client1, client2])
        assert isinstance(services, Mapping)
        assert not isinstance(services, MutableMapping)
        assert list(services) == ["client1", "client2"]
        assert len(services) == 2
        assert services["client1"] is client1
        assert "client2" in services
        assert dict(services) == {"client1": client1, "client2": client2}
        assert services.timeout == 10.0
        assert "client1" in repr(services)

        with pytest.raises(TypeError, match="immutable"):
            services["client2"] = client1  # type: ignore[index]
        with pytest.raises(TypeError, match="immutable"):
            del services["client1"]  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="immutable"):
            services.pop("client1")  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="immutable"):
            services.popitem()  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="immutable"):
            services.update({"client3": client1})  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="immutable"):
            services.setdefault("client3", client1)  # type: ignore[attr-defined]
        with pytest.raises(TypeError, match="immutable"):
            services.clear()  # type: ignore[attr-defined]
        assert dict(services) == {"client1": client1, "client2": client2}

        # A mapping names the rigs by its keys, in its order.
        named = Services({"video": client2, "ephys": client1}, timeout=None)
        assert list(named) == ["video", "ephys"]
        assert named["video"] is client2
        assert named.timeout is None
        assert dict(Services(named)) == dict(named)

        # Only endpoints, each name once.
        with pytest.raises(TypeError, match="EchoProtocol"):
            Services([client1, None])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="EchoProtocol"):
            Services({"video": f"udp://{LOCALHOST}:11001"})  # type: ignore[dict-item]
        with pytest.raises(ValueError, match="client1"):
            Services([client1, client1])
        with pytest.raises(ValueError, match="'1'"):
            Services({"1": client1, 1: client2})  # type: ignore[dict-item]


async def test_duplicate_names_are_rejected() -> None:
    async with server_and_clients("same", "same") as (_, (first, second)):
        assert first is not second
        with pytest.raises(ValueError, match="'same'"):
            Services([first, second])


async def test_aclose_closes_every_endpoint() -> None:
    async with server_and_clients("client1", "client2") as (_, clients):
        services = Services(clients)
        assert services.is_connected
        await services.aclose()
        assert not services.is_connected
        assert not any(client.is_connected for client in clients)
        await services.aclose()  # idempotent
        assert not services.is_connected
    assert not Services([]).is_connected, "no rigs: not connected"


async def test_is_connected_needs_every_rig() -> None:
    async with server_and_clients("client1", "client2") as (_, (client1, client2)):
        services = Services([client1, client2])
        await client2.aclose()
        assert client1.is_connected
        assert not services.is_connected


async def test_assign_and_clear_callbacks() -> None:
    async with server_and_clients("client1", "client2") as (server, clients):
        client1, client2 = clients
        services = Services(clients)
        calls: list[tuple[str, Any, EchoProtocol | None]] = []
        send, receive = anyio.create_memory_object_stream[tuple[Message, EchoProtocol]](8)
        with send, receive:

            def plain(msg: Message) -> None:
                calls.append(("plain", msg.data, None))

            def with_service(msg: Message, rig: EchoProtocol) -> None:
                calls.append(("with_service", msg.data, rig))

            async def async_with_service(msg: Message, rig: EchoProtocol) -> None:
                await anyio.lowlevel.checkpoint()
                send.send_nowait((msg, rig))

            async def signal_each_client(data: Any) -> None:
                # A sync callback runs in the receive task right after the
                # subscriptions are fed: once a watcher has the message, it ran.
                async with watching(services, INIT) as watchers:
                    for client in clients:
                        await server.init(data, addr=client.local_address)
                    await collect(watchers, services)

            services.assign_callback("EXPINIT", plain)
            services.assign_callback(INIT | START, with_service, return_service=True)
            services.assign_callback(INIT, async_with_service, return_service=True)
            with anyio.fail_after(SAFETY):
                await signal_each_client("foo")
                got = [await receive.receive() for _ in clients]
            assert calls == [
                ("plain", ["foo"], None),
                ("with_service", ["foo"], client1),
                ("plain", ["foo"], None),
                ("with_service", ["foo"], client2),
            ]
            assert sorted((msg.data, rig.name) for msg, rig in got) == [
                (["foo"], "client1"),
                (["foo"], "client2"),
            ]
            assert all(msg.addr == server.local_address for msg, _ in got)

            # Validation: nothing is assigned.
            with pytest.raises(TypeError, match="callback"):
                services.assign_callback("EXPEND", "foo")  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="callback"):
                services.assign_callback("EXPEND", "foo", return_service=True)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="EXPSTOP"):
                services.assign_callback("EXPSTOP", plain)
            assert all(int(END) not in client._events._callbacks for client in clients)

            # Clearing: by callback (with or without the service), then all of them.
            services.assign_callback("EXPINIT", with_service)
            assert services.clear_callbacks("EXPINIT", plain) == {"client1": 1, "client2": 1}
            assert services.clear_callbacks(INIT, with_service) == {"client1": 2, "client2": 2}
            assert services.clear_callbacks(START) == {"client1": 1, "client2": 1}
            assert services.clear_callbacks("expinit") == {"client1": 1, "client2": 1}
            assert services.clear_callbacks("expinit") == {"client1": 0, "client2": 0}
            assert all(client._events._callbacks == {} for client in clients)

            calls.clear()
            with anyio.fail_after(SAFETY):
                await signal_each_client("bar")
            assert calls == []


async def test_await_all() -> None:
    async with server_and_clients("client1", "client2", "client3") as (server, clients):
        services = Services(clients, timeout=LONG)
        statuses = {"client1": 20, "client2": 30, "client3": 0}
        result: dict[str, Any] = {}

        async def wait() -> None:
            result.update(await services.await_all("EXPSTATUS"))

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                assert all(int(STATUS) in subscriptions(client) for client in clients)
                for client in reversed(clients):
                    await server.status(statuses[client.name], addr=client.local_address)
        assert result == {name: [status] for name, status in statuses.items()}
        assert list(result) == ["client1", "client2", "client3"]
        assert_nothing_registered(services)

        with pytest.raises(ValueError, match="Compound"):
            await services.await_all(INIT | START)


async def test_await_all_names_the_rigs_that_did_not_send() -> None:
    async with server_and_clients("client1", "client2") as (server, (client1, client2)):
        services = Services([client1, client2], timeout=SHORT)
        result: dict[str, Any] = {}

        async def wait() -> None:
            with pytest.raises(ServicesError) as info:
                await services.await_all(INFO)
            result["error"] = info.value

        with anyio.fail_after(SAFETY):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                await server.info("running", {"trial": 1}, addr=client2.local_address)
        err = result["error"]
        assert err.event is INFO
        assert list(err.failures) == ["client1"]
        assert isinstance(err.failures["client1"], CompletionTimeout)
        assert err.responses == {"client2": [20, {"trial": 1}]}
        assert_nothing_registered(services)


async def test_each_service_method_on_the_wire() -> None:
    """Every method sends iblutil's exact bytes and returns each rig's completion data."""
    async with (
        burst_rigs(2) as rigs,
        Services.open(
            {"rig1": rigs[0].uri, "rig2": rigs[1].uri}, echo_timeout=LONG, timeout=LONG
        ) as services,
    ):
        ref = EXP_REF
        calls: list[tuple[Callable[[], Awaitable[dict[str, Any]]], bytes, list[Any]]] = [
            (lambda: services.init([42, "foo"]), b'[1, [42, "foo"]]', [[42, "foo"]]),
            (lambda: services.start(ref), b'[2, "2024-05-01_1_mouse", null]', [ref, None]),
            (
                lambda: services.info(ExpStatus.RUNNING, {"exp_ref": ref}),
                b'[64, 20, {"exp_ref": "2024-05-01_1_mouse"}]',
                [20, {"exp_ref": ref}],
            ),
            (lambda: services.status(ExpStatus.STOPPED), b"[32, 30]", [30]),
            (lambda: services.stop(immediately=True), b"[16, null]", [None]),
            (lambda: services.stop(), b"[4, null]", [None]),
            (lambda: services.cleanup(data=[42, "foo"]), b'[8, [42, "foo"]]', [[42, "foo"]]),
        ]
        with anyio.fail_after(SAFETY):
            for call, wire, data in calls:
                assert await call() == {"rig1": data, "rig2": data}
                assert untag(rigs[0].signals[-1]) == untag(rigs[1].signals[-1]) == wire
            assert await services.alyx(FakeAlyx()) is None
        alyx_wire = b'[128, "https://alyx.example.org", {"experimenter": "0123456789abcdef"}]'
        for rig in rigs:
            assert [untag(signal) for signal in rig.signals] == [wire for _, wire, _ in calls] + [
                alyx_wire
            ]
        assert_nothing_registered(services)

        with pytest.raises(ValueError, match="logged-in"):
            await services.alyx(FakeAlyx(is_logged_in=False))
        assert len(rigs[0].signals) == len(calls) + 1, "nothing sent"


async def test_alyx_names_the_rigs_that_did_not_confirm() -> None:
    async with (
        rig_fleet(["video"]) as fleet,
        raw_udp() as silent,
        EchoProtocol.client(
            f"udp://{LOCALHOST}:{silent.port}", name="silent", echo_timeout=SHORT
        ) as silent_rig,
    ):
        services = Services([fleet.services["video"], silent_rig])
        with anyio.fail_after(SAFETY), pytest.raises(ServicesError) as info:
            await services.alyx(FakeAlyx())
        err = info.value
        assert err.event is ALYX
        assert list(err.failures) == ["silent"]
        assert isinstance(err.failures["silent"], EchoTimeout)
        assert err.responses == {"video": None}
        assert_nothing_registered(services)


@both_modes
async def test_oversized_signal_is_rejected_before_anything_is_sent(concurrent: bool) -> None:
    """Over the UDP limit: a plain ValueError (not an exception group), no rig signalled."""
    async with rig_fleet(["video", "ephys"]) as fleet:
        with pytest.raises(ValueError, match="UDP"):
            await fleet.services.init("x" * 70_000, concurrent=concurrent)
        assert_nothing_registered(fleet.services)
        with anyio.fail_after(SAFETY):
            await fleet.services.status(ExpStatus.RUNNING, concurrent=concurrent)
        assert_addressed(
            fleet.received, [("video", "EXPSTATUS"), ("ephys", "EXPSTATUS")], concurrent
        )


async def test_server_endpoints_are_rejected() -> None:
    async with server_and_clients("client1") as (server, (client1,)):
        with pytest.raises(TypeError, match="client"):
            Services([client1, server])


async def test_aclose_marks_every_endpoint_closed_even_if_cancelled() -> None:
    async with server_and_clients("client1", "client2", "client3") as (_, clients):
        services = Services(clients)
        with anyio.CancelScope() as scope:
            scope.cancel()
            await services.aclose()
        assert not any(client.is_connected for client in clients)
        with anyio.fail_after(SAFETY):
            await services.aclose()
        assert not services.is_connected
