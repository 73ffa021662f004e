"""What the ``rignet`` commands share: event names, output, logging, failures, options.

Private to the command line (``cli.py``, ``_cli_run.py``, ``_cli_status.py``); nothing here is
public API.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TextIO

import anyio
from anyio.abc import TaskStatus

from ._cli_interrupt import Interrupt, signal_name
from ._echo import EchoProtocol, EndpointOptions
from ._errors import EchoTimeout, EndpointClosed, PeerUnavailable, RemoteError, RignetError
from ._messages import ExpMessage
from ._services import CompletionTimeout, Services

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "EVENTS",
    "SIGNALS",
    "SIGNAL_EVENTS",
    "UI",
    "WORDS",
    "LogSetup",
    "OpenTimeout",
    "addr",
    "backend_option",
    "describe",
    "json_arg",
    "open_rigs",
    "run_async",
    "seconds",
    "setup_logging",
    "table",
    "timestamp",
    "unless_cancelled",
    "word",
    "words",
]

log = logging.getLogger("trio_rignet.cli")

# ------------------------------------------------------------- event names

WORDS: dict[ExpMessage, str] = {
    ExpMessage.EXPINIT: "init",
    ExpMessage.EXPSTART: "start",
    ExpMessage.EXPEND: "stop",
    ExpMessage.EXPINTERRUPT: "interrupt",
    ExpMessage.EXPCLEANUP: "cleanup",
    ExpMessage.EXPSTATUS: "status",
    ExpMessage.EXPINFO: "info",
    ExpMessage.ALYX: "alyx",
}
EVENTS = {word: event for event, word in WORDS.items()}
SIGNALS = ("init", "start", "stop", "interrupt", "cleanup", "status", "info")
# Every event but ALYX, which a simulated rig does not answer (it has no token).
SIGNAL_EVENTS = ExpMessage.any() & ~ExpMessage.ALYX
_PROTOCOL_NAMES = re.compile(
    r"\b(?:EXPINIT|EXPSTART|EXPEND|EXPINTERRUPT|EXPCLEANUP|EXPSTATUS|EXPINFO|ALYX)\b"
)


def word(event: Any) -> str:
    """The command-line name of an event: ``"stop"`` for EXPEND."""
    try:
        return WORDS[ExpMessage.validate(event, allow_bitwise=False)]
    except (TypeError, ValueError):
        return str(event)


def words(text: str) -> str:
    """``text`` with the protocol's event names (EXPEND, ...) replaced by the command's."""
    return _PROTOCOL_NAMES.sub(lambda m: WORDS[ExpMessage[m[0]]], text)


# ------------------------------------------------------------------ output

_STYLES = {"ok": "32", "fail": "1;31", "warn": "33", "dim": "2", "bold": "1"}


def _wants_colour(mode: str, stream: TextIO) -> bool:
    if mode != "auto":
        return mode == "always"
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    if sys.platform == "win32" and not ("WT_SESSION" in os.environ or "TERM" in os.environ):
        return False  # a classic console shows escape codes as text
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class UI:
    """Where and how the command writes: stdout for results, stderr for errors."""

    def __init__(self, colour: str, quiet: bool) -> None:
        self.out = sys.stdout
        self.err = sys.stderr
        self.quiet = quiet
        self._colour_out = _wants_colour(colour, self.out)
        self._colour_err = _wants_colour(colour, self.err)

    def paint(self, text: str, style: str, *, err: bool = False) -> str:
        """``text`` in ``style`` (ok, fail, warn, dim, bold) if that stream is coloured."""
        if not (self._colour_err if err else self._colour_out):
            return text
        return f"\x1b[{_STYLES[style]}m{text}\x1b[0m"

    def line(self, text: str = "", *, progress: bool = False) -> None:
        """Print a line of output (``progress`` lines are left out with ``-q``).

        Every line also goes to the log file, if any, with a timestamp.
        """
        if text:
            log.info("%s", _strip_ansi(text))
        if progress and self.quiet:
            return
        print(text, file=self.out, flush=True)

    def fail(self, message: str) -> int:
        """Print ``rignet: error: MESSAGE`` on stderr; return exit status 1."""
        log.debug("error: %s", message)
        print(
            f"rignet: {self.paint('error:', 'fail', err=True)} {message}", file=self.err, flush=True
        )
        return 1

    def interrupted(self, interrupt: Interrupt) -> int:
        """The one line for a command ended by a signal; its exit status."""
        assert interrupt.signum is not None
        note = f" {interrupt.note}" if interrupt.note else ""
        text = f"interrupted ({signal_name(interrupt.signum)}){note}"
        print(f"rignet: {self.paint(text, 'warn', err=True)}", file=self.err, flush=True)
        return interrupt.exit_status


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def timestamp() -> str:
    """Local time with milliseconds, as in log lines: ``2024-01-01 12:00:00.123``."""
    return datetime.datetime.now().isoformat(sep=" ", timespec="milliseconds")


def table(rows: list[list[str]], paint: Callable[[str], str] | None = None) -> list[str]:
    """Left-aligned columns, two spaces apart; ``paint`` colours body cells after padding."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        if paint is not None and index:
            cells = [cells[0], *(paint(cell) for cell in cells[1:])]
        lines.append("  ".join(cells).rstrip())
    return lines


# ----------------------------------------------------------------- logging


class _Formatter(logging.Formatter):
    """Timestamps with milliseconds (``2024-01-01 12:00:00.123``); command-line event names."""

    default_msec_format = "%s.%03d"

    def format(self, record: logging.LogRecord) -> str:
        return words(super().format(record))


class _NotCommandOutput(logging.Filter):
    """Keep the command's own progress lines (already on stdout) off stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != log.name


@dataclass
class LogSetup:
    """The handlers :func:`setup_logging` added, to remove when the command ends."""

    logger: logging.Logger
    handlers: list[logging.Handler]
    saved: tuple[int, bool]

    def close(self) -> None:
        """Remove and close the handlers; restore the logger's level and propagation."""
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def setup_logging(command: str, verbose: int, quiet: bool, log_file: str | None) -> LogSetup:
    """stderr: errors only with ``-q``; ``-v`` info, ``-vv`` debug. The file: info or debug.

    Without ``-v``, ``serve`` logs warnings; the other commands report every
    failure themselves, so they log nothing more.
    """
    if quiet:
        level = logging.ERROR if command == "serve" else logging.CRITICAL + 1
    elif verbose:
        level = logging.INFO if verbose == 1 else logging.DEBUG
    else:
        level = logging.WARNING if command == "serve" else logging.CRITICAL + 1
    formatter = _Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(level)
    stderr.setFormatter(formatter)
    stderr.addFilter(_NotCommandOutput())
    handlers: list[logging.Handler] = [stderr]
    if log_file is not None:
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
        file.setFormatter(formatter)
        handlers.append(file)
    logger = logging.getLogger("trio_rignet")
    saved = (logger.level, logger.propagate)
    logger.setLevel(min(handler.level for handler in handlers))
    logger.propagate = False
    for handler in handlers:
        logger.addHandler(handler)
    return LogSetup(logger, handlers, saved)


# ---------------------------------------------------------------- failures


async def unless_cancelled() -> None:
    """Raise the cancellation if this task is being cancelled (by Ctrl-C).

    When a signal cancels a Services call, closing endpoints can end some rigs'
    waits with EndpointClosed before the cancellation reaches them, and the call
    raises ServicesError instead of being cancelled; that is the interruption,
    not rig failures to report.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()


def addr(peer: Any) -> str:
    """``host:port``, or ``[host]:port`` for IPv6."""
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass
class OpenTimeout(Exception):
    """A TCP rig did not accept the connection in time."""

    timeout: float


def describe(exc: BaseException) -> tuple[str, str]:
    """A rig's failure for command-line users: ``(short kind, explanation)``.

    The explanation does not repeat the rig's name or address; the caller
    says which rig it is.
    """
    if isinstance(exc, CompletionTimeout):
        return "no reply", (
            f"confirmed {word(exc.event)} but sent no completion update within "
            f"{exc.timeout:g} s (if the rig needs longer, pass a longer --timeout)"
        )
    if isinstance(exc, EchoTimeout):
        return "no echo", (
            f"no echo within {exc.timeout:g} s: the rig is off, unreachable, or not running "
            "its rig software"
        )
    if isinstance(exc, PeerUnavailable):
        return "down", f"{exc.reason}: is the rig's software running?"
    if isinstance(exc, RemoteError):
        return "error", f"the rig failed to handle {word(exc.event)}: {words(exc.text)}"
    if isinstance(exc, EndpointClosed):
        return "closed", "the connection closed"
    if isinstance(exc, OpenTimeout):
        return "down", f"no TCP connection within {exc.timeout:g} s: is the rig on?"
    if isinstance(exc, ValueError):  # a host name that does not resolve
        return "bad host", f"{words(str(exc))}: check the address"
    if isinstance(exc, OSError):
        return "down", exc.strerror or str(exc)
    return "failed", words(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------- options


def backend_option(parser: argparse.ArgumentParser) -> None:
    """``--backend {trio,asyncio}``."""
    parser.add_argument(
        "--backend",
        choices=("trio", "asyncio"),
        default="trio",
        help="event loop to run on (default trio)",
    )


def seconds(*, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse ``type`` for a duration in seconds (positive, or 0 if ``allow_zero``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected seconds as a number, got {text!r}"
            ) from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            kind = (
                "a number of seconds, 0 or more" if allow_zero else "a positive number of seconds"
            )
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text}")
        return value

    parse.__name__ = "seconds"  # argparse names the type in some messages
    return parse


def json_arg(text: str) -> Any:
    """An argparse ``type`` for JSON text."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid JSON ({exc}); quote it for the shell, e.g. --data '{{\"key\": 1}}'"
        ) from None


def run_async(
    interrupt: Interrupt, backend: str, func: Callable[[], Awaitable[int]]
) -> tuple[bool, int | None]:
    """Run ``func`` on ``backend``; ``(False, None)`` if a signal cancelled it."""
    return anyio.run(interrupt.run, func, backend=backend)


# -------------------------------------------------------------- opening rigs


@asynccontextmanager
async def open_rigs(
    uris: Mapping[str, str], timeout: float, **options: Unpack[EndpointOptions]
) -> AsyncIterator[tuple[Services, dict[str, BaseException]]]:
    """Open a client endpoint per rig, concurrently; yield Services over those that opened.

    Unlike :meth:`Services.open`, a rig that cannot be opened (a TCP rig that
    refuses or does not answer the connection, a host name that does not
    resolve) does not fail the others: its error is returned by name. Each
    rig gets ``timeout`` seconds to connect; ``options`` are the endpoints' options.

    Once open, the endpoints are shielded from the caller's cancellation: after
    Ctrl-C, ``run`` still uses them to send interrupt; they close when the block
    exits.
    """
    endpoints: dict[str, EchoProtocol] = {}
    down: dict[str, BaseException] = {}
    holders: list[anyio.CancelScope] = []
    closed = anyio.Event()

    async def hold(name: str, uri: str, *, task_status: TaskStatus[None]) -> None:
        started = False
        with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
            holders.append(scope)
            try:
                async with EchoProtocol.client(uri, name=name, **options) as rig:
                    scope.deadline = math.inf
                    endpoints[name] = rig
                    started = True
                    task_status.started()
                    # If Ctrl-C cancelled the opening meanwhile, Trio leaves this
                    # task in start()'s cancelled nursery, waiting for it to end:
                    # end here instead of holding the endpoint shielded forever.
                    await anyio.lowlevel.checkpoint_if_cancelled()
                    scope.shield = True
                    await closed.wait()
            except (RignetError, OSError, ValueError) as exc:
                if started:
                    raise
                down[name] = exc
        if scope.cancelled_caught and not started:
            down[name] = OpenTimeout(timeout)
        if not started:
            task_status.started()

    async with anyio.create_task_group() as tg:
        try:
            async with anyio.create_task_group() as opener:
                for name, uri in uris.items():
                    opener.start_soon(partial(tg.start, hold, name, uri))
            yield Services({n: endpoints[n] for n in uris if n in endpoints}), down
        finally:
            closed.set()
            for scope in holders:  # any rig still connecting
                scope.cancel()
