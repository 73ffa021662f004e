"""URI validation and address helpers, compatible with iblutil 1.20.0.

``validate_uri`` returns the same string as iblutil's for every input iblutil
handles, with three differences: port 0 is accepted (bind any free port), IPv6
addresses are written and parsed with brackets (``udp://[::1]:11001``), and a
scheme other than ``udp``, ``ws``, ``wss`` or ``tcp`` is rejected.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Literal, NamedTuple

import anyio

from ._messages import LISTEN_PORT

__all__ = ["hostname2ip", "is_valid_ip", "validate_uri"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = ("udp", "ws", "wss", "tcp")
_SCHEME = re.compile(r"^[a-zA-Z]+(?=://)")
_HOSTNAME = re.compile(r"^[a-z0-9-]+$")


def is_valid_ip(ip_address: Any) -> bool:
    """Return True if ``ip_address`` is an IPv4 or IPv6 address (str, int or object)."""
    try:
        ipaddress.ip_address(ip_address)
    except ValueError:
        return False
    return True


def hostname2ip(hostname: str | None = None) -> IPAddress:
    """Resolve a host name to an IP address (this computer's name if None or empty).

    This call blocks while it resolves; call it outside the event loop or with
    ``anyio.to_thread.run_sync`` when the name may need the network.

    Raises:
        ValueError: the name cannot be resolved.
    """
    hostname = hostname or socket.gethostname()
    try:
        return ipaddress.ip_address(socket.gethostbyname(hostname))
    except (OSError, UnicodeError):
        raise ValueError(f'Failed to resolve IP for hostname "{hostname}"') from None


def validate_uri(
    uri: str | IPAddress,
    resolve_host: bool = True,
    default_port: int | str = LISTEN_PORT,
    default_proc: str = "udp",
) -> str:
    """Return a complete URI ``scheme://host:port`` for a URI, host or ``host:port``.

    Args:
        uri: a full URI, an address or host name with or without port, or an
            ``ipaddress`` object.
        resolve_host: resolve a host name to an IP address (blocking DNS);
            if false, the name must be lower-case letters, digits and hyphens.
        default_port: port used when ``uri`` has none.
        default_proc: scheme used when ``uri`` has none.

    Raises:
        TypeError: ``uri`` is not a str or ``ipaddress`` object.
        ValueError: unknown scheme, unresolvable or invalid host, or a port
            outside 0-65535.

    >>> validate_uri("ws://127.0.0.1")
    'ws://127.0.0.1:11001'
    >>> validate_uri("[::1]:9000")
    'udp://[::1]:9000'
    """
    if not isinstance(uri, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise TypeError(
            f"Unsupported URI {uri!r} of type {type(uri).__name__}; pass a string such as "
            "'udp://192.168.0.4:11001' or an ipaddress object"
        )
    port: Any
    proc = default_proc
    if isinstance(uri, str):
        match = _SCHEME.match(uri)
        if match:
            proc = match.group()
            uri = uri[len(proc) + 3 :]
    proc = proc.lower()
    if proc not in SCHEMES:
        raise ValueError(
            f"Unsupported scheme {proc!r}; use one of {', '.join(s + '://' for s in SCHEMES)} "
            "(ws:// and tcp:// are plain TCP)"
        )
    if isinstance(uri, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        host: Any = uri
        port = default_port
    else:
        host, port = _split_host_port(uri)
        if not is_valid_ip(host):
            if resolve_host:
                host = hostname2ip(host)
            elif not _HOSTNAME.match(host):
                raise ValueError(
                    f'Invalid hostname "{host}": use lower-case letters, digits and hyphens, '
                    "or an IP address"
                )
        else:
            host = ipaddress.ip_address(host)
    port = port or default_port
    try:
        port_number = int(port)
        if not 0 <= port_number <= 65535:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"Invalid port number: {port} (expected 0-65535)") from None
    host_text = f"[{host}]" if isinstance(host, ipaddress.IPv6Address) else str(host)
    return f"{proc}://{host_text}:{port_number}"


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f'Invalid address "{text}": missing "]" after an IPv6 address')
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f'Invalid address "{text}": expected ":port" after "]"')
        return host, rest[1:] or None
    if text.count(":") > 1 and is_valid_ip(text):
        return text, None  # a bare IPv6 address
    if ":" in text:
        host, port = text.split(":", 1)
        return host, port
    return text, None


class Endpoint(NamedTuple):
    """The parts of a validated URI."""

    scheme: str
    host: str
    port: int

    @property
    def transport(self) -> Literal["udp", "tcp"]:
        """``"udp"`` or ``"tcp"`` (``ws``, ``wss`` and ``tcp`` are plain TCP)."""
        return "udp" if self.scheme == "udp" else "tcp"


def split_uri(uri: str) -> Endpoint:
    """Split a URI returned by :func:`validate_uri` into scheme, host and port."""
    scheme, _, rest = uri.partition("://")
    host, port = _split_host_port(rest)
    return Endpoint(scheme, host, int(port or 0))


def canonical_host(host: str) -> str:
    """The one text of an IP address that every table of an endpoint uses.

    IPv4 stays as is; IPv6 is compressed and lower-cased, and an IPv4-mapped
    IPv6 address (``::ffff:127.0.0.1``, as a dual-stack socket reports an IPv4
    peer) becomes its IPv4 address. Python 3.10-3.12 print such an address as
    ``::ffff:7f00:1`` and 3.13 as ``::ffff:127.0.0.1``; neither is used. Text
    that is not an IP address is returned unchanged.
    """
    if ":" not in host:
        return host
    address, percent, scope = host.partition("%")
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed + percent + scope


def canonical_address(addr: tuple[Any, ...]) -> tuple[str, int]:
    """``(canonical_host(host), port)`` of a socket address (IPv6 flow and scope fields dropped)."""
    return (canonical_host(str(addr[0])), int(addr[1]))


async def resolve_uri(uri: str | IPAddress) -> str:
    """:func:`validate_uri` without blocking the event loop on DNS.

    An IP address is validated inline; a host name is resolved in a worker
    thread.
    """
    try:
        text = validate_uri(uri, resolve_host=False)
    except ValueError:
        text = None
    if text is not None and is_valid_ip(split_uri(text).host):
        return text
    return await anyio.to_thread.run_sync(validate_uri, uri)
