"""``Services``: send one signal to every rig and collect their completion updates.

Every rig is signalled at once and awaited concurrently in one task group
(or one after another with ``concurrent=False``), through
:meth:`EchoProtocol.call <trio_rignet.EchoProtocol.call>`, which registers the
wait for a rig's completion update before its signal goes out. A rig that is
down fails only its own part of a signal.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import anyio
from anyio.abc import TaskStatus

from ._calls import run_calls
from ._echo import EchoProtocol, EndpointOptions, StatusLike
from ._errors import CompletionTimeout, PeerUnavailable, RignetError
from ._events import Callback, EventLike
from ._extensions import ClockEstimate
from ._groups import collapse_single
from ._liveness import Change, Watchers, heartbeat
from ._messages import (
    AlyxLike,
    ExpMessage,
    build_alyx,
    build_cleanup,
    build_info,
    build_init,
    build_start,
    build_status,
    build_stop,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CompletionTimeout", "RigState", "Services", "ServicesError"]

log = logging.getLogger("trio_rignet.services")

ServiceCallback = Callable[[Any, EchoProtocol], Any]


class ServicesError(RignetError):
    """One or more rigs failed; the others finished first.

    Raised by a signal (``event`` is the signal) and by :meth:`Services.open`
    (``event`` is None: rigs that could not be opened, or were not reachable
    in time).

    Attributes:
        event: the signal's event, or None when opening failed.
        failures: rig name -> the exception of that rig (:class:`EchoTimeout`,
            :class:`CompletionTimeout`, :class:`RemoteError`,
            :class:`PeerUnavailable`, ...).
        responses: rig name -> completion data, for the rigs that succeeded.

    To handle a timeout of one rig::

        try:
            await services.start(exp_ref)
        except ServicesError as err:
            if isinstance(err.failures.get("video"), TimeoutError):
                ...  # the video rig did not echo or did not complete in time
    """

    def __init__(
        self,
        event: ExpMessage | None,
        responses: dict[str, Any],
        failures: dict[str, BaseException],
    ) -> None:
        self.event = event
        self.responses = responses
        self.failures = failures
        detail = "; ".join(_named(name, exc) for name, exc in failures.items())
        total = len(responses) + len(failures)
        what = "opening" if event is None else str(event.name)
        super().__init__(f"{what} failed on {len(failures)} of {total} rigs: {detail}")


def _named(name: str, exc: BaseException) -> str:
    """``"name: message"``, without repeating a name the message starts with."""
    text = str(exc) or type(exc).__name__
    return text if text.startswith(f"{name}: ") else f"{name}: {text}"


@dataclass
class RigState:
    """What a :class:`Services` knows of one rig (read any time).

    Attributes:
        connected: the rig's endpoint can send (UDP: always; TCP: its
            connection is up).
        last_error: the exception of the rig's last failed signal, or None
            once a signal succeeds.
        last_rtt: the echo round trip of its last confirmed signal, seconds.
        trio: the rig runs trio-rignet (it has sent a tagged message).
        alive: the heartbeat's verdict: True (answering), False (lost), None
            (not known: no heartbeat toward it, e.g. an iblutil rig).
        heartbeat_rtt: round trip of its latest heartbeat, seconds.
        clock: its clock against the main PC's
            (:class:`~trio_rignet.ClockEstimate`), None before a heartbeat.
        last_event: the event of the last message it sent (a completion
            update, usually), None before one.
    """

    connected: bool
    last_error: BaseException | None = None
    last_rtt: float | None = None
    trio: bool = False
    alive: bool | None = None
    heartbeat_rtt: float | None = None
    clock: ClockEstimate | None = None
    last_event: ExpMessage | None = None


class _WithService:
    """Wraps a callback to also pass the service; compares equal to the callback."""

    __slots__ = ("callback", "service")

    def __init__(self, callback: ServiceCallback, service: EchoProtocol) -> None:
        self.callback = callback
        self.service = service

    def __call__(self, msg: Any) -> Any:
        return self.callback(msg, self.service)

    def __eq__(self, other: object) -> bool:
        return other is self or other is self.callback

    def __hash__(self) -> int:
        return hash(self.callback)

    def __repr__(self) -> str:
        return f"{self.callback!r} (with service {self.service.name!r})"


class Services(Mapping[str, EchoProtocol]):
    """An immutable mapping of rig name to endpoint, signalled together.

    Build it from endpoints you opened yourself (a list, named by their
    ``name``, or a mapping), or let :meth:`open` open a client endpoint per rig.

    Args:
        rigs: endpoints, as an iterable (keyed by ``rig.name``) or a mapping.
        timeout: seconds to wait for each rig's completion update after its
            echo (``None`` or 0: wait forever). Echo timeouts are the endpoints'.

    Raises:
        TypeError: a value is not a client :class:`EchoProtocol`.
        ValueError: two rigs have the same name.
    """

    def __init__(
        self,
        rigs: Iterable[EchoProtocol] | Mapping[str, EchoProtocol],
        timeout: float | None = 10.0,
    ) -> None:
        items: list[tuple[Any, Any]]
        if isinstance(rigs, Mapping):
            items = list(rigs.items())
        else:
            items = [(getattr(rig, "name", None), rig) for rig in rigs]
        data: dict[str, EchoProtocol] = {}
        for name, rig in items:
            if not isinstance(rig, EchoProtocol):
                raise TypeError(
                    f"Services needs EchoProtocol endpoints, got {type(rig).__name__} for "
                    f"{name!r}; open one with EchoProtocol.client(uri)"
                )
            if rig.role != "client":
                raise TypeError(
                    f"rig {name!r} is a server endpoint; Services signals each rig's remote "
                    "address, so give it client endpoints (EchoProtocol.client(uri))"
                )
            key = str(name)
            if key in data:
                raise ValueError(f"two rigs are named {key!r}: give each endpoint its own name")
            data[key] = rig
        self._rigs = data
        self.timeout = timeout
        self._states = {name: RigState(rig.is_connected) for name, rig in data.items()}
        self._alive: dict[str, bool | None] = {}
        self._watchers = Watchers()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        rigs: Mapping[str, str],
        *,
        timeout: float | None = 10.0,
        wait: float | None = None,
        heartbeat: float | None = 0.2,
        lost_after: float = 0.8,
        trio_rigs: bool | Collection[str] = False,
        **options: Unpack[EndpointOptions],
    ) -> AsyncIterator[Services]:
        """Open a client endpoint for every rig, concurrently, in one task group.

        ::

            async with Services.open({"video": "udp://10.0.0.2", "ephys": "ws://10.0.0.3"}) as rigs:
                await rigs.init()

        A rig that is down does not stop the others: TCP rigs connect (and
        reconnect) in the background (``reconnect=True`` unless you pass
        ``reconnect=False``), and each signal fails only for the rigs that
        cannot be reached (:class:`~trio_rignet.PeerUnavailable` in
        :attr:`ServicesError.failures`). :attr:`state` shows each rig's state;
        :meth:`without` signals the others only.

        Args:
            rigs: rig name -> URI.
            timeout: as for :class:`Services`.
            wait: if given, wait up to this many seconds for every TCP rig to
                be connected, and raise :class:`ServicesError` naming those that
                are not (UDP rigs have no connection to wait for).
            heartbeat: seconds between heartbeats to each rig that runs
                trio-rignet (None: none); see :meth:`run_heartbeat`.
            lost_after: a rig silent this long is ``lost`` (see :meth:`watch`).
            trio_rigs: rigs known to run trio-rignet (True: all), so that
                heartbeats and clock offsets start at once; any other rig gets
                them only once it has shown it runs trio-rignet (its first
                completion update). Never declare an iblutil rig: it would
                echo the heartbeats and print warnings.
            options: endpoint options for every rig (see
                :class:`~trio_rignet.EndpointOptions`).

        Raises:
            ServicesError: rigs could not be opened (an invalid URI, a host
                name that does not resolve, ...), or were not connected within
                ``wait``; one error naming each such rig.
            TypeError: ``rigs`` is not a mapping.

        Every endpoint is closed on exit, also when the block is cancelled.
        """
        if not isinstance(rigs, Mapping):
            raise TypeError(
                f"Services.open needs a mapping of rig name to URI, got {type(rigs).__name__}"
            )
        options.setdefault("reconnect", True)
        endpoints: dict[str, EchoProtocol] = {}
        failures: dict[str, BaseException] = {}
        closed = anyio.Event()
        beating = anyio.CancelScope()

        async def beat(services: Services, interval: float, declared: set[str]) -> None:
            with beating:
                await services.run_heartbeat(interval, lost_after, declared)

        async def hold(name: str, uri: str, *, task_status: TaskStatus[None]) -> None:
            started = False
            try:
                async with EchoProtocol.client(uri, name=name, **options) as rig:
                    endpoints[name] = rig
                    task_status.started()
                    started = True
                    await closed.wait()
            except (RignetError, OSError, ValueError, TypeError) as exc:
                if started:
                    raise
                failures[name] = exc
                task_status.started()

        with collapse_single():
            async with anyio.create_task_group() as tg:
                try:
                    async with anyio.create_task_group() as opener:
                        for name, uri in rigs.items():
                            opener.start_soon(tg.start, hold, name, uri)
                    if not failures and wait is not None:
                        await _wait_connected(endpoints, wait, failures)
                    if failures:
                        opened = {n: None for n in rigs if n in endpoints and n not in failures}
                        raise ServicesError(None, opened, failures)
                    services = cls({name: endpoints[name] for name in rigs}, timeout=timeout)
                    if heartbeat is not None:
                        declared = set(rigs) if trio_rigs is True else set(trio_rigs or ())
                        tg.start_soon(beat, services, heartbeat, declared)
                    yield services
                finally:
                    beating.cancel()
                    closed.set()

    # ---------------------------------------------------------------- mapping

    def __getitem__(self, name: str) -> EchoProtocol:
        return self._rigs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rigs)

    def __len__(self) -> int:
        return len(self._rigs)

    def __repr__(self) -> str:
        return f"<Services {list(self._rigs)} timeout={self.timeout}>"

    def _immutable(self, *args: object, **kwargs: object) -> NoReturn:
        """Not supported: Services is immutable (raises TypeError, as in iblutil)."""
        raise TypeError("Services is immutable: use without() or build a new Services")

    __setitem__ = __delitem__ = pop = popitem = clear = update = setdefault = _immutable

    def without(self, *names: str) -> Services:
        """The same rigs but ``names``, sharing their endpoints (and their state).

        For going on without a rig that is down::

            rigs = services.without("ephys")
            await rigs.start(exp_ref)

        The endpoints stay owned by this Services (closing one closes both).

        Raises:
            KeyError: a name is not a rig of this Services.
        """
        unknown = [name for name in names if name not in self._rigs]
        if unknown:
            raise KeyError(
                f"no rig named {', '.join(map(repr, unknown))}; rigs: {list(self._rigs)}"
            )
        kept = {name: rig for name, rig in self._rigs.items() if name not in names}
        other = Services(kept, timeout=self.timeout)
        other._states = {name: self._states[name] for name in kept}
        other._alive = self._alive  # the heartbeat of this Services keeps both up to date
        other._watchers = self._watchers
        return other

    # -------------------------------------------------------------- lifecycle

    @property
    def is_connected(self) -> bool:
        """True if there is at least one rig and every rig is connected."""
        return bool(self._rigs) and all(rig.is_connected for rig in self._rigs.values())

    @property
    def state(self) -> Mapping[str, RigState]:
        """Rig name -> :class:`RigState`, up to date."""
        for name, rig in self._rigs.items():
            state = self._states[name]
            state.connected = rig.is_connected
            state.trio = rig.is_trio_peer()
            state.alive = self._alive.get(name)
            status = rig.peer_status()
            if status is not None:
                state.heartbeat_rtt = status.rtt
                state.clock = status.clock
            if rig.last_message is not None:
                state.last_event = rig.last_message.event
        return dict(self._states)

    async def run_heartbeat(
        self, interval: float = 0.2, lost_after: float = 0.8, trio_rigs: Collection[str] = ()
    ) -> None:
        """Ping every rig that runs trio-rignet each ``interval`` seconds, until cancelled.

        :meth:`open` runs this in its task group; run it yourself (in a task
        group) for a Services you built from endpoints. Each answer refreshes
        the rig's round trip and clock offset (:attr:`state`); a rig silent
        for ``lost_after`` seconds is reported ``lost``, and ``back`` when it
        answers again (see :meth:`watch`). Rigs that have not shown they run
        trio-rignet get nothing, unless named in ``trio_rigs``.

        Cancellation: the heartbeat stops; nothing is left registered.
        """
        if not interval > 0 or not lost_after > 0:
            raise ValueError(
                "interval and lost_after must be positive seconds, "
                f"got {interval!r} and {lost_after!r}"
            )
        await heartbeat(
            self._rigs, set(trio_rigs), interval, lost_after, self._watchers.notify, self._alive
        )

    def watch(self) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Change]]:
        """Liveness changes of the rigs, from now on::

            async with services.watch() as changes:
                async for change in changes:
                    print(change.peer, change.kind)  # "video lost", "video back"

        Each :class:`~trio_rignet.Change` is ``up`` (a rig answered its first
        heartbeat), ``lost`` (silent for ``lost_after``) or ``back`` (answering
        again; ``restarted`` if its process was started again). Only rigs that
        get heartbeats (see :meth:`run_heartbeat`) change.
        """
        return self._watchers.watch()

    async def aclose(self) -> None:
        """Close every rig's endpoint. Idempotent.

        Cancellation: every endpoint is marked closed before the first wait.
        """
        # One task per rig: each marks its endpoint closed before its first
        # wait, even when the caller is already cancelled.
        async with anyio.create_task_group() as tg:
            for rig in self._rigs.values():
                tg.start_soon(rig.aclose)

    # -------------------------------------------------------------- callbacks

    def assign_callback(
        self, event: EventLike, callback: Callback | ServiceCallback, return_service: bool = False
    ) -> None:
        """Assign ``callback`` to ``event`` on every rig.

        With ``return_service`` the callback is called as ``callback(message, rig)``.

        Raises:
            TypeError: ``callback`` is not callable, or ``event`` is invalid.
            ValueError: ``event`` is unknown.
        """
        if not callable(callback):
            raise TypeError(f"callback must be a function or async function, not {callback!r}")
        for rig in self._rigs.values():
            if return_service:
                rig.assign_callback(event, _WithService(callback, rig))  # type: ignore[arg-type]
            else:
                rig.assign_callback(event, callback)  # type: ignore[arg-type]

    def clear_callbacks(
        self, event: EventLike, callback: Callback | ServiceCallback | None = None
    ) -> dict[str, int]:
        """Remove ``callback`` (or every callback) for ``event``; return counts per rig."""
        return {
            name: rig.clear_callbacks(event, callback)  # type: ignore[arg-type]
            for name, rig in self._rigs.items()
        }

    # ---------------------------------------------------------------- signals

    async def init(self, data: Any = None, concurrent: bool = True) -> dict[str, Any]:
        """Signal EXPINIT to every rig; return each rig's completion data.

        The data of a rig is its completion message's elements after the
        event code (as iblutil returns them), e.g. ``[data]``.

        Raises:
            ServicesError: a rig failed (see :class:`ServicesError`); a rig
                that is down fails with :class:`~trio_rignet.PeerUnavailable`.
            ValueError: the message is too large for a rig's transport
                (raised before any rig is signalled).

        Cancellation (this and every signal method): every rig's work is cancelled
        at once; nothing stays registered on the endpoints, which stay usable. A
        rig may already have received the signal; its late echo is recognised and
        dropped, and its late completion update is an ordinary message.
        """
        return await self._signal(ExpMessage.EXPINIT, build_init(data), concurrent)

    async def start(
        self, exp_ref: str | Mapping[str, Any] | None, data: Any = None, concurrent: bool = True
    ) -> dict[str, Any]:
        """Signal EXPSTART with ``exp_ref`` to every rig; return completion data.

        Raises and cancellation as :meth:`init`.
        """
        return await self._signal(ExpMessage.EXPSTART, build_start(exp_ref, data), concurrent)

    async def stop(
        self, data: Any = None, immediately: bool = False, concurrent: bool = True
    ) -> dict[str, Any]:
        """Signal EXPEND (EXPINTERRUPT if ``immediately``), rigs in reverse order.

        Raises and cancellation as :meth:`init`.
        """
        event = ExpMessage.EXPINTERRUPT if immediately else ExpMessage.EXPEND
        return await self._signal(event, build_stop(data, immediately), concurrent, reverse=True)

    async def cleanup(self, data: Any = None, concurrent: bool = True) -> dict[str, Any]:
        """Signal EXPCLEANUP, rigs in reverse order; return completion data.

        Raises and cancellation as :meth:`init`.
        """
        return await self._signal(ExpMessage.EXPCLEANUP, build_cleanup(data), concurrent, True)

    async def status(self, status: StatusLike, concurrent: bool = True) -> dict[str, Any]:
        """Send EXPSTATUS to every rig; return completion data.

        Raises and cancellation as :meth:`init`.
        """
        return await self._signal(ExpMessage.EXPSTATUS, build_status(status), concurrent)

    async def info(
        self, status: StatusLike, data: Any = None, concurrent: bool = True
    ) -> dict[str, Any]:
        """Send EXPINFO to every rig; return completion data.

        Raises and cancellation as :meth:`init`.
        """
        return await self._signal(ExpMessage.EXPINFO, build_info(status, data), concurrent)

    async def alyx(self, alyx: AlyxLike) -> None:
        """Send a logged-in Alyx client's token to every rig (echo-confirmed, concurrently).

        Rigs send no completion update for this (as in iblutil).

        Raises:
            ValueError: ``alyx`` is not logged in.
            ServicesError: a rig did not confirm.

        Cancellation: every rig's send is cancelled; nothing stays registered.
        """
        if not (alyx.is_logged_in and alyx.base_url):
            raise ValueError("alyx must be a logged-in client with a base_url to send its token")
        payload = build_alyx(alyx)

        async def send(name: str, rig: EchoProtocol) -> None:
            await rig.confirmed_send(payload)

        await self._for_each(ExpMessage.ALYX, list(self._rigs.items()), send, True)

    async def await_all(self, event: EventLike) -> dict[str, Any]:
        """Wait for every rig to send ``event``; return rig name -> message data.

        Every rig's wait is registered when this is called. Bounded by
        :attr:`timeout` per rig.

        Raises:
            ServicesError: some rigs did not send it in time.

        Cancellation: every rig's wait is unregistered.
        """
        value = ExpMessage.validate(event, allow_bitwise=False)
        subs = {name: rig.subscription(value) for name, rig in self._rigs.items()}

        async def wait(name: str, rig: EchoProtocol) -> Any:
            deadline = math.inf if not self.timeout else anyio.current_time() + self.timeout
            with anyio.CancelScope(deadline=deadline):
                return (await subs[name].get()).data
            assert self.timeout
            raise CompletionTimeout(name, value, self.timeout)

        try:
            return await self._for_each(value, list(self._rigs.items()), wait, True)
        finally:
            for sub in subs.values():
                sub.close()

    async def _signal(
        self, event: ExpMessage, payload: bytes, concurrent: bool, reverse: bool = False
    ) -> dict[str, Any]:
        rigs = list(self._rigs.items())
        if reverse:
            rigs.reverse()
        for name, rig in rigs:
            # A plain ValueError before anything is sent, not a failure of some rigs.
            if len(payload) > rig.max_message_size:
                hint = (
                    " over UDP; use a ws:// (TCP) URI for large messages"
                    if rig.protocol == "udp"
                    else ""
                )
                raise ValueError(
                    f"a {event.name} message of {len(payload)} bytes is too large for rig "
                    f"{name!r} (at most {rig.max_message_size} bytes{hint})"
                )
        timeout = self.timeout or None
        if not concurrent:

            async def one(name: str, rig: EchoProtocol) -> Any:
                msg = await rig.call(payload, event=event, timeout=timeout)
                self._states[name].last_rtt = rig.stats.rtt_last
                return msg.data

            return await self._for_each(event, rigs, one, concurrent)
        # Every rig at once, in this task (no task per rig): see run_calls.
        responses: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        calls = {}
        for name, rig in rigs:
            try:
                calls[name] = rig.new_call(payload, event=event, timeout=timeout)
            except RignetError as exc:  # a closed endpoint
                failures[name] = self._states[name].last_error = exc
        await run_calls(list(calls.values()))
        # Cancelling the caller also cancels the endpoints' own tasks (same scope), which
        # close them and wake these calls with EndpointClosed first: raise the
        # cancellation, as documented, not a ServicesError about closed endpoints.
        await anyio.lowlevel.checkpoint_if_cancelled()
        for name, call in calls.items():
            state = self._states[name]
            result = call.result
            if isinstance(result, BaseException):
                failures[name] = state.last_error = result
            else:
                assert result is not None
                responses[name] = result.data
                state.last_error = None
                state.last_rtt = self._rigs[name].stats.rtt_last
        return self._outcome(event, responses, failures)

    async def _for_each(
        self,
        event: ExpMessage,
        rigs: list[tuple[str, EchoProtocol]],
        work: Callable[[str, EchoProtocol], Awaitable[Any]],
        concurrent: bool,
    ) -> dict[str, Any]:
        """Run ``work(name, rig)`` for every rig; collect results and failures by name."""
        responses: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}

        async def one(name: str, rig: EchoProtocol) -> None:
            state = self._states[name]
            try:
                responses[name] = await work(name, rig)
            except (RignetError, OSError) as exc:
                failures[name] = state.last_error = exc
            else:
                state.last_error = None

        if concurrent:
            async with anyio.create_task_group() as tg:
                for name, rig in rigs:
                    tg.start_soon(one, name, rig)
        else:
            for name, rig in rigs:
                await one(name, rig)
        # As in _signal: a cancelled caller gets its cancellation, not the
        # EndpointClosed of endpoints that its cancellation closed.
        await anyio.lowlevel.checkpoint_if_cancelled()
        return self._outcome(event, responses, failures)

    def _outcome(
        self, event: ExpMessage, responses: dict[str, Any], failures: dict[str, BaseException]
    ) -> dict[str, Any]:
        """Responses in rig order, or ServicesError if a rig failed."""
        ordered = {name: responses[name] for name in self._rigs if name in responses}
        if failures:
            raise ServicesError(event, ordered, failures)
        return ordered


def _peer(rig: EchoProtocol) -> tuple[str, int]:
    return (rig.hostname, rig.port)


async def _wait_connected(
    endpoints: Mapping[str, EchoProtocol], wait: float, failures: dict[str, BaseException]
) -> None:
    """Wait up to ``wait`` seconds for every endpoint to connect; record those that did not."""
    with anyio.move_on_after(wait):
        for rig in endpoints.values():
            # Our cancellation also closes the endpoints (their tasks share the scope):
            # raise it rather than EndpointClosed from a closed endpoint.
            await anyio.lowlevel.checkpoint_if_cancelled()
            await rig.wait_connected()
    await anyio.lowlevel.checkpoint_if_cancelled()
    for name, rig in endpoints.items():
        if not rig.is_connected:
            failures[name] = PeerUnavailable(
                _peer(rig), f"not connected within {wait:g} s (the rig is down or unreachable)"
            )
