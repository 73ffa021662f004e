"""Creating sockets the same way on every backend and platform.

Servers bind with exclusive address use on Windows (``SO_EXCLUSIVEADDRUSE``,
as Trio does: ``SO_REUSEADDR`` there would let a second process bind the same
port) and with ``SO_REUSEADDR`` for TCP elsewhere (rebinding a port in
TIME_WAIT). An IPv6 socket bound to ``::`` is dual-stack where the system
allows it; IPv4 peers then appear as ``::ffff:a.b.c.d`` and are sent to in
that form.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from .._errors import PeerUnavailable

__all__ = [
    "DRAIN",
    "IDLE_WAKES",
    "UNREACHABLE",
    "bind_tcp_listener",
    "bind_udp",
    "connect_udp",
    "family_of",
    "ip_addr",
    "is_unreachable",
    "large_receive_buffer",
    "tcp_client_socket",
    "udp_error",
    "wire_address",
]

Address = tuple[str, int]

UNREACHABLE = "nothing is listening there (port unreachable)"

DRAIN = 256
"""Datagrams a UDP endpoint handles per wake-up before other tasks get a turn."""
IDLE_WAKES = 3
"""Wake-ups that read one datagram and do not look for a second, after a
wake-up found just one: looking costs a failed receive (an exception) each
time, which at signal rates is most of the time."""


def family_of(host: str) -> socket.AddressFamily:
    """``AF_INET6`` for an IPv6 address, else ``AF_INET``."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def ip_addr(sockaddr: Any) -> Address:
    """``(host, port)`` of an IPv4 or IPv6 socket address."""
    return (str(sockaddr[0]), int(sockaddr[1]))


def wire_address(family: int, addr: Address) -> Address:
    """``addr`` in the form a socket of ``family`` sends to.

    An IPv4 address given to an IPv6 (dual-stack) socket is written as an
    IPv4-mapped IPv6 address.
    """
    if family == socket.AF_INET6 and ":" not in addr[0]:
        return ("::ffff:" + addr[0], addr[1])
    return addr


def is_unreachable(exc: BaseException) -> bool:
    """True for the errors that report an ICMP port unreachable on a UDP socket.

    Linux and macOS raise ``ConnectionRefusedError`` on a connected socket;
    Windows raises ``ConnectionResetError`` (WSAECONNRESET).
    """
    return isinstance(exc, (ConnectionRefusedError, ConnectionResetError))


def udp_error(addr: Address, exc: OSError, size: int) -> Exception:
    """The exception a caller gets for a failed datagram send."""
    if is_unreachable(exc):
        return PeerUnavailable(addr, UNREACHABLE)
    if exc.errno == errno.EMSGSIZE:
        return ValueError(
            f"a message of {size} bytes is too large for UDP; use a ws:// (TCP) URI "
            "for large messages"
        )
    return PeerUnavailable(addr, f"send failed: {exc}")


def _exclusive(sock: socket.socket, stream: bool) -> None:
    if sys.platform == "win32":  # pragma: no cover - Windows only
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)  # type: ignore[attr-defined]
    elif stream:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


UDP_BUFFER = 1 << 20
"""Receive buffer asked for on UDP sockets: room for a burst while the loop is busy."""


def large_receive_buffer(sock: Any) -> None:
    """Ask for :data:`UDP_BUFFER` bytes of receive buffer (the system may grant less)."""
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < UDP_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_BUFFER)
    except OSError:  # pragma: no cover - a platform without the option
        pass


def bind_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to ``(host, port)``."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        large_receive_buffer(sock)
        _exclusive(sock, stream=False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_udp(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket connected to ``(host, port)`` (nothing is sent)."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        large_receive_buffer(sock)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_tcp_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A non-blocking TCP socket listening on ``(host, port)``."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        _exclusive(sock, stream=True)
        sock.bind((host, port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_client_socket(host: str) -> socket.socket:
    """A non-blocking TCP socket for connecting to ``host``, with Nagle off."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock
