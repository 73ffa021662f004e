"""Pieces behind the opt-in reliability and security options of an endpoint.

- :class:`Recent`: a bounded, expiring map of (peer, bytes) used to swallow late
  or duplicated echoes and to recognise retransmitted messages.
- :func:`nonce`: trailing JSON whitespace that makes every reliable send's bytes
  unique, so a retransmission (same bytes) is told apart from a new message
  with the same content (different bytes). Whitespace after the array is valid
  JSON: iblutil parses it and echoes it byte for byte.
- :class:`PeerFilter`: the hosts and networks a listening endpoint accepts.

No I/O here.
"""

from __future__ import annotations

import ipaddress
import math
import random
from collections import OrderedDict
from collections.abc import Hashable, Iterable

__all__ = ["PeerFilter", "RateLimit", "Recent", "nonce"]

_WHITESPACE = (b" ", b"\t", b"\r", b"\n")
_NONCE_CHARS = 12  # 24 random bits


def nonce(rng: random.Random) -> bytes:
    """Return 12 random JSON whitespace bytes (24 bits) to append to a message."""
    bits = rng.getrandbits(2 * _NONCE_CHARS)
    return b"".join(_WHITESPACE[(bits >> (2 * i)) & 3] for i in range(_NONCE_CHARS))


class Recent:
    """A bounded map of key -> remaining uses, each entry expiring after ``ttl`` seconds.

    The oldest entries are evicted beyond ``capacity``.
    """

    __slots__ = ("_entries", "capacity", "ttl")

    def __init__(self, capacity: int, ttl: float) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._entries: OrderedDict[Hashable, tuple[int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, key: Hashable, now: float, uses: int = 1, ttl: float | None = None) -> None:
        """Remember ``key`` for ``uses`` more matches (added to any it has left).

        ``ttl`` overrides the map's default lifetime for this entry.
        """
        entries = self._entries
        left = entries.pop(key, (0, 0.0))[0]
        entries[key] = (left + uses, now + (self.ttl if ttl is None else ttl))
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def take(self, key: Hashable, now: float) -> bool:
        """Use up one match of ``key``; False if it is unknown or expired."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        uses, expiry = entry
        if expiry < now:
            del self._entries[key]
            return False
        if uses <= 1:
            del self._entries[key]
        else:
            self._entries[key] = (uses - 1, expiry)
        return True

    def seen(self, key: Hashable, now: float) -> bool:
        """True if ``key`` is known and not expired (uses are not counted)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry[1] < now:
            del self._entries[key]
            return False
        return True


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


class RateLimit:
    """At most one log line per ``interval`` seconds, counting what it held back."""

    __slots__ = ("count", "interval", "next_at")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.next_at = -math.inf
        self.count = 0

    def ready(self, now: float) -> bool:
        self.count += 1
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        return True

    def take(self) -> int:
        count, self.count = self.count, 0
        return count
