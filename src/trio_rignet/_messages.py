"""Protocol messages: event codes, encoding, builders and the parser.

Pure code: no sockets, no event loop. Every builder returns exactly the bytes
iblutil 1.20.0 sends for the same call, so peers running either library see the
same wire format.
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Any, Protocol

from ._errors import MessageError

__all__ = [
    "LISTEN_PORT",
    "PROTOCOL_VERSION",
    "AlyxLike",
    "ExpMessage",
    "ExpStatus",
    "Message",
    "decode",
    "encode",
    "format_exp_ref",
    "parse_message",
]

PROTOCOL_VERSION = "1.0.0"
"""Version of the event and status enumerations (same as iblutil 1.20.0)."""

LISTEN_PORT = 11001
"""Default port of a rig service."""

Address = tuple[str, int]


class ExpMessage(IntFlag):
    """Experiment event codes, with the values of iblutil 1.20.0.

    Members are single bits, so events combine with ``|`` to listen for several
    at once. ``ExpMessage(0)`` is the code of an error report.
    """

    EXPINIT = 1
    """Experiment is initialising."""
    EXPSTART = 2
    """Experiment has begun."""
    EXPEND = 4
    """Experiment has stopped."""
    EXPCLEANUP = 8
    """Experiment clean-up has begun."""
    EXPINTERRUPT = 16
    """Experiment interrupted."""
    EXPSTATUS = 32
    """Experiment status."""
    EXPINFO = 64
    """Experiment information, including task protocol start and end."""
    ALYX = 128
    """Alyx token."""

    @classmethod
    def any(cls) -> ExpMessage:
        """Return the combination of every event (excluding the error code 0)."""
        return cls(_ALL_BITS)

    @staticmethod
    def validate(event: str | int | ExpMessage, allow_bitwise: bool = True) -> ExpMessage:
        """Return the event for a name, an integer code or a member.

        Names are case- and whitespace-insensitive, the ``EXP`` prefix may be
        left out (``"start"`` is ``EXPSTART``), and ``"stop"`` means ``EXPEND``.

        Args:
            event: the event as a name, an int or an :class:`ExpMessage`.
            allow_bitwise: if false, a combination of events is rejected.

        Raises:
            TypeError: ``event`` is not a str, int or ExpMessage.
            ValueError: no such event, or a combination when ``allow_bitwise``
                is false.

        >>> ExpMessage.validate(" expstart ")
        <ExpMessage.EXPSTART: 2>
        >>> ExpMessage.validate(4)
        <ExpMessage.EXPEND: 4>
        """
        if isinstance(event, ExpMessage):
            value = event
        elif isinstance(event, str):
            key = event.strip().upper()
            member = _BY_NAME.get(key) or _BY_NAME.get("EXP" + key)
            if member is None:
                raise ValueError(
                    f"Unrecognized event {event!r}. Choices: {tuple(ExpMessage.__members__)}"
                )
            value = member
        elif isinstance(event, int) and not isinstance(event, bool):
            if event < 0 or event & ~_ALL_BITS:
                raise ValueError(
                    f"Unrecognized event code {event}. Choices: "
                    f"{tuple(int(m) for m in _MEMBERS)}, or a combination of them"
                )
            value = ExpMessage(event)
        else:
            raise TypeError(
                f"event must be an ExpMessage, an int code or a name, not {type(event).__name__}"
            )
        if not allow_bitwise and value not in _SINGLE:
            raise ValueError(
                f"Compound (bitwise) events not permitted, got {value!r}. "
                f"Choices: {tuple(m.name for m in _MEMBERS)}"
            )
        return value


_MEMBERS: tuple[ExpMessage, ...] = tuple(ExpMessage.__members__.values())
_ALL_BITS = 0
for _m in _MEMBERS:
    _ALL_BITS |= int(_m)
_SINGLE = frozenset(int(m) for m in _MEMBERS)
_BY_NAME: dict[str, ExpMessage] = {**ExpMessage.__members__, "STOP": ExpMessage.EXPEND}
_BY_CODE: dict[int, ExpMessage] = {int(m): m for m in _MEMBERS}
_ERROR = ExpMessage(0)


def event_bits(event: ExpMessage) -> Iterator[ExpMessage]:
    """Yield the single events that make up ``event`` (none for code 0)."""
    value = int(event)
    for member in _MEMBERS:
        if value & member:
            yield member


class ExpStatus(IntEnum):
    """Experiment status codes, with the values of iblutil 1.20.0."""

    CONNECTED = 0
    """Service is connected."""
    INITIALIZED = 10
    """Service is initialised."""
    RUNNING = 20
    """Service is running."""
    STOPPED = 30
    """Experiment has stopped."""

    @staticmethod
    def validate(status: str | int | ExpStatus) -> ExpStatus:
        """Return the status for a member, an integer or a (case-insensitive) name.

        Raises:
            TypeError: ``status`` is not a str, int or ExpStatus.
            ValueError: no such status.
        """
        if isinstance(status, ExpStatus):
            return status
        choices = ", ".join(f"{s.name}={s.value}" for s in ExpStatus)
        if isinstance(status, str):
            try:
                return ExpStatus[status.strip().upper()]
            except KeyError:
                raise ValueError(f"Unrecognized status {status!r}. Choices: {choices}") from None
        if isinstance(status, int) and not isinstance(status, bool):
            try:
                return ExpStatus(status)
            except ValueError:
                raise ValueError(f"Unrecognized status {status}. Choices: {choices}") from None
        raise TypeError(
            f"status must be an ExpStatus, an int or a name, not {type(status).__name__}"
        )


def encode(obj: Any) -> bytes:
    """Serialise ``obj`` as iblutil does.

    ``bytes`` (and ``bytearray``) pass through, ``str`` is UTF-8 encoded as is,
    anything else is ``json.dumps`` with default separators, then UTF-8.
    """
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, bytearray):
        return bytes(obj)
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return text.encode()


def decode(data: bytes) -> Any:
    """Deserialise bytes as JSON; bytes that are not JSON are returned as text.

    Like iblutil's ``decode`` but without its warning. Use
    :func:`parse_message` to check that bytes are a valid message.
    """
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return data.decode(errors="replace")


def format_exp_ref(exp_ref: str | Mapping[str, Any] | None) -> str | None:
    """Return an experiment reference in its wire form ``"{date}_{sequence}_{subject}"``.

    ``exp_ref`` may be a string (sent as is), a mapping with the keys
    ``date``, ``sequence`` and ``subject``, or empty/``None`` (sent as null).

    Raises:
        ValueError: a mapping lacks a key or its sequence is not an integer.
        TypeError: ``exp_ref`` is neither a string nor a mapping.
    """
    if not exp_ref:
        return None
    if isinstance(exp_ref, str):
        return exp_ref
    if isinstance(exp_ref, Mapping):
        try:
            date, sequence, subject = exp_ref["date"], exp_ref["sequence"], exp_ref["subject"]
        except KeyError as exc:
            raise ValueError(
                f"exp_ref dict needs the keys 'date', 'sequence' and 'subject'; missing {exc}"
            ) from None
        try:
            seq = int(sequence)
        except (TypeError, ValueError):
            raise ValueError(f"exp_ref sequence must be an integer, got {sequence!r}") from None
        return f"{date}_{seq}_{subject}"
    raise TypeError(
        "exp_ref must be a string like '2022-01-01_1_subject' or a dict with "
        f"date, sequence and subject, not {type(exp_ref).__name__}"
    )


class AlyxLike(Protocol):
    """What trio-rignet reads from an Alyx client (``one.webclient.AlyxClient``)."""

    @property
    def base_url(self) -> str: ...  # pragma: no cover

    @property
    def user(self) -> str: ...  # pragma: no cover

    @property
    def is_logged_in(self) -> bool: ...  # pragma: no cover

    _token: Any


StatusLike = str | int | ExpStatus


# Builders: each returns exactly the bytes iblutil 1.20.0 sends.


def build_init(data: Any = None) -> bytes:
    """``[1, data]``: initialise an experiment."""
    return encode([ExpMessage.EXPINIT, data])


def build_start(exp_ref: str | Mapping[str, Any] | None, data: Any = None) -> bytes:
    """``[2, exp_ref, data]``: start an experiment."""
    return encode([ExpMessage.EXPSTART, format_exp_ref(exp_ref), data])


def build_stop(data: Any = None, immediately: bool = False) -> bytes:
    """``[4, data]`` (or ``[16, data]`` if ``immediately``): stop an experiment."""
    return encode([ExpMessage.EXPINTERRUPT if immediately else ExpMessage.EXPEND, data])


def build_cleanup(data: Any = None) -> bytes:
    """``[8, data]``: clean up after an experiment."""
    return encode([ExpMessage.EXPCLEANUP, data])


def build_status(status: StatusLike) -> bytes:
    """``[32, status]``: report experiment status."""
    return encode([ExpMessage.EXPSTATUS, ExpStatus.validate(status)])


def build_info(status: StatusLike, data: Any = None) -> bytes:
    """``[64, status, data]``: report experiment status and details."""
    return encode([ExpMessage.EXPINFO, ExpStatus.validate(status), data])


def build_alyx(alyx: AlyxLike | None = None) -> bytes:
    """``[128, base_url, {user: token}]``; a request for a token if not logged in.

    A request is ``[128, base_url_or_null, {}]``.
    """
    base_url = alyx.base_url if alyx else None
    token = {alyx.user: alyx._token} if alyx and alyx.is_logged_in else {}
    return encode([ExpMessage.ALYX, base_url, token])


def build_error(exc: BaseException | str, event: int) -> bytes:
    """``[0, "Type: text", event]``: report that handling ``event`` failed."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return encode([_ERROR, text, int(event)])


def build_event(event: ExpMessage, *data: Any) -> bytes:
    """``[event, *data]``: a message for a single event with arbitrary data."""
    return encode([event, *data])


@dataclass(frozen=True, slots=True)
class Message:
    """A message received from a peer.

    Attributes:
        event: the event code (``ExpMessage(0)`` for an error report).
        data: the elements after the event code, as iblutil passes them to
            callbacks: ``[data]`` for init, ``[exp_ref, data]`` for start,
            ``[status, data]`` for info, ``[text, event]`` for an error report.
        addr: ``(host, port)`` of the peer that sent it, when known (an IPv4
            peer of a dual-stack socket is given by its IPv4 address).
        tag: ``(session, seq, ref)`` if a trio-rignet peer sent it: the
            sender's session number, the message's sequence number, and the
            sequence number of the message it answers (or None). None for a
            message from an iblutil peer. See the protocol page of the docs.
    """

    event: ExpMessage
    data: list[Any]
    addr: Address | None = field(default=None, compare=True)
    tag: tuple[int, int, int | None] | None = field(default=None, compare=False, repr=False)

    @property
    def is_error(self) -> bool:
        """True for an error report (event code 0)."""
        return not self.event


# What json.loads calls (typeshed has the decoder argument's type wrong).
_scan_once = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]


def loads(text: str) -> Any:
    """``json.loads(text)``, without its Python-level wrappers when ``text`` is one
    value from its first character to its last (how messages arrive)."""
    try:
        obj, end = _scan_once(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace, or invalid: json's own errors
    if end != len(text):
        return json.loads(text)  # trailing whitespace, or extra data
    return obj


def parse_message(
    raw: bytes, addr: Address | None = None, tag: tuple[int, int, int | None] | None = None
) -> Message:
    """Parse the bytes of one message (``addr`` and ``tag`` are stored in it).

    Raises:
        MessageError: the bytes are not UTF-8 JSON, not a non-empty list, the
            event code is not a known single event (or 0), or an error report is
            not ``[0, str, event]``.
    """
    try:
        obj = loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"not a UTF-8 JSON message ({exc})") from None
    if type(obj) is not list:
        raise MessageError(f"a message must be a JSON array, got {type(obj).__name__}")
    if not obj:
        raise MessageError("a message must start with an event code, got an empty array")
    code = obj[0]
    event = _BY_CODE.get(code) if type(code) is int else None
    if event is None:
        if type(code) is int and code == 0:
            if len(obj) != 3 or not isinstance(obj[1], str) or type(obj[2]) is not int:
                raise MessageError(
                    f"an error report must be [0, 'Type: text', event_code], got {obj!r:.200}"
                )
            return Message(_ERROR, obj[1:], addr, tag)
        raise MessageError(
            f"unknown or compound event code {code!r}; expected 0 or one of {tuple(_BY_CODE)}"
        )
    return Message(event, obj[1:], addr, tag)
