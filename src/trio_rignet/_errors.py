"""Every exception trio-rignet raises on purpose.

Each one subclasses the standard exception a caller would already catch
(``ValueError``, ``TimeoutError``, ``ConnectionError``, ...) as well as
:class:`RignetError`, so ``except RignetError`` catches everything the library
raises deliberately.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CompletionTimeout",
    "EchoTimeout",
    "EndpointClosed",
    "FramingError",
    "MessageError",
    "PeerNotAllowed",
    "PeerUnavailable",
    "RemoteError",
    "RignetError",
]


class RignetError(Exception):
    """Base class of every exception raised on purpose by trio-rignet."""


class MessageError(RignetError, ValueError):
    """Bytes received from the network are not a valid protocol message.

    Raised by :func:`~trio_rignet.parse_message`; endpoints log and drop such
    input instead of raising.
    """


class FramingError(RignetError, ValueError):
    """A TCP byte stream cannot be split into messages.

    Raised by :class:`~trio_rignet.StreamDecoder` when a byte cannot start a
    message, brackets do not match, a message exceeds the size limit, or the
    stream ends inside a message.
    """


class EchoTimeout(RignetError, TimeoutError):
    """A peer did not echo a confirmed message within the timeout.

    The endpoint stays open and usable (iblutil closes it).

    Attributes:
        endpoint: name of the endpoint that sent the message.
        peer: ``(host, port)`` the message was sent to.
        timeout: seconds waited.
    """

    def __init__(
        self, endpoint: str, peer: tuple[str, int], timeout: float, reason: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.timeout = timeout
        why = reason or "the peer may be down or the message lost"
        super().__init__(
            f"{endpoint}: no echo from {_fmt_addr(peer)} within {timeout:g} s; {why} "
            "(the endpoint is still open; retry, or pass a longer timeout)"
        )


class CompletionTimeout(RignetError, TimeoutError):
    """A rig confirmed a signal but sent no completion update in time.

    Attributes:
        rig: the rig's name.
        event: the event whose completion was awaited.
        timeout: seconds waited.
    """

    def __init__(self, rig: str, event: Any, timeout: float) -> None:
        self.rig = rig
        self.event = event
        self.timeout = timeout
        super().__init__(
            f"{rig}: confirmed {_event_name(event)} but sent no completion update within "
            f"{timeout:g} s (pass a longer Services timeout if the rig needs more time)"
        )


class PeerUnavailable(RignetError, ConnectionError):
    """The peer cannot be reached: nothing listens there, or it disconnected.

    Pending confirmed sends to that peer fail with this at once instead of
    waiting for their timeout.

    Attributes:
        peer: ``(host, port)`` of the peer.
    """

    def __init__(self, peer: tuple[str, int], reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(f"{_fmt_addr(peer)}: {reason}")


class EndpointClosed(RignetError, ConnectionError):
    """The endpoint was closed: pending sends and waits end with this."""


class PeerNotAllowed(RignetError, PermissionError):
    """The endpoint refuses to send to this peer (e.g. an Alyx token to a stranger).

    Attributes:
        peer: ``(host, port)`` of the peer.
    """

    def __init__(self, peer: tuple[str, int], reason: str) -> None:
        self.peer = peer
        super().__init__(f"{_fmt_addr(peer)}: {reason}")


class RemoteError(RignetError, RuntimeError):
    """A peer reported that handling one of our signals failed.

    This is the error report ``[0, "Type: text", event]`` of the wire protocol.

    Attributes:
        peer: ``(host, port)`` that reported the error.
        text: the remote error text, e.g. ``"ValueError: bad data"``.
        event: the event code whose handling failed.
    """

    def __init__(self, peer: tuple[str, int] | None, text: str, event: Any) -> None:
        self.peer = peer
        self.text = text
        self.event = event
        where = _fmt_addr(peer) if peer else "peer"
        super().__init__(f"{where} failed to handle {_event_name(event)}: {text}")


def _fmt_addr(addr: tuple[str, int]) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _event_name(event: Any) -> str:
    name = getattr(event, "name", None)
    return str(name) if name else repr(event)
