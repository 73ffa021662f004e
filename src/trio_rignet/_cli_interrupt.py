"""Ctrl-C and SIGTERM for the ``rignet`` command: a cancellation, never a KeyboardInterrupt.

Trio's default SIGINT handling raises ``KeyboardInterrupt`` at whatever bytecode
is running when the signal arrives, unless that code is KI-protected. Library
code and parts of Trio itself (``trio.Event.wait`` between registering the
task and blocking) are not, so a Ctrl-C could leave a task registered on an
event it no longer waits for: Trio then resumes a finished task and stops with
``TrioInternalError`` (``KeyError`` in ``Runner.task_exited``), or a wait is
never woken and the command hangs. asyncio (3.11+) instead cancels the main
task, which surfaces as ``CancelledError`` tracebacks.

So the command installs its own handlers with :func:`signal.signal` (which
works on every platform, including asyncio's ProactorEventLoop on Windows,
where ``loop.add_signal_handler`` does not exist). Trio and asyncio both leave
SIGINT alone when a handler other than Python's default is installed. The
handler only records the signal and schedules ``cancel()`` of the command's
cancel scope through the loop's signal-safe entry point
(``TrioToken.run_sync_soon`` or ``loop.call_soon_threadsafe``, both of which
also wake the loop through its wake-up socket). The command then unwinds like
any cancelled code, at its checkpoints. A second signal ends the process at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any, TypeVar

import anyio

__all__ = ["Interrupt", "signal_name"]

T = TypeVar("T")

_HANDLED = tuple(
    sig
    for sig in (
        signal.SIGINT,
        signal.SIGTERM,
        getattr(signal, "SIGBREAK", None),  # Ctrl-Break on Windows
    )
    if sig is not None
)


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for 2."""
    try:
        return signal.Signals(signum).name
    except ValueError:  # pragma: no cover - only the signals above are handled
        return f"signal {signum}"


def _loop_scheduler() -> Callable[[Callable[[], object]], object]:
    """A signal-safe way to run a function soon in the running event loop."""
    trio = sys.modules.get("trio")  # not imported: not running under Trio
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            run_sync_soon: Callable[[Callable[[], object]], object] = token.run_sync_soon
            return run_sync_soon
    return asyncio.get_running_loop().call_soon_threadsafe


class Interrupt:
    """Turns SIGINT, SIGTERM (and SIGBREAK on Windows) into cancellation of a command.

    Use :meth:`install` before running the event loop, :meth:`run` inside it,
    and :meth:`restore` or :meth:`ignore_from_now_on` afterwards.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        """The first signal received, if any."""
        self.note = ""
        """What the command did about the interruption, for its one-line message."""
        self._schedule: Callable[[Callable[[], object]], object] | None = None
        self._cancel: Callable[[], object] | None = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_status(self) -> int:
        """130 (the shell's status for Ctrl-C), whichever signal interrupted the command.

        One status for every interruption (Ctrl-C, SIGTERM, Ctrl-Break), so a
        script that runs ``rignet`` has one number to check.
        """
        assert self.signum is not None
        return 130

    def install(self) -> None:
        """Handle the signals from now on (main thread only: elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _HANDLED:
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def ignore_from_now_on(self) -> None:
        """The work is over: ignore these signals until the process exits.

        Python restores the default SIGINT disposition while it shuts down; a
        Ctrl-C then would kill the process without a word, or raise
        KeyboardInterrupt in an exit handler.
        """
        if self._previous:
            for sig in self._previous:
                signal.signal(sig, signal.SIG_IGN)
            self._previous.clear()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            # A second Ctrl-C: the user does not want to wait for the clean-up.
            os.write(2, b"rignet: interrupted again: exiting at once\n")
            os._exit(128 + signum)
        self.signum = signum
        schedule, cancel = self._schedule, self._cancel
        if schedule is not None and cancel is not None:
            # If the loop closed in between, run() sees self.signum when it returns.
            with contextlib.suppress(Exception):
                schedule(cancel)

    async def run(self, func: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run ``func()`` until it returns or a signal cancels it.

        Returns ``(True, result)`` if it returned, ``(False, None)`` if a
        signal cancelled it (``func`` may also notice :attr:`signum` and
        return early itself).
        """
        with anyio.CancelScope() as scope:
            self._schedule = _loop_scheduler()
            self._cancel = scope.cancel
            if self.signum is not None:  # arrived before the loop ran
                scope.cancel()
            try:
                return True, await func()
            finally:
                self._schedule = self._cancel = None
        return False, None
