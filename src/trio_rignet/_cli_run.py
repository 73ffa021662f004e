"""``rignet run``: an experiment on real rigs, with progress per rig and a summary.

The rigs come from a rigs file (iblrig's ``remote_devices.yaml`` or TOML, see
``_cli_rigs``) and ``--rig NAME=URI``. Each rig's endpoint is opened on its
own, so a rig that is down is reported by name instead of failing the others;
the signals go through :class:`~trio_rignet.Services`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._cli_common import (
    EVENTS,
    UI,
    backend_option,
    describe,
    json_arg,
    open_rigs,
    run_async,
    seconds,
    table,
    unless_cancelled,
)
from ._cli_interrupt import Interrupt
from ._cli_rigs import rig_options, rigs_from
from ._echo import EchoProtocol
from ._messages import Message
from ._services import Services, ServicesError

__all__ = ["add_run_parser"]

log = logging.getLogger("trio_rignet.run")


def add_run_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``rignet run`` to the subcommands ``sub`` (from ``add_subparsers``)."""
    run = sub.add_parser(
        "run",
        help="run an experiment on real rigs: init, start, stop, cleanup",
        description="Signal init, start EXP_REF, stop and cleanup to every rig, wait for each "
        "rig's completion, and print each rig's progress and a summary. A rig that fails is "
        "named and left out of later signals (it still gets cleanup if its init succeeded).",
    )
    run.add_argument(
        "exp_ref", metavar="EXP_REF", help="experiment reference, e.g. 2024-01-01_1_mouse"
    )
    rig_options(run)
    run.add_argument(
        "--duration",
        type=seconds(allow_zero=True),
        default=0.0,
        metavar="S",
        help="seconds between start and stop (default 0: stop once every rig has started)",
    )
    run.add_argument(
        "--timeout",
        type=seconds(),
        default=10.0,
        metavar="S",
        help="seconds each rig may take to connect and to complete each signal (10)",
    )
    run.add_argument(
        "--init-data",
        type=json_arg,
        default=None,
        metavar="JSON",
        help='data sent with init, e.g. \'{"subject": "mouse"}\'',
    )
    run.add_argument(
        "--abort-on-failure",
        action="store_true",
        help="if a rig fails init or start, stop and clean up the others instead of going on",
    )
    backend_option(run)
    run.set_defaults(func=_cmd_run)
    return run  # type: ignore[no-any-return]


_STEPS = ("init", "start", "stop", "cleanup")


@dataclass
class _Rig:
    """One rig's course through ``rignet run``."""

    name: str
    uri: str
    cells: dict[str, str] = field(default_factory=dict)
    """step -> ``ok`` or the failure's short kind."""
    failure: tuple[str, str, str] | None = None
    """(step, kind, explanation) of its first failure."""

    def ok(self, step: str) -> bool:
        return self.cells.get(step) == "ok"


def _cmd_run(args: argparse.Namespace, ui: UI, interrupt: Interrupt) -> int:
    rigs = rigs_from(args)
    run = _Run(
        ui,
        interrupt,
        [_Rig(name, uri) for name, uri in rigs.items()],
        exp_ref=args.exp_ref,
        duration=args.duration,
        timeout=args.timeout,
        init_data=args.init_data,
        abort_on_failure=args.abort_on_failure,
    )
    done, status = run_async(interrupt, args.backend, run.main)
    if not done:
        return ui.interrupted(interrupt)
    assert status is not None
    return status


class _Run:
    """``rignet run``: the experiment, its progress lines and its summary."""

    def __init__(
        self,
        ui: UI,
        interrupt: Interrupt,
        rigs: list[_Rig],
        *,
        exp_ref: str,
        duration: float,
        timeout: float,
        init_data: Any,
        abort_on_failure: bool,
    ) -> None:
        self.ui = ui
        self.interrupt = interrupt
        self.rigs = rigs
        self.exp_ref = exp_ref
        self.duration = duration
        self.timeout = timeout
        self.init_data = init_data
        self.abort_on_failure = abort_on_failure
        self.width = max(len(rig.name) for rig in rigs)

    async def main(self) -> int:
        ui = self.ui
        ui.line(
            f"Running {self.exp_ref} on {len(self.rigs)} rig{'s' * (len(self.rigs) != 1)}: "
            + ", ".join(rig.name for rig in self.rigs),
            progress=True,
        )
        for rig in self.rigs:
            log.info("rig %s at %s", rig.name, rig.uri)
        began = anyio.current_time()
        self.interrupt.note = "while connecting to the rigs"
        async with open_rigs({rig.name: rig.uri for rig in self.rigs}, self.timeout) as opened:
            services, down = opened
            for rig in self.rigs:
                if rig.name in down:
                    self._failed(rig, "init", down[rig.name])
            await self._experiment(services)
        return self._summary(anyio.current_time() - began)

    async def _experiment(self, services: Services) -> None:
        by_name = {rig.name: rig for rig in self.rigs}
        step = "init"
        try:
            for step in _STEPS:
                self.interrupt.note = f"during {step}"
                if step == "init":
                    targets = [rig for rig in self.rigs if rig.name in services]
                elif step == "start":
                    targets = [rig for rig in self.rigs if rig.ok("init")]
                    if self.abort_on_failure and self._any_failed():
                        targets = []
                elif step == "stop":
                    targets = [rig for rig in self.rigs if rig.ok("start")]
                    if targets and self.duration and not self._aborting():
                        await self._record()
                else:  # cleanup: every rig that initialised, whatever happened since
                    targets = [rig for rig in self.rigs if rig.ok("init")]
                if targets:
                    await self._signal(
                        step,
                        Services({r.name: services[r.name] for r in targets}, timeout=self.timeout),
                        by_name,
                    )
        finally:
            if self.interrupt.signum is not None:
                await self._interrupt_started(services, step)

    def _any_failed(self) -> bool:
        return any(rig.failure is not None for rig in self.rigs)

    def _aborting(self) -> bool:
        return self.abort_on_failure and self._any_failed()

    async def _record(self) -> None:
        self.interrupt.note = "while the rigs were running"
        self.ui.line(
            f"{'running':<9} {self.exp_ref} for {self.duration:g} s "
            "(Ctrl-C sends interrupt to the rigs)",
            progress=True,
        )
        await anyio.sleep(self.duration)

    async def _signal(self, step: str, services: Services, by_name: Mapping[str, _Rig]) -> None:
        event = EVENTS[step]
        began = anyio.current_time()
        reported: set[str] = set()

        def arrived(msg: Message, endpoint: EchoProtocol) -> None:
            # Live progress: a rig's line as soon as its completion update arrives.
            if endpoint.name not in reported:
                reported.add(endpoint.name)
                ms = (anyio.current_time() - began) * 1000
                self._line(step, endpoint.name, "ok", f"{ms:6.1f} ms  {_brief(msg.data)}")

        services.assign_callback(event, arrived, return_service=True)
        try:
            calls: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "init": lambda: services.init(self.init_data),
                "start": lambda: services.start(self.exp_ref),
                "stop": lambda: services.stop(),
                "cleanup": lambda: services.cleanup(),
            }
            try:
                responses, failures = await calls[step](), {}
            except ServicesError as error:
                await unless_cancelled()
                responses, failures = error.responses, error.failures
        finally:
            services.clear_callbacks(event, arrived)
        for name in responses:
            by_name[name].cells[step] = "ok"
            if name not in reported:
                ms = (anyio.current_time() - began) * 1000
                self._line(step, name, "ok", f"{ms:6.1f} ms  {_brief(responses[name])}")
        for name, exc in failures.items():
            self._failed(by_name[name], step, exc)

    def _failed(self, rig: _Rig, step: str, exc: BaseException) -> None:
        kind, text = describe(exc)
        rig.cells[step] = kind
        if rig.failure is None:
            rig.failure = (step, kind, text)
        self._line(step, rig.name, kind, text, failed=True)

    def _line(self, step: str, name: str, kind: str, text: str, *, failed: bool = False) -> None:
        mark = self.ui.paint(f"{kind:<8}", "fail" if failed else "ok")
        self.ui.line(f"{step:<9} {name:<{self.width}}  {mark} {text}".rstrip(), progress=True)

    async def _interrupt_started(self, services: Services, step: str) -> None:
        """After Ctrl-C: tell every rig that started and did not stop to stop now."""
        running = [rig for rig in self.rigs if rig.ok("start") and not rig.ok("stop")]
        if step == "start":  # signalled: some may have started without confirming yet
            running = [rig for rig in self.rigs if rig.ok("init") and not rig.ok("stop")]
        running = [rig for rig in running if rig.name in services]
        if not running:
            return
        names = ", ".join(rig.name for rig in running)
        subset = Services({rig.name: services[rig.name] for rig in running}, timeout=self.timeout)
        with anyio.CancelScope(shield=True) as scope:
            scope.deadline = anyio.current_time() + min(self.timeout, _INTERRUPT_GRACE)
            try:
                await subset.stop(immediately=True)
            except ServicesError as exc:
                failed = ", ".join(exc.failures)
                self.interrupt.note += f"; sent interrupt to {names} (not confirmed by {failed})"
                return
        if scope.cancelled_caught:
            self.interrupt.note += (
                f"; sent interrupt to {names} (no answer within {_INTERRUPT_GRACE:g} s)"
            )
        else:
            self.interrupt.note += f"; sent interrupt to {names}"

    def _summary(self, elapsed: float) -> int:
        ui = self.ui
        rows = [["rig", *_STEPS]]
        for rig in self.rigs:
            rows.append([rig.name, *(rig.cells.get(step, "-") for step in _STEPS)])

        def paint(cell: str) -> str:
            word = cell.strip()
            style = "ok" if word == "ok" else "dim" if word == "-" else "fail"
            return ui.paint(cell, style)

        ui.line(progress=True)
        lines = table(rows, paint)
        ui.line(ui.paint(lines[0], "bold"))
        for line in lines[1:]:
            ui.line(line)
        completed = [rig for rig in self.rigs if all(rig.ok(step) for step in _STEPS)]
        failed = [rig for rig in self.rigs if rig.failure is not None]
        if len(completed) == len(self.rigs):
            ui.line(progress=True)
            ui.line(
                f"{self.exp_ref}: {ui.paint('complete', 'ok')} on all {len(self.rigs)} rigs "
                f"in {elapsed:.2f} s."
            )
            return 0
        ui.line(progress=True)
        for rig in failed:
            assert rig.failure is not None
            step, _, text = rig.failure
            ui.line(f"{ui.paint(rig.name, 'fail')} ({rig.uri}): {step}: {text}")
        unreachable = all(
            rig.failure is not None
            and rig.failure[0] == "init"
            and rig.failure[1] in ("down", "no echo", "bad host")
            for rig in self.rigs
        )
        if unreachable:
            ui.line(progress=True)
            ui.line(f"{self.exp_ref}: {ui.paint('no rig could be reached', 'fail')}.")
            return 3
        ui.line(progress=True)
        ui.line(
            f"{self.exp_ref}: {len(completed)} of {len(self.rigs)} rigs completed; "
            f"{ui.paint('failed', 'fail')}: {', '.join(rig.name for rig in failed)}."
        )
        return 1


_INTERRUPT_GRACE = 2.0
"""Seconds ``run`` waits for rigs to confirm the interrupt it sends after Ctrl-C."""


def _brief(data: Any, limit: int = 60) -> str:
    """Completion data as short JSON for a progress line (nothing for ``[null]``)."""
    if data in (None, [None]):
        return ""
    text = json.dumps(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."
