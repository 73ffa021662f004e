"""Helper process: a UDP relay that delays every datagram by a fixed time, keeping order.

    python relay.py --delay-ms 1 --targets 40001,40002

For each target port it binds one front port on 127.0.0.1. A datagram sent to
front port ``i`` goes out ``delay`` later from a socket connected to target
``i``; what target ``i`` sends back goes out ``delay`` later from front port
``i`` to the address that last wrote to it. So a main PC that talks to front
port ``i`` sees rig ``i`` one ``delay`` away each way. Prints
``{"ready": true, "ports": [front ports]}``, then runs until stdin closes.

Why plain sockets and not asyncio or Trio: their timers wait in ``epoll`` with a
millisecond resolution rounded up, which would add up to another millisecond
per hop. Here each datagram is stamped with its kernel arrival time
(``SO_TIMESTAMPNS`` on Linux; the read time elsewhere) and released at
arrival + delay: the wait is an ``epoll`` timeout up to a millisecond before
the release, then ``time.sleep`` (with the timer slack set to 1 ns) and a spin
of at most 60 microseconds, so the added delay is the asked one within tens of
microseconds (measured by ``floor.py --kind relay``). Datagrams on one path
all get the same delay and leave in arrival order (a heap keyed by release
time, then arrival sequence).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import selectors
import socket
import struct
import sys
import time

from _common import exit_when_stdin_closes, ready

# Not exported by Python's socket module on every version: the Linux value.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35 if sys.platform == "linux" else None)
ANC_SIZE = socket.CMSG_SPACE(16)
SPIN_NS = 60_000  # the last stretch before a release is spun, not slept


def tighten_timer_slack() -> None:
    """Linux: 1 ns timer slack (default 50 us) so ``time.sleep`` wakes up on time."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


class Relay:
    def __init__(self, targets: list[int], delay_ns: int, host: str = "127.0.0.1") -> None:
        self.delay = delay_ns
        self.sel = selectors.DefaultSelector()
        self.heap: list[tuple[int, int, socket.socket, bytes, tuple[str, int] | None]] = []
        self.seq = itertools.count()
        self.stamped = SO_TIMESTAMPNS is not None
        self.fronts: list[socket.socket] = []
        self.backs: list[socket.socket] = []
        self.clients: list[tuple[str, int] | None] = [None] * len(targets)
        for i, port in enumerate(targets):
            front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            front.bind((host, 0))
            back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            back.connect((host, port))
            for s in (front, back):
                s.setblocking(False)
                if self.stamped:
                    try:
                        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                    except OSError:
                        self.stamped = False
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sel.register(front, selectors.EVENT_READ, (i, True))
            self.sel.register(back, selectors.EVENT_READ, (i, False))
            self.fronts.append(front)
            self.backs.append(back)

    @property
    def ports(self) -> list[int]:
        return [s.getsockname()[1] for s in self.fronts]

    def _read(self, sock: socket.socket) -> list[tuple[bytes, int, tuple[str, int]]]:
        """Every datagram queued on ``sock``, with its arrival time (ns, CLOCK_REALTIME)."""
        out = []
        while True:
            try:
                if self.stamped:
                    data, anc, _flags, addr = sock.recvmsg(65536, ANC_SIZE)
                    stamp = 0
                    for level, kind, raw in anc:
                        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                            sec, nsec = struct.unpack("qq", raw[:16])
                            stamp = sec * 1_000_000_000 + nsec
                    out.append((data, stamp or time.time_ns(), addr))
                else:
                    data, addr = sock.recvfrom(65536)
                    out.append((data, time.time_ns(), addr))
            except (BlockingIOError, InterruptedError):
                return out
            except ConnectionRefusedError:
                continue  # the rig behind a back socket is gone: drop

    def _on_readable(self, index: int, front: bool) -> None:
        sock = self.fronts[index] if front else self.backs[index]
        for data, stamp, addr in self._read(sock):
            if front:
                self.clients[index] = addr[:2]
                item = (stamp + self.delay, next(self.seq), self.backs[index], data, None)
            else:
                client = self.clients[index]
                if client is None:
                    continue  # nobody to send it to yet
                item = (stamp + self.delay, next(self.seq), self.fronts[index], data, client)
            heapq.heappush(self.heap, item)

    def _flush(self) -> None:
        heap = self.heap
        now = time.time_ns()
        while heap and heap[0][0] <= now:
            _, _, sock, data, addr = heapq.heappop(heap)
            try:
                if addr is None:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
            except OSError:
                pass  # UDP: a datagram that cannot go out is lost, as on a network

    def run(self) -> None:
        while True:
            self._flush()
            timeout: float | None = None
            if self.heap:
                remaining = self.heap[0][0] - time.time_ns()
                if remaining <= 0:
                    timeout = 0
                elif remaining > 1_500_000:
                    # epoll rounds up to whole milliseconds: wake up early.
                    timeout = (remaining - 1_000_000) / 1e9
                else:
                    # Sleep to just before the release, then spin the rest
                    # (sleep overshoots by tens of microseconds).
                    deadline = self.heap[0][0]
                    if remaining > SPIN_NS:
                        time.sleep((remaining - SPIN_NS) / 1e9)
                    while time.time_ns() < deadline:
                        pass
                    self._flush()
                    timeout = 0
            for key, _ in self.sel.select(timeout):
                self._on_readable(*key.data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--targets", required=True, help="comma-separated target UDP ports")
    args = parser.parse_args()
    exit_when_stdin_closes()
    tighten_timer_slack()
    targets = [int(p) for p in args.targets.split(",") if p]
    relay = Relay(targets, int(args.delay_ms * 1e6))
    ready({"ports": relay.ports, "kernel_timestamps": relay.stamped})
    relay.run()


if __name__ == "__main__":
    main()
