"""``Services``: send one signal to every rig and collect their completion updates.

Every rig's echo and completion are awaited concurrently in one task group
(or one after another with ``concurrent=False``). In both modes the wait for a
rig's completion update is registered before its signal goes out, so a rig
that answers at once is never missed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import anyio
from anyio.abc import TaskStatus

from ._echo import EchoProtocol, StatusLike
from ._errors import RemoteError, RignetError
from ._events import Callback, Collector, EventLike, event_codes
from ._groups import collapse_single
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

__all__ = ["CompletionTimeout", "Services", "ServicesError"]

log = logging.getLogger("trio_rignet.services")

ServiceCallback = Callable[[Any, EchoProtocol], Any]


class CompletionTimeout(RignetError, TimeoutError):
    """A rig confirmed a signal but sent no completion update in time.

    Attributes:
        rig: the rig's name.
        event: the event whose completion was awaited.
        timeout: seconds waited.
    """

    def __init__(self, rig: str, event: ExpMessage, timeout: float) -> None:
        self.rig = rig
        self.event = event
        self.timeout = timeout
        super().__init__(
            f"{rig}: confirmed {event.name} but sent no completion update within {timeout:g} s "
            "(pass a longer Services timeout if the rig needs more time)"
        )


class ServicesError(RignetError):
    """One or more rigs failed a signal; the others finished first.

    Attributes:
        event: the signal's event.
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
        event: ExpMessage,
        responses: dict[str, Any],
        failures: dict[str, BaseException],
    ) -> None:
        self.event = event
        self.responses = responses
        self.failures = failures
        detail = "; ".join(f"{name}: {exc}" for name, exc in failures.items())
        total = len(responses) + len(failures)
        super().__init__(f"{event.name} failed on {len(failures)} of {total} rigs: {detail}")


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
        TypeError: a value is not an :class:`EchoProtocol`.
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
        self._closed = anyio.Event()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        rigs: Mapping[str, str],
        *,
        timeout: float | None = 10.0,
        echo_timeout: float | None = None,
        **endpoint_options: Any,
    ) -> AsyncIterator[Services]:
        """Open a client endpoint for every rig, concurrently, in one task group.

        ::

            async with Services.open({"video": "udp://10.0.0.2", "ephys": "ws://10.0.0.3"}) as rigs:
                await rigs.init()

        Every endpoint is closed on exit, also when one of them fails to open
        (that rig's error is raised) and when the block is cancelled.

        Args:
            rigs: rig name -> URI.
            timeout: as for :class:`Services`.
            echo_timeout: each endpoint's default echo timeout.
            endpoint_options: passed to :meth:`EchoProtocol.client`.
        """
        if not isinstance(rigs, Mapping):
            raise TypeError(
                f"Services.open needs a mapping of rig name to URI, got {type(rigs).__name__}"
            )
        endpoints: dict[str, EchoProtocol] = {}
        closed = anyio.Event()

        async def hold(name: str, uri: str, *, task_status: TaskStatus[EchoProtocol]) -> None:
            async with EchoProtocol.client(
                uri, name=name, echo_timeout=echo_timeout, **endpoint_options
            ) as rig:
                task_status.started(rig)
                await closed.wait()

        async def open_one(name: str, uri: str) -> None:
            endpoints[name] = await tg.start(hold, name, uri)

        with collapse_single():
            async with anyio.create_task_group() as tg:
                async with anyio.create_task_group() as opener:
                    for name, uri in rigs.items():
                        opener.start_soon(open_one, name, uri)
                services = cls({name: endpoints[name] for name in rigs}, timeout=timeout)
                services._closed = closed
                try:
                    yield services
                finally:
                    await services.aclose()

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
        raise TypeError("Services is immutable: build a new Services to change the rigs")

    __setitem__ = __delitem__ = pop = popitem = clear = update = setdefault = _immutable

    # -------------------------------------------------------------- lifecycle

    @property
    def is_connected(self) -> bool:
        """True if there is at least one rig and every rig is connected."""
        return bool(self._rigs) and all(rig.is_connected for rig in self._rigs.values())

    async def aclose(self) -> None:
        """Close every rig's endpoint. Idempotent.

        Cancellation: every endpoint is marked closed before the first wait.
        """
        self._closed.set()
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
            ServicesError: a rig failed (see :class:`ServicesError`).

        Cancellation (this and every signal method): every rig's work is cancelled
        at once; nothing stays registered on the endpoints, which stay usable. A
        rig may already have received the signal; its late echo is ignored and its
        late completion update is an ordinary message.
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

        await self._for_each(ExpMessage.ALYX, send)

    async def await_all(self, event: EventLike) -> dict[str, Any]:
        """Wait for every rig to send ``event``; return rig name -> message data.

        Bounded by :attr:`timeout` per rig.

        Raises:
            ServicesError: some rigs did not send it in time.

        Cancellation: every rig's wait is unregistered.
        """
        value = ExpMessage.validate(event, allow_bitwise=False)
        codes = event_codes(value)

        async def wait(name: str, rig: EchoProtocol) -> Any:
            replies = rig._collect(codes)
            try:
                return await self._completion(name, value, replies)
            finally:
                rig._uncollect(replies, codes)

        return await self._for_each(value, wait)

    async def _for_each(
        self, event: ExpMessage, work: Callable[[str, EchoProtocol], Awaitable[Any]]
    ) -> dict[str, Any]:
        """Run ``work(name, rig)`` for every rig concurrently; collect results and failures."""
        responses: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}

        async def one(name: str, rig: EchoProtocol) -> None:
            try:
                responses[name] = await work(name, rig)
            except (RignetError, OSError) as exc:
                failures[name] = exc

        async with anyio.create_task_group() as tg:
            for name, rig in self._rigs.items():
                tg.start_soon(one, name, rig)
        return self._result(event, responses, failures)

    async def _signal(
        self, event: ExpMessage, payload: bytes, concurrent: bool, reverse: bool = False
    ) -> dict[str, Any]:
        rigs = list(self._rigs.items())
        if reverse:
            rigs.reverse()
        for _, rig in rigs:
            # A plain ValueError before anything is sent (in either mode), not
            # a task group's exception group after some rigs were signalled.
            rig._check_size(payload)
        responses: dict[str, Any] = {}
        failures: dict[str, BaseException] = {}
        codes = (int(event), 0)

        async def one(
            name: str,
            rig: EchoProtocol,
            my_turn: anyio.Event | None = None,
            next_turn: anyio.Event | None = None,
        ) -> None:
            try:
                # Registered before the signal goes out: an instant reply is not missed.
                replies = rig._collect(codes)
                try:
                    if my_turn is not None:
                        await my_turn.wait()
                    await rig._confirmed_send(
                        payload,
                        rig._peer,
                        rig.default_echo_timeout,
                        None if next_turn is None else next_turn.set,
                    )
                    responses[name] = await self._completion(name, event, replies)
                finally:
                    rig._uncollect(replies, codes)
            except (RignetError, OSError) as exc:
                failures[name] = exc
            finally:
                if next_turn is not None:
                    next_turn.set()

        if concurrent:
            # One task per rig; each sends as soon as the previous rig's signal
            # is out, so rigs are addressed in order, then all wait together.
            async with anyio.create_task_group() as tg:
                turn: anyio.Event | None = None
                for name, rig in rigs:
                    next_turn = anyio.Event()
                    tg.start_soon(one, name, rig, turn, next_turn)
                    turn = next_turn
        else:
            for name, rig in rigs:
                await one(name, rig)
        return self._result(event, responses, failures)

    async def _completion(self, name: str, event: ExpMessage, replies: Collector) -> Any:
        """The data of the rig's completion update; a bare cancel scope bounds the wait."""
        timeout = self.timeout or None
        deadline = math.inf if timeout is None else anyio.current_time() + timeout
        with anyio.CancelScope(deadline=deadline) as scope:
            while True:
                msg = await replies.get()
                if msg.event:
                    return msg.data
                text, code = msg.data
                if code == event:
                    raise RemoteError(msg.addr, text, event)
        assert scope.cancelled_caught
        assert timeout is not None
        raise CompletionTimeout(name, event, timeout)

    def _result(
        self, event: ExpMessage, responses: dict[str, Any], failures: dict[str, BaseException]
    ) -> dict[str, Any]:
        ordered = {name: responses[name] for name in self._rigs if name in responses}
        if failures:
            raise ServicesError(event, ordered, failures)
        return ordered
