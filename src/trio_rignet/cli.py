"""The ``rignet`` command: run an experiment on real rigs, simulate rigs, send one signal.

``rignet run`` signals init, start, stop and cleanup to the rigs listed in a
rigs file (iblrig's ``remote_devices.yaml`` or a TOML file) or given with
``--rig NAME=URI``; ``rignet demo`` runs a whole experiment against simulated
rigs in this process; ``rignet serve URI`` runs one simulated auxiliary rig;
``rignet send URI EVENT`` sends one signal; ``rignet status`` shows each rig's
state live (or once, with ``--once``). ``python -m trio_rignet`` is the
same command.

Events have one name everywhere on the command line, in ``serve``'s output and
in the simulated rigs' completion data: ``init start stop interrupt cleanup
status info alyx`` (``stop`` is the protocol's EXPEND).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import anyio

from . import __version__
from ._cli_common import (
    EVENTS,
    SIGNAL_EVENTS,
    SIGNALS,
    UI,
    addr,
    backend_option,
    describe,
    json_arg,
    run_async,
    seconds,
    setup_logging,
    timestamp,
    unless_cancelled,
    word,
)
from ._cli_interrupt import Interrupt, signal_name
from ._cli_rigs import RigsError, check_uri
from ._cli_run import add_run_parser
from ._cli_status import add_status_parser
from ._echo import EchoProtocol
from ._errors import RignetError
from ._messages import ExpMessage, ExpStatus, Message
from ._rig import RigService
from ._services import Services, ServicesError

__all__ = ["main"]

# ------------------------------------------------------------------ parser


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: options and positionals in any order.

    ``rignet send URI start --wait 2024-01-01_1_mouse`` works: the parse is
    ``parse_known_intermixed_args``, which plain argparse cannot use on a parser
    with subcommands, so each subcommand's parser does it itself.
    """

    _intermixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _output_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``-v``, ``-q``, ``--log-file``, ``--color``: accepted before and after the command."""
    prefix = "" if top else "sub_"
    group = parser.add_argument_group("output options")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=prefix + "verbose",
        default=0 if top else argparse.SUPPRESS,
        help="log more to stderr: -v info, -vv debug",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        dest=prefix + "quiet",
        default=False if top else argparse.SUPPRESS,
        help="print only results and errors (no progress lines, no warnings)",
    )
    group.add_argument(
        "--log-file",
        metavar="FILE",
        dest=prefix + "log_file",
        default=None if top else argparse.SUPPRESS,
        help="also append timestamped log records and progress lines to FILE",
    )
    group.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        dest=prefix + "color",
        default="auto" if top else argparse.SUPPRESS,
        help="colour the output: auto (default: on a terminal, unless NO_COLOR is set)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rignet",
        description="Signal experiment rigs over a LAN (trio-rignet, wire-compatible with "
        "iblutil.io.net).",
        epilog="Run `rignet COMMAND -h` for a command's options. Exit statuses: 0 success, "
        "1 failure (status: some rig unreachable), 2 bad arguments, 3 (run, status) no rig "
        "reachable, 130 interrupted (Ctrl-C, SIGTERM).",
    )
    version = f"rignet {__version__} (trio-rignet, Python {sys.version.split()[0]})"
    parser.add_argument("--version", action="version", version=version)
    _output_options(parser, top=True)
    sub = parser.add_subparsers(
        title="commands", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    add_run_parser(sub)
    add_status_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="run a whole experiment against simulated rigs on this machine",
        description="Start N simulated rigs on loopback in this process and run a whole "
        "experiment through Services: info, init, start, status, stop, cleanup.",
    )
    demo.add_argument(
        "--rigs", type=_positive_int, default=3, metavar="N", help="number of rigs (3)"
    )
    demo.add_argument(
        "--transport", choices=("udp", "tcp"), default="udp", help="udp (default) or tcp"
    )
    backend_option(demo)
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser(
        "serve",
        help="run a simulated auxiliary rig until interrupted",
        description="Listen on URI, print every signal with a timestamp and answer it with a "
        "completion update. Stop with Ctrl-C or SIGTERM.",
    )
    serve.add_argument("uri", help="local address, e.g. udp://0.0.0.0:11001 or ws://127.0.0.1:0")
    serve.add_argument("--name", help="rig name for output and completion data (default: URI)")
    serve.add_argument(
        "--no-ack", action="store_true", help="echo signals but send no completion update"
    )
    serve.add_argument(
        "--fail-on",
        metavar="EVENT",
        type=_event_arg,
        action="append",
        default=[],
        help="answer this event (e.g. start) with an error report; repeatable",
    )
    backend_option(serve)
    serve.set_defaults(func=_cmd_serve)

    send = sub.add_parser(
        "send",
        help="send one signal to a rig",
        description="Send one signal and print the echo round-trip time; with --wait also the "
        "rig's completion data.",
    )
    send.add_argument("uri", help="the rig's address, e.g. udp://10.0.0.2:11001")
    send.add_argument("event", choices=SIGNALS, metavar="EVENT", help=" | ".join(SIGNALS))
    send.add_argument(
        "arg",
        nargs="?",
        metavar="EXP_REF",
        help="experiment reference for start (e.g. 2024-01-01_1_mouse); status name for "
        "status and info (e.g. RUNNING)",
    )
    send.add_argument("--data", type=json_arg, default=None, metavar="JSON", help="data to send")
    send.add_argument("--wait", action="store_true", help="wait for the rig's completion update")
    send.add_argument(
        "--timeout", type=seconds(), default=5.0, metavar="S", help="seconds to wait (5)"
    )
    backend_option(send)
    send.set_defaults(func=_cmd_send)

    for command in sub.choices.values():
        command.add_argument("--version", action="version", version=version)
        _output_options(command, top=False)
        command.set_defaults(parser=command)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _event_arg(text: str) -> ExpMessage:
    event = EVENTS.get(text.strip().lower())
    if event is None:
        raise argparse.ArgumentTypeError(
            f"unknown event {text!r}; choose one of {', '.join(SIGNALS)}"
        )
    return event


# -------------------------------------------------------------------- main


@dataclass
class _Options:
    verbose: int
    quiet: bool
    log_file: str | None
    colour: str


def _merged_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Options:
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    quiet = args.quiet or getattr(args, "sub_quiet", False)
    if verbose and quiet:
        parser.error("-v and -q cannot be combined: choose more or less output")
    return _Options(
        verbose=verbose,
        quiet=quiet,
        log_file=getattr(args, "sub_log_file", args.log_file),
        colour=getattr(args, "sub_color", args.color),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rignet`` command; return its exit status.

    Args:
        argv: the arguments after ``rignet``; ``None`` reads ``sys.argv``.

    Ctrl-C (SIGINT), SIGTERM and, on Windows, Ctrl-Break cancel the command:
    it prints one line and returns 130, or its usual status if its work had
    already finished. Called with
    ``argv=None`` (as the ``rignet`` command), these signals are ignored once
    the work is done, until the process exits; called with a list, the
    previous signal handlers are restored on return. Bad arguments raise
    ``SystemExit(2)`` (argparse prints the usage).
    """
    interrupt = Interrupt()
    interrupt.install()
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        options = _merged_options(parser, args)
        ui = UI(options.colour, options.quiet)
        command = args.parser.prog.split()[-1]
        try:
            logs = setup_logging(command, options.verbose, options.quiet, options.log_file)
        except OSError as exc:
            args.parser.error(f"cannot open the log file {options.log_file!r}: {exc.strerror}")
        try:
            status: int = args.func(args, ui, interrupt)
        finally:
            logs.close()
        return status
    finally:
        if argv is None:
            interrupt.ignore_from_now_on()
        else:
            interrupt.restore()


# ------------------------------------------------------------------ demo


def _cmd_demo(args: argparse.Namespace, ui: UI, interrupt: Interrupt) -> int:
    done, status = run_async(interrupt, args.backend, partial(_demo, args.rigs, args.transport, ui))
    if not done:
        return ui.interrupted(interrupt)
    assert status is not None
    return status


def _simulated_handler(name: str) -> Callable[[Message], Awaitable[dict[str, Any]]]:
    async def handle(msg: Message) -> dict[str, Any]:
        await anyio.sleep(0.005)  # simulated hardware work
        return {"rig": name, "done": word(msg.event)}

    return handle


async def _demo(n_rigs: int, transport: str, ui: UI) -> int:
    scheme = "udp" if transport == "udp" else "ws"
    names = ["timeline", "video", "ephys", *[f"rig{i}" for i in range(3, n_rigs)]][:n_rigs]
    exp_ref = f"{datetime.date.today().isoformat()}_1_demo_subject"
    async with anyio.create_task_group() as tg:
        uris: dict[str, str] = {}
        for name in names:
            rig = RigService(f"{scheme}://127.0.0.1:0", name=name)
            rig.handle(SIGNAL_EVENTS)(_simulated_handler(name))
            host, port = await tg.start(rig.serve)
            uris[name] = f"{scheme}://{host}:{port}"
        ui.line(f"Started {n_rigs} simulated rigs over {transport.upper()}:", progress=True)
        for name, uri in uris.items():
            ui.line(f"  {name:<10} {uri}", progress=True)
        async with Services.open(uris, timeout=5.0) as services:
            arrived: dict[str, float] = {}

            def record(msg: Message, rig: EchoProtocol) -> None:
                arrived[rig.name] = anyio.current_time()

            services.assign_callback(ExpMessage.any(), record, return_service=True)
            steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
                ("info CONNECTED", lambda: services.info(ExpStatus.CONNECTED)),
                ("init", lambda: services.init({"subject": "demo_subject"})),
                (f"start {exp_ref}", lambda: services.start(exp_ref)),
                ("status RUNNING", lambda: services.status(ExpStatus.RUNNING)),
                ("stop", lambda: services.stop()),
                ("cleanup", lambda: services.cleanup()),
            ]
            total = anyio.current_time()
            for title, step in steps:
                arrived.clear()
                began = anyio.current_time()
                try:
                    responses = await step()
                except ServicesError as exc:
                    await unless_cancelled()
                    tg.cancel_scope.cancel()
                    failures = "; ".join(
                        f"{name}: {describe(error)[1]}" for name, error in exc.failures.items()
                    )
                    return ui.fail(f"{title.split()[0]} failed on {failures}")
                took = anyio.current_time() - began
                ui.line(f"\n== {title} ({took * 1000:.1f} ms) ==", progress=True)
                ui.line(f"  {'rig':<10} {'time':>9}  completion data", progress=True)
                for name, data in responses.items():
                    ms = (arrived.get(name, began) - began) * 1000
                    ui.line(f"  {name:<10} {ms:>6.1f} ms  {json.dumps(data)}", progress=True)
            elapsed = anyio.current_time() - total
        ui.line(progress=True)
        ui.line(
            f"Experiment {exp_ref} complete: 6 steps x {n_rigs} rigs in {elapsed * 1000:.0f} ms."
        )
        tg.cancel_scope.cancel()
    return 0


# ----------------------------------------------------------------- serve


def _cmd_serve(args: argparse.Namespace, ui: UI, interrupt: Interrupt) -> int:
    parser: argparse.ArgumentParser = args.parser
    try:
        check_uri(args.uri, "cannot serve")
    except RigsError as exc:
        parser.error(str(exc))
    try:
        run_async(
            interrupt,
            args.backend,
            partial(_serve, ui, args.uri, args.name, not args.no_ack, args.fail_on),
        )
    except (ValueError, TypeError) as exc:
        return ui.fail(f"cannot serve on {args.uri}: {exc}")
    except OSError as exc:
        return ui.fail(f"cannot serve on {args.uri}: {exc.strerror or exc}")
    if interrupt.signum is not None:
        # Stopping is how serve ends: exit 0.
        ui.line(f"{timestamp()} stopping ({signal_name(interrupt.signum)})")
    return 0


async def _serve(ui: UI, uri: str, name: str | None, ack: bool, fail_on: list[ExpMessage]) -> int:
    rig = RigService(uri, name=name, ack=ack)
    failing = set(fail_on)

    def handle(msg: Message) -> Any:
        host, port = msg.addr or ("?", 0)
        event = word(msg.event)
        ui.line(
            f"{timestamp()} {event} from {addr((host, port))}: {json.dumps(msg.data)}",
            progress=True,
        )
        if msg.event in failing:
            raise RuntimeError(f"simulated failure of {event} (--fail-on {event})")
        return {"rig": rig.name, "done": event}

    rig.handle(SIGNAL_EVENTS)(handle)
    async with rig:
        ui.line(f"{timestamp()} rig {rig.name!r} listening on {rig.local_uri} (Ctrl-C to stop)")
        await anyio.sleep_forever()
    return 0  # pragma: no cover - only a signal ends it


# ------------------------------------------------------------------ send


def _cmd_send(args: argparse.Namespace, ui: UI, interrupt: Interrupt) -> int:
    parser: argparse.ArgumentParser = args.parser
    event: str = args.event
    if args.arg is not None and event not in ("start", "status", "info"):
        parser.error(f"{event} takes no EXP_REF or status; pass its data with --data JSON")
    if args.data is not None and event == "status":
        parser.error("status takes no --data (use info to send a status with data)")
    if event in ("status", "info") and args.arg is None:
        parser.error(f"{event} needs a status, e.g. `rignet send URI {event} RUNNING`")
    if event in ("status", "info"):
        try:
            ExpStatus.validate(int(args.arg) if args.arg.isdigit() else args.arg)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        check_uri(args.uri, "bad URI")
    except RigsError as exc:
        parser.error(str(exc).removeprefix("bad URI: "))
    delivered: list[bool] = []
    try:
        done, status = run_async(
            interrupt,
            args.backend,
            partial(
                _send, ui, args.uri, event, args.arg, args.data, args.wait, args.timeout, delivered
            ),
        )
    except (RignetError, OSError, ValueError) as exc:
        return ui.fail(f"{args.uri}: {describe(exc)[1]}")
    if not done:
        # Interrupted while listening for the completion update after a confirmed
        # send without --wait: the work was done.
        return 0 if delivered else ui.interrupted(interrupt)
    assert status is not None
    return status


async def _send(
    ui: UI,
    uri: str,
    event: str,
    arg: str | None,
    data: Any,
    wait: bool,
    timeout: float,
    delivered: list[bool],
) -> int:
    status: Any = int(arg) if arg is not None and arg.isdigit() else arg
    async with EchoProtocol.client(uri, name=uri, echo_timeout=timeout) as rig:
        if wait:
            services = Services([rig], timeout=timeout)
            calls: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
                "init": lambda: services.init(data),
                "start": lambda: services.start(arg, data),
                "stop": lambda: services.stop(data),
                "interrupt": lambda: services.stop(data, immediately=True),
                "cleanup": lambda: services.cleanup(data),
                "status": lambda: services.status(status),
                "info": lambda: services.info(status, data),
            }
            try:
                responses = await calls[event]()
            except ServicesError as exc:
                await unless_cancelled()
                return ui.fail(f"{uri}: {describe(next(iter(exc.failures.values())))[1]}")
            ui.line(f"echo round trip: {rig.stats.rtt_max * 1000:.2f} ms")
            ui.line(f"completion: {json.dumps(responses[uri])}")
            return 0
        sends: dict[str, Callable[[], Awaitable[None]]] = {
            "init": lambda: rig.init(data),
            "start": lambda: rig.start(arg, data),
            "stop": lambda: rig.stop(data),
            "interrupt": lambda: rig.stop(data, immediately=True),
            "cleanup": lambda: rig.cleanup(data),
            "status": lambda: rig.status(status),
            "info": lambda: rig.info(status, data),
        }
        # A rig answers each signal with a completion update, which it expects us
        # to confirm (this endpoint echoes it on arrival). Listen briefly for it,
        # so that a quick rig does not log an unconfirmed reply after we left.
        async with rig.subscribe(EVENTS[event]) as replies:
            await sends[event]()
            ui.line(f"echo round trip: {rig.stats.rtt_max * 1000:.2f} ms")
            delivered.append(True)
            with anyio.move_on_after(min(timeout, _SEND_LINGER)):
                async for _ in replies:
                    break
    return 0


_SEND_LINGER = 1.0
"""Seconds ``send`` without ``--wait`` listens for the rig's completion update."""
