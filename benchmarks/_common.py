"""Helpers shared by the benchmark scripts (not a benchmark itself).

Every worker script prints exactly one JSON object on its last stdout line;
:func:`emit` writes it. With ``--stepped`` a worker runs each repetition only
when the runner writes ``go`` on its stdin (see :func:`repetitions`), so that
the runner can interleave the repetitions of the libraries it compares.

Long-lived helper processes (echo peers, rig simulators, the delay relay)
print one JSON line when they are ready and run until their standard input
closes; :func:`spawn` starts one and waits for that line, and :func:`stop`
ends it (always call it in ``finally``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PAYLOAD = b'[2, "2024-01-01_1_mouse1", null]'
"""The message timed by the round-trip benchmarks (an EXPSTART signal)."""

EXP_REF = "2024-01-01_1_mouse1"


def emit(result: dict[str, Any]) -> None:
    """Print the worker's result as the last stdout line."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


_stepped = False


def set_stepped(on: bool) -> None:
    """Turn stepped mode on (the worker's ``--stepped`` option)."""
    global _stepped
    _stepped = on


def repetitions(count: int) -> Iterator[int]:
    """``range(count)``; in stepped mode each step first waits for the runner's ``go``.

    Waiting blocks the event loop on purpose: between repetitions nothing is
    in flight, and an idle worker must not compete for the CPU.
    """
    for i in range(count):
        if _stepped:
            emit({"turn": True})
            if sys.stdin.readline().strip() != "go":
                raise SystemExit("the benchmark runner went away")
        yield i


def quiet_logger(name: str = "bench") -> logging.Logger:
    """A logger that drops everything below WARNING (iblutil's default logs at DEBUG)."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.NullHandler())
    return logger


def free_udp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports that are free now (iblutil cannot bind port 0: it rejects it in validate_uri)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, 0))
        return int(s.getsockname()[1])
    finally:
        s.close()


async def iblutil_server(scheme: str, name: str, log: logging.Logger) -> tuple[Any, int]:
    """An iblutil server endpoint on a free port of 127.0.0.1: ``(endpoint, port)``.

    iblutil cannot bind port 0, so a free port is picked first; another process
    may take it meanwhile (the runner starts workers together), hence the retries.
    """
    from iblutil.io.net.app import EchoProtocol

    for attempt in range(50):
        port = free_udp_ports(1)[0] if scheme == "udp" else free_tcp_port()
        try:
            server = await EchoProtocol.server(f"{scheme}://127.0.0.1:{port}", name=name, log=log)
        except OSError:
            if attempt == 49:
                raise
            continue
        return server, port
    raise AssertionError("unreachable")


def maxrss_kib() -> int:
    """Peak resident set size of this process in KiB (Linux ``ru_maxrss``)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def current_rss_kib() -> int:
    """Current resident set size in KiB (``/proc/self/statm``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return maxrss_kib()


def exit_when_stdin_closes() -> None:
    """Helper processes: exit at once when the parent closes our stdin (or dies)."""

    def watch() -> None:
        # os.read on the raw descriptor: a thread blocked in sys.stdin.read()
        # would hold the buffer's lock and break interpreter shutdown.
        try:
            while os.read(0, 4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def ready(info: dict[str, Any]) -> None:
    """Helper processes: announce readiness (with ports etc.) to :func:`spawn`."""
    emit({"ready": True, **info})


def spawn(args: list[str], timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Start a helper process and return it with its readiness info.

    The helper's stderr is inherited (warnings show up in the runner's
    output); its stdout carries the readiness line.
    """
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if isinstance(info, dict) and info.get("ready"):
                return proc, info
        raise RuntimeError(f"helper {args!r} did not start (last line {line!r})")
    except BaseException:
        stop(proc)
        raise


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    """End a helper process started by :func:`spawn`: close stdin, then terminate, then kill."""
    if proc is None or proc.poll() is not None:
        return
    try:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(timeout=2)
    except (subprocess.TimeoutExpired, OSError):
        proc.terminate()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
