"""A log rate limiter: at most one line per interval for repeated events. No I/O."""

from __future__ import annotations

import math

__all__ = ["RateLimit"]


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
