"""``iblutil.io.net.base`` 1.20.0 on trio-rignet: replace ``from iblutil.io.net import base``
with ``from trio_rignet.compat.iblutil import base``.

The enumerations, :class:`Service` and :class:`Communicator` are iblutil's own
code (adapted from iblutil 1.20.0, MIT License, International Brain Laboratory),
so they behave as iblutil's do, quirks included: :meth:`ExpMessage.validate`
takes full member names only (``"EXPSTART"``, any case) and integers (a
combination of events with ``allow_bitwise=True``), iterating a compound event
yields ``int`` bits, and ``ExpMessage.__version__`` is the protocol version.
The address helpers are trio-rignet's (the same results as iblutil's, except
that ``validate_uri`` accepts port 0, writes IPv6 hosts in brackets and rejects
unknown schemes). See the "Change one import" page of the docs for every
difference.

:class:`ExpMessage` and :class:`ExpStatus` are not the same classes as
:class:`trio_rignet.ExpMessage` and :class:`trio_rignet.ExpStatus`; their
members are equal as integers (``base.ExpMessage.EXPINIT == 1``), so either
may be passed where trio-rignet takes an event or a status.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import urllib.request
import warnings
from abc import ABC, abstractmethod
from asyncio import isfuture
from collections.abc import Callable, Iterator
from enum import IntEnum, IntFlag, auto
from functools import reduce
from operator import or_
from typing import Any, cast
from urllib.parse import urlparse

from ..._messages import LISTEN_PORT, PROTOCOL_VERSION
from ..._uri import hostname2ip, is_valid_ip, validate_uri

__all__ = [
    "LISTEN_PORT",
    "PROTOCOL_VERSION",
    "Communicator",
    "ExpMessage",
    "ExpStatus",
    "Service",
    "external_ip",
    "hostname2ip",
    "is_success",
    "is_valid_ip",
    "validate_uri",
]


def is_success(future: asyncio.Future[Any]) -> bool:
    """Check if future successfully resolved."""
    return future.done() and not future.cancelled() and future.exception() is None


def external_ip() -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Fetch this computer's WAN IP address from https://ident.me (needs the internet).

    Returns:
        The computer's default WAN IP address.
    """
    with urllib.request.urlopen("https://ident.me") as response:
        return ipaddress.ip_address(response.read().decode("utf8"))


class ExpMessage(IntFlag):
    """A set of standard experiment messages for communicating between rigs.

    The same class as iblutil's: EXPINIT=1, EXPSTART=2, EXPEND=4, EXPCLEANUP=8,
    EXPINTERRUPT=16, EXPSTATUS=32, EXPINFO=64, ALYX=128; ``ExpMessage(0)`` is
    the code of an error report.
    """

    EXPINIT = auto()
    """Experiment is initializing."""
    EXPSTART = auto()
    """Experiment has begun."""
    EXPEND = auto()
    """Experiment has stopped."""
    EXPCLEANUP = auto()
    """Experiment cleanup begun."""
    EXPINTERRUPT = auto()
    """Experiment interrupted."""
    EXPSTATUS = auto()
    """Experiment status."""
    EXPINFO = auto()
    """Experiment info, including task protocol start and end."""
    ALYX = auto()
    """Alyx token."""
    __version__ = PROTOCOL_VERSION

    @classmethod
    def any(cls) -> ExpMessage:
        """Return enumeration comprising all possible messages.

        NB: This doesn't include the null ExpMessage (0), used to indicate API errors.
        """
        return reduce(or_, cls)

    @staticmethod
    def validate(event: Any, allow_bitwise: bool = True) -> ExpMessage:
        """Return the event for a member, an integer or a member name.

        Args:
            event: an ``ExpMessage``, an int, or a member name such as
                ``"expstart"`` (case and surrounding whitespace ignored).
            allow_bitwise: if false, raise if ``event`` combines several events.

        Raises:
            TypeError: ``event`` is neither a string, an integer nor an ExpMessage.
            ValueError: no member has that name, or ``allow_bitwise`` is false
                and ``event`` is not a single event.

        >>> ExpMessage.validate('expstart')
        <ExpMessage.EXPSTART: 2>
        """
        if not isinstance(event, ExpMessage):
            try:
                if isinstance(event, str):
                    event = ExpMessage[event.strip().upper()]
                elif isinstance(event, int):
                    event = ExpMessage(event)
                else:
                    raise TypeError(f"Unknown event type {type(event)}")
            except KeyError:
                raise ValueError(
                    f'Unrecognized event "{event}". Choices: {tuple(ExpMessage.__members__.keys())}'
                ) from None
        if not allow_bitwise and event not in list(ExpMessage):
            raise ValueError(
                f"Compound (bitwise) events not permitted. Choices: {tuple(ExpMessage)}"
            )
        return cast(ExpMessage, event)

    def __iter__(self) -> Iterator[int]:
        """Iterate over the individual bits of the event, as ints (iblutil's back-port)."""
        num = self.value
        while num:
            b = num & (~num + 1)
            yield b
            num ^= b


class ExpStatus(IntEnum):
    """A set of standard statuses for communicating between rigs.

    CONNECTED=0, INITIALIZED=10, RUNNING=20, STOPPED=30, as in iblutil.
    """

    CONNECTED = 0
    """Service is connected."""
    INITIALIZED = 10
    """Service is initialized."""
    RUNNING = 20
    """Service is running."""
    STOPPED = 30
    """Experiment has stopped."""
    __version__ = PROTOCOL_VERSION


class Service(ABC):
    """An abstract base class for auxiliary experiment services.

    Each method returns the message it stands for as a tuple, the event first;
    subclasses serialise it and send it.
    """

    __version__ = PROTOCOL_VERSION
    __slots__ = "name"

    @abstractmethod
    def init(self, data: Any = None) -> Any:
        """Return ``(ExpMessage.EXPINIT, data)``: initialise an experiment."""
        return ExpMessage.EXPINIT, data

    @abstractmethod
    def start(self, exp_ref: Any, data: Any = None) -> Any:
        """Return ``(ExpMessage.EXPSTART, exp_ref, data)``: start an experiment.

        ``exp_ref`` is ``"yyyy-mm-dd_n_subject"``, or a dict with ``date``,
        ``sequence`` and ``subject`` (joined as ``"{date}_{sequence}_{subject}"``).
        """
        exp_ref = exp_ref or None
        if isinstance(exp_ref, dict):
            exp_ref = "_".join(
                map(str, (exp_ref["date"], int(exp_ref["sequence"]), exp_ref["subject"]))
            )
        return ExpMessage.EXPSTART, exp_ref, data

    @abstractmethod
    def stop(self, data: Any = None, immediately: bool = False) -> Any:
        """Return ``(ExpMessage.EXPEND, data)`` (EXPINTERRUPT if ``immediately``)."""
        return ExpMessage.EXPINTERRUPT if immediately else ExpMessage.EXPEND, data

    @abstractmethod
    def status(self, status: Any) -> Any:
        """Return ``(ExpMessage.EXPSTATUS, status)`` with the validated status.

        ``status`` is an :class:`ExpStatus`, an int or a member name (exact case).
        """
        if not isinstance(status, ExpStatus):
            status = ExpStatus(status) if isinstance(status, int) else ExpStatus[status]
        return ExpMessage.EXPSTATUS, status

    @abstractmethod
    def info(self, status: Any, data: Any = None) -> Any:
        """Return ``(ExpMessage.EXPINFO, status, data)`` with the validated status."""
        return ExpMessage.EXPINFO, Service.status(self, status)[1], data

    @abstractmethod
    def cleanup(self, data: Any = None) -> Any:
        """Return ``(ExpMessage.EXPCLEANUP, data)``: clean up an experiment."""
        return ExpMessage.EXPCLEANUP, data

    @abstractmethod
    def alyx(self, alyx: Any) -> Any:
        """Return ``(ExpMessage.ALYX, base_url, {user: token})``.

        The token is ``{}`` (a request for one) unless ``alyx`` is logged in.
        """
        base_url = alyx.base_url if alyx else None
        token = {alyx.user: alyx._token} if alyx and alyx.is_logged_in else {}
        return ExpMessage.ALYX, base_url, token


Callback = Callable[..., Any]


class Communicator(Service):
    """A base class for communicating between experimental rigs.

    It keeps the callbacks and futures assigned to each event; the
    :class:`~trio_rignet.compat.iblutil.app.EchoProtocol` subclass delivers
    received messages to them.

    Attributes:
        name: an arbitrary label for the remote host.
        server_uri: the full URI of the remote device, e.g. ``udp://192.168.0.1:1001``.
        logger: where this communicator logs.
    """

    __slots__ = ("_callbacks", "logger", "name", "server_uri")

    def __init__(
        self, server_uri: Any, name: str | None = None, logger: logging.Logger | None = None
    ) -> None:
        self.server_uri: str = validate_uri(server_uri)
        self.name: str = name or server_uri
        self.logger: logging.Logger = logger or logging.getLogger(self.name)
        # ExpMessage -> [(callback or future, pass the event too)], with 0 for error reports.
        self._callbacks: dict[Any, list[tuple[Any, bool]]] = {
            item: [] for item in (ExpMessage(0), *ExpMessage.__members__.values())
        }

    def assign_callback(self, event: Any, callback: Callback | asyncio.Future[Any]) -> None:
        """Call ``callback(data, addr)`` (or resolve a future with ``(data, addr)``) on ``event``.

        For a combination of events (``ExpMessage.EXPEND | ExpMessage.EXPINTERRUPT``)
        the callback gets ``(data, addr, event)``. A callback is called for every
        message of the event; a future is resolved once, then removed.

        Raises:
            TypeError: ``callback`` is neither callable nor a future.
            ValueError: unknown event.
        """
        event = ExpMessage.validate(event)
        if not (callable(callback) or isfuture(callback)):
            raise TypeError("Callback must be callable or a Future")
        if event is ExpMessage(0):
            self._callbacks.setdefault(event, []).append((callback, False))
        else:
            return_event = event not in ExpMessage
            for e in event:  # iterate over enum as bitwise ops permitted
                self._callbacks.setdefault(e, []).append((callback, return_event))

    def clear_callbacks(self, event: Any, callback: Any = None, cancel_futures: bool = True) -> int:
        """Remove ``callback`` (or every callback) for ``event``; return how many were removed.

        Futures removed are cancelled unless ``cancel_futures`` is false.
        """
        i = 0
        event = ExpMessage.validate(event)
        if callback:  # clear specific callback
            # Wrapped callables have an id attribute containing the hash of the inner function
            for evt in event:  # iterate as bitwise enums permitted, e.g. ~ExpMessage.ALYX
                ids = [getattr(cb, "id", None) or hash(cb) for cb, _ in self._callbacks[evt]]
                cb_id = getattr(callback, "id", None) or hash(callback)
                while True:
                    try:
                        idx = ids.index(cb_id)
                        if cancel_futures and isfuture(cb := self._callbacks[evt][idx][0]):
                            cb.cancel()
                        del self._callbacks[evt][idx]
                        del ids[idx]
                        i += 1
                    except (IndexError, ValueError):
                        break
        else:  # clear all callbacks for event
            for evt in event:
                if cancel_futures:
                    for cb in filter(isfuture, (x[0] for x in self._callbacks[evt])):
                        cb.cancel()
                i += len(self._callbacks[evt])
                del self._callbacks[evt][:]
        self.logger.debug("[%s] %i callbacks cleared", self.name, i)
        return i

    async def on_event(self, event: Any) -> Any:
        """Wait for the next message of ``event``; return ``(data, addr)``.

        For a combination of events, ``(data, addr, event)``::

            data, addr = await com.on_event("EXPSTART")
            data, addr, event = await com.on_event(ExpMessage.EXPEND | ExpMessage.EXPINTERRUPT)

        Raises:
            asyncio.CancelledError: the communicator was closed meanwhile.
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.assign_callback(event, fut)
        try:
            return await fut
        finally:
            if fut.cancelled():  # awaiting task cancelled: do not leave the future registered
                self._forget(event, fut)

    def _forget(self, event: Any, fut: Any) -> list[int]:
        """Remove ``fut`` from the events of ``event``; return the events it was waiting for."""
        event = ExpMessage.validate(event)
        removed = []
        for evt in list(event) if event else [0]:
            callbacks = self._callbacks.get(evt, [])
            kept = [x for x in callbacks if x[0] is not fut]
            if len(kept) != len(callbacks):
                self._callbacks[evt] = kept
                removed.append(int(evt))
        return removed

    @property
    def port(self) -> int:
        """The remote port (a client's) or the local one (a server's)."""
        return int(urlparse(self.server_uri).port)  # type: ignore[arg-type]

    @property
    def hostname(self) -> str:
        """The remote hostname or IP address (a client's) or the local one (a server's)."""
        return urlparse(self.server_uri).hostname  # type: ignore[return-value]

    @property
    def protocol(self) -> str:
        """The protocol scheme, e.g. ``"udp"``, ``"ws"``."""
        return urlparse(self.server_uri).scheme

    @property
    @abstractmethod
    def is_connected(self) -> bool:
        """True if the remote device is connected."""

    @abstractmethod
    def send(self, data: Any, addr: Any = None) -> None:
        """Serialize and pass data to the transport layer."""

    @staticmethod
    def encode(data: Any) -> bytes:
        """Serialize data for transmission.

        bytes pass through, str is encoded as UTF-8, anything else is JSON.
        """
        if isinstance(data, bytes):
            return data
        if not isinstance(data, str):
            data = json.dumps(data)
        return data.encode()  # type: ignore[no-any-return]

    @staticmethod
    def decode(data: bytes) -> Any:
        """De-serialize bytes as JSON; other bytes come back as text (with a warning)."""
        try:
            return json.loads(data)
        except json.JSONDecodeError:
            warnings.warn("Failed to decode as JSON", stacklevel=2)
            return data.decode()

    def close(self) -> None:
        """De-register all callbacks and cancel futures."""
        for event in self._callbacks:
            for fut in filter(isfuture, (x[0] for x in self._callbacks[event])):
                fut.cancel("Close called on communicator")
            del self._callbacks[event][:]
