"""``rignet status``: a live view of the rigs: reachable, round trip, clock offset, last event.

How each rig is probed depends on what it runs:

- A rig known to run trio-rignet (``--trio``, or one that has sent a tagged
  message) gets the heartbeat of :meth:`Services.run_heartbeat
  <trio_rignet.Services.run_heartbeat>`: pings on the extension channel,
  which give its round trip and its clock offset.
- Any other rig (iblutil 1.20.0, or a trio-rignet rig not yet known as one)
  is sent ``status CONNECTED`` (``[32, 0]``), a message iblutil handles: it
  echoes it (the round trip) and runs its status callbacks, if any. A
  trio-rignet rig answers it with a completion update, which is tagged: from
  then on it gets heartbeats instead. An iblutil rig is never pinged; it has
  no clock offset, and is probed again every second.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ._cli_common import (
    UI,
    OpenTimeout,
    backend_option,
    describe,
    open_rigs,
    run_async,
    seconds,
    table,
    timestamp,
    word,
)
from ._cli_interrupt import Interrupt
from ._cli_rigs import RigsError, check_uri, rig_options, rigs_from
from ._echo import EchoProtocol
from ._errors import EndpointClosed, RignetError
from ._messages import ExpStatus, Message, build_status
from ._services import RigState, Services

__all__ = ["add_status_parser"]

log = logging.getLogger("trio_rignet.status")

HEARTBEAT = 0.2
"""Seconds between two pings to a trio-rignet rig."""
LOST_AFTER = 0.8
"""A trio-rignet rig that has not answered a ping for this long is ``lost``."""
PROBE_EVERY = 1.0
"""Seconds between two ``status`` probes to a rig not known to run trio-rignet (live view)."""
REFRESH_TTY = 0.25
"""Seconds between two redraws on a terminal."""
REFRESH_PLAIN = 1.0
"""Seconds between two snapshots when the output is not a terminal."""
_POLL = 0.05
"""Seconds between two checks whether ``--once`` has heard from every rig."""

_PROBE = build_status(ExpStatus.CONNECTED)
_COLUMNS = ["rig", "state", "peer", "round trip", "clock offset", "last event", "note"]


def add_status_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``rignet status`` to the subcommands ``sub`` (from ``add_subparsers``)."""
    status = sub.add_parser(
        "status",
        help="show each rig live: reachable, round trip, clock offset, last event",
        description="Show each rig's state, updated in place until Ctrl-C: reachable or not, "
        "the last round trip, the clock offset (trio-rignet rigs), the last event it sent. "
        "With --once, print it once and exit 0 if every rig is reachable, 1 if some are "
        "not, 3 if none is.",
    )
    status.add_argument(
        "uris",
        nargs="*",
        metavar="URI",
        help="a rig's address, e.g. udp://10.0.0.2:11001 (named by its URI)",
    )
    rig_options(status)
    status.add_argument(
        "--once",
        action="store_true",
        help="print the state once, after --for seconds at most, and exit (for scripts)",
    )
    status.add_argument(
        "--for",
        dest="gather",
        type=seconds(),
        default=1.0,
        metavar="S",
        help="with --once: seconds to gather at most; ends sooner once every rig answered (1)",
    )
    status.add_argument(
        "--trio",
        action="store_true",
        help="every rig runs trio-rignet: send heartbeats at once, never a status probe "
        "(never use it with iblutil rigs: they would echo them and warn)",
    )
    status.add_argument(
        "--timeout",
        type=seconds(),
        default=1.0,
        metavar="S",
        help="seconds to wait for an echo, and for a TCP rig to connect (1)",
    )
    backend_option(status)
    status.set_defaults(func=_cmd_status)
    return status  # type: ignore[no-any-return]


def _cmd_status(args: argparse.Namespace, ui: UI, interrupt: Interrupt) -> int:
    parser: argparse.ArgumentParser = args.parser
    rigs: dict[str, str] = {}
    try:
        for uri in args.uris:
            rigs[uri] = check_uri(uri, "cannot probe")
    except RigsError as exc:
        parser.error(str(exc))
    if args.rigs_file is not None or args.rig or not rigs:
        if not rigs and args.rigs_file is None and not args.rig:
            parser.error(
                "no rigs: give URIs, --rigs FILE (e.g. iblrig's remote_devices.yaml) or "
                "--rig NAME=URI (repeatable)"
            )
        rigs.update(rigs_from(args))
    view = _Status(
        ui,
        interrupt,
        rigs,
        once=args.once,
        gather=args.gather,
        trio=args.trio,
        timeout=args.timeout,
    )
    done, status = run_async(interrupt, args.backend, view.main)
    if not done:
        if args.once:
            return ui.interrupted(interrupt)
        return 0  # Ctrl-C is how the live view ends
    assert status is not None
    return status


@dataclass
class _Rig:
    """What ``status`` knows of one rig, besides :class:`RigState`."""

    name: str
    uri: str
    endpoint: EchoProtocol | None = None
    open_error: BaseException | None = None
    probe_ok: bool | None = None
    """The last ``status`` probe was echoed (None: none ended yet)."""
    probe_error: BaseException | None = None
    probe_rtt: float | None = None
    probing: bool = False
    last_message: Message | None = None
    last_message_at: float | None = None
    shown: str = ""
    """The state last logged (live view)."""


@dataclass
class _Row:
    state: str
    peer: str
    rtt: str
    clock: str
    event: str
    note: str
    settled: bool
    """Nothing more to learn for ``--once``."""

    @property
    def up(self) -> bool:
        return self.state == "up"


class _Status:
    """``rignet status``: probes, heartbeats and the view."""

    def __init__(
        self,
        ui: UI,
        interrupt: Interrupt,
        rigs: Mapping[str, str],
        *,
        once: bool,
        gather: float,
        trio: bool,
        timeout: float,
    ) -> None:
        self.ui = ui
        self.interrupt = interrupt
        self.rigs = [_Rig(name, uri) for name, uri in rigs.items()]
        self.once = once
        self.gather = gather
        self.trio = trio
        self.timeout = timeout
        self.began = 0.0
        self.drawn = 0

    async def main(self) -> int:
        self.interrupt.note = "while connecting to the rigs"
        self.began = anyio.current_time()
        # The live view reconnects to TCP rigs that go down and come back;
        # --once reports a refused connection at once, as `run` does.
        options: dict[str, Any] = {"reconnect": not self.once, "echo_timeout": self.timeout}
        uris = {rig.name: rig.uri for rig in self.rigs}
        async with open_rigs(uris, self.timeout, **options) as (services, down):
            for rig in self.rigs:
                if rig.name in services:
                    rig.endpoint = services[rig.name]
                else:
                    rig.open_error = down[rig.name]
            self.interrupt.note = "while gathering the rigs' state"
            async with anyio.create_task_group() as tg:
                declared = set(services) if self.trio else set()
                tg.start_soon(services.run_heartbeat, HEARTBEAT, LOST_AFTER, declared)
                if not self.trio:
                    for rig in self.rigs:
                        if rig.endpoint is not None:
                            tg.start_soon(self._probe, rig)
                if self.once:
                    status = await self._gather(services)
                else:
                    status = await self._live(services)
                tg.cancel_scope.cancel()
        return status

    # ---------------------------------------------------------------- probes

    async def _probe(self, rig: _Rig) -> None:
        """Send ``status CONNECTED`` until the rig shows it runs trio-rignet."""
        endpoint = rig.endpoint
        assert endpoint is not None
        while True:
            began = anyio.current_time()
            try:
                if endpoint.is_trio_peer():
                    return  # the heartbeat takes over
            except EndpointClosed:
                return
            rig.probing = True
            try:
                await self._probe_once(rig, endpoint)
            finally:
                rig.probing = False
            if self.once:
                return
            await anyio.sleep(max(0.0, began + PROBE_EVERY - anyio.current_time()))

    async def _probe_once(self, rig: _Rig, endpoint: EchoProtocol) -> None:
        if not endpoint.is_connected:  # a TCP rig (re)connecting in the background
            with anyio.move_on_after(self.timeout):
                await endpoint.wait_connected()
            if not endpoint.is_connected:
                rig.probe_ok, rig.probe_error = False, OpenTimeout(self.timeout)
                return
        try:
            await endpoint.confirmed_send(_PROBE, timeout=self.timeout)
        except (RignetError, OSError) as exc:
            rig.probe_ok, rig.probe_error = False, exc
        else:
            rig.probe_ok, rig.probe_error = True, None
            rig.probe_rtt = endpoint.stats.rtt_last

    # ------------------------------------------------------------------ views

    async def _gather(self, services: Services) -> int:
        """``--once``: gather until every rig is settled or ``--for`` is over; print once."""
        await self._settle(services, self.began + self.gather)
        rows = self._rows(services, final=True)
        for line in self._table(rows):
            self.ui.line(line)
        up = [name for name, row in rows.items() if row.up]
        unreachable = [name for name, row in rows.items() if not row.up]
        if not unreachable:
            self.ui.line(f"all {len(rows)} rig{'s' * (len(rows) != 1)} reachable.")
            return 0
        self.ui.line(
            f"{len(up)} of {len(rows)} rigs reachable; "
            f"{self.ui.paint('unreachable', 'fail')}: {', '.join(unreachable)}."
        )
        return 1 if up else 3

    async def _settle(self, services: Services, deadline: float) -> None:
        """Until every rig is settled, or ``deadline`` is past and no probe is in flight."""
        while True:
            if all(row.settled for row in self._rows(services, final=False).values()):
                return
            if anyio.current_time() >= deadline and not any(r.probing for r in self.rigs):
                return
            await anyio.sleep(_POLL)

    async def _live(self, services: Services) -> int:
        """Redraw in place on a terminal, else print a snapshot every second; until Ctrl-C."""
        out = self.ui.out
        isatty = getattr(out, "isatty", None)
        in_place = bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"
        if not in_place:  # a first snapshot once the rigs had time to answer
            await self._settle(services, self.began + REFRESH_PLAIN)
        while True:
            rows = self._rows(services, final=False)
            self._log_changes(rows)
            up = sum(row.up for row in rows.values())
            header = (
                f"{timestamp()}  {up} of {len(rows)} rig{'s' * (len(rows) != 1)} up"
                "  (Ctrl-C to stop)"
            )
            lines = [header, *self._table(rows)]
            if in_place:
                self._redraw(lines)
                await anyio.sleep(REFRESH_TTY)
            else:
                for line in lines:
                    self.ui.line(line)
                self.ui.line()
                await anyio.sleep(REFRESH_PLAIN)

    def _redraw(self, lines: list[str]) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)
        parts = []
        if self.drawn:
            parts.append(f"\x1b[{self.drawn}F")  # to the start of the first line drawn
        parts.extend(f"\x1b[2K{_clip(line, width)}\n" for line in lines)
        self.ui.out.write("".join(parts))
        self.ui.out.flush()
        self.drawn = len(lines)

    def _log_changes(self, rows: Mapping[str, _Row]) -> None:
        for rig in self.rigs:
            row = rows[rig.name]
            if row.state != rig.shown:
                rig.shown = row.state
                log.info("%s: %s%s", rig.name, row.state, f" ({row.note})" if row.note else "")

    def _table(self, rows: Mapping[str, _Row]) -> list[str]:
        cells = [_COLUMNS]
        for name, row in rows.items():
            cells.append([name, row.state, row.peer, row.rtt, row.clock, row.event, row.note])
        lines = table(cells)
        state_at = max(len(c[0]) for c in cells) + 2
        width = max(len(c[1]) for c in cells)
        painted = [self.ui.paint(lines[0], "bold")]
        for line, row in zip(lines[1:], rows.values(), strict=True):
            cell = line[state_at : state_at + width]
            style = "ok" if row.up else "dim" if row.state == "..." else "fail"
            painted.append(line[:state_at] + self.ui.paint(cell, style) + line[state_at + width :])
        return painted

    # ------------------------------------------------------------------ state

    def _rows(self, services: Services, *, final: bool) -> dict[str, _Row]:
        now = anyio.current_time()
        states = services.state
        return {rig.name: self._row(rig, states.get(rig.name), now, final) for rig in self.rigs}

    def _row(self, rig: _Rig, state: RigState | None, now: float, final: bool) -> _Row:
        if rig.endpoint is None or state is None:
            assert rig.open_error is not None
            kind, text = describe(rig.open_error)
            return _Row(kind, "-", "-", "-", "-", text, True)
        msg = rig.endpoint.last_message
        if msg is not None and msg is not rig.last_message:
            rig.last_message, rig.last_message_at = msg, now
        event = "-"
        if rig.last_message is not None and rig.last_message_at is not None:
            what = "error report" if rig.last_message.is_error else word(rig.last_message.event)
            event = f"{what}, {_ago(now - rig.last_message_at)}"
        trio = state.trio or self.trio
        clock = "-"
        if state.clock is not None:
            c = state.clock
            clock = f"{_ms(c.offset, signed=True)} ± {_ms(c.uncertainty)}"
        peer = "trio-rignet" if state.trio else "-"
        if trio:
            rtt = _ms(state.heartbeat_rtt) if state.heartbeat_rtt is not None else "-"
            if state.alive:
                return _Row("up", peer, rtt, clock, event, "", state.clock is not None)
            if state.alive is False:
                note = f"no answer to heartbeats for {LOST_AFTER:g} s"
                return _Row("lost", peer, rtt, clock, event, note, True)
            if rig.probe_ok:  # just shown it runs trio-rignet: heartbeats begin
                rtt = _ms(rig.probe_rtt)
                return _Row("up", peer, rtt, clock, event, "", False)
            if rig.probe_error is not None:
                kind, text = describe(rig.probe_error)
                return _Row(kind, peer, "-", clock, event, text, True)
            if not state.connected and (final or now - self.began > self.timeout):
                note = "no TCP connection: is the rig on?"
                return _Row("down", peer, "-", clock, event, note, True)
            if final or now - self.began > LOST_AFTER:
                note = "no answer to heartbeats: is it on, and does it run trio-rignet?"
                return _Row("no answer", peer, "-", clock, event, note, True)
            return _Row("...", peer, "-", clock, event, "", False)
        if rig.probe_ok:
            note = "echo only: iblutil, or no answer to status (no clock)"
            return _Row("up", "other", _ms(rig.probe_rtt), clock, event, note, False)
        if rig.probe_error is not None:
            kind, text = describe(rig.probe_error)
            return _Row(kind, "-", "-", clock, event, text, True)
        if final:
            return _Row("no echo", "-", "-", clock, event, "no answer yet", True)
        return _Row("...", "-", "-", clock, event, "", False)


def _ms(seconds: float | None, *, signed: bool = False) -> str:
    """``1.23 ms`` (``+1.23 ms`` if ``signed``), or ``-`` for nothing."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    value = seconds * 1000
    if abs(value) >= 10_000:
        return f"{seconds:+.3f} s" if signed else f"{seconds:.3f} s"
    return f"{value:+.3f} ms" if signed else f"{value:.3f} ms"


def _ago(seconds: float) -> str:
    if seconds < 1:
        return "just now"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters (colour codes kept, reset at the end)."""
    if len(_ANSI.sub("", line)) <= width:
        return line
    out, shown, pos = [], 0, 0
    for match in _ANSI.finditer(line):
        text = line[pos : match.start()]
        take = text[: max(0, width - shown)]
        out.append(take)
        shown += len(take)
        out.append(match[0])
        pos = match.end()
    out.append(line[pos:][: max(0, width - shown)])
    return "".join(out) + "\x1b[0m"
