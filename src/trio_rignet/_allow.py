"""Allow lists: the hosts and networks a listening endpoint accepts. No I/O."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

__all__ = ["PeerFilter"]


class PeerFilter:
    """The hosts and networks a listening endpoint accepts messages from.

    Args:
        allow: IP addresses or networks (``"10.0.0.2"``, ``"192.168.1.0/24"``,
            ``ipaddress`` objects).

    Raises:
        ValueError: an entry is not an IP address or network.
    """

    __slots__ = ("_cache", "networks")

    def __init__(self, allow: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network]):
        if isinstance(allow, (str, bytes)):
            raise TypeError(
                "allow must be a list of addresses or networks, e.g. ['10.0.0.2', '10.0.1.0/24']"
            )
        networks = []
        for entry in allow:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except (TypeError, ValueError):
                raise ValueError(
                    f"allow entry {entry!r} is not an IP address or network such as "
                    "'10.0.0.2' or '10.0.0.0/24' (host names are not accepted)"
                ) from None
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        """True if ``host`` (an IP address string) is in one of the networks."""
        allowed = self._cache.get(host)
        if allowed is None:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return False
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            allowed = any(ip in net for net in self.networks)
            if len(self._cache) < 4096:
                self._cache[host] = allowed
        return allowed
