"""The ``rignet`` command: a demo experiment, a rig simulator and a one-shot sender.

``rignet demo`` runs a whole experiment against simulated rigs in this process;
``rignet serve URI`` runs one simulated auxiliary rig; ``rignet send URI EVENT``
sends one signal. ``python -m trio_rignet`` is the same command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import anyio

from ._echo import EchoProtocol
from ._errors import RignetError
from ._messages import ExpMessage, ExpStatus, Message
from ._rig import RigService
from ._services import Services, ServicesError

__all__ = ["main"]

_SIGNALS = ("init", "start", "stop", "interrupt", "cleanup", "status", "info")
# Every event but ALYX, which a simulated rig does not answer (it has no token).
_SIGNAL_EVENTS = ExpMessage.any() & ~ExpMessage.ALYX


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rignet`` command; return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, quiet=args.func is _cmd_send)
    try:
        result: int = args.func(parser, args)
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rignet",
        description="Signal experiment rigs over a LAN (trio-rignet, wire-compatible with "
        "iblutil.io.net).",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)"
    )
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

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
    demo.add_argument(
        "--backend", choices=("trio", "asyncio"), default="trio", help="event loop (trio)"
    )
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser(
        "serve",
        help="run a simulated auxiliary rig until interrupted",
        description="Listen on URI, log every signal and answer it with a completion update. "
        "Stop with Ctrl-C.",
    )
    serve.add_argument("uri", help="local address, e.g. udp://0.0.0.0:11001 or ws://127.0.0.1:0")
    serve.add_argument("--name", help="rig name for logs")
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
    serve.set_defaults(func=_cmd_serve)

    send = sub.add_parser(
        "send",
        help="send one signal to a rig",
        description="Send one signal and print the echo round-trip time; with --wait also the "
        "rig's completion data.",
    )
    send.add_argument("uri", help="the rig's address, e.g. udp://10.0.0.2:11001")
    send.add_argument("event", choices=_SIGNALS, metavar="EVENT", help=" | ".join(_SIGNALS))
    send.add_argument(
        "arg",
        nargs="?",
        metavar="EXP_REF",
        help="experiment reference for start (e.g. 2024-01-01_1_mouse); status name for "
        "status and info (e.g. RUNNING)",
    )
    send.add_argument("--data", type=_json_arg, default=None, metavar="JSON", help="data to send")
    send.add_argument("--wait", action="store_true", help="wait for the rig's completion update")
    send.add_argument(
        "--timeout", type=_positive_float, default=5.0, metavar="S", help="seconds to wait (5)"
    )
    send.set_defaults(func=_cmd_send, subparser=send)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds as a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"invalid JSON ({exc}); quote it for the shell, e.g. --data '{{\"key\": 1}}'"
        ) from None


def _event_arg(text: str) -> ExpMessage:
    try:
        return ExpMessage.validate(text, allow_bitwise=False)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _setup_logging(verbose: int, quiet: bool) -> None:
    if quiet and not verbose:
        # `send` reports failures itself, in one line.
        logging.getLogger("trio_rignet").addHandler(logging.NullHandler())
        logging.getLogger("trio_rignet").propagate = False
        return
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _label(event: ExpMessage) -> str:
    """``"init"`` for EXPINIT, ``"alyx"`` for ALYX."""
    return str(event.name).lower().removeprefix("exp")


def _fail(message: str) -> int:
    print(f"rignet: error: {message}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- demo


def _cmd_demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    return anyio.run(_demo, args.rigs, args.transport, sys.stdout, backend=args.backend)


def _simulated_handler(name: str) -> Callable[[Message], Awaitable[dict[str, Any]]]:
    async def handle(msg: Message) -> dict[str, Any]:
        await anyio.sleep(0.005)  # simulated hardware work
        return {"rig": name, "done": _label(msg.event)}

    return handle


async def _demo(n_rigs: int, transport: str, out: TextIO) -> int:
    scheme = "udp" if transport == "udp" else "ws"
    names = ["timeline", "video", "ephys", *[f"rig{i}" for i in range(3, n_rigs)]][:n_rigs]
    exp_ref = f"{datetime.date.today().isoformat()}_1_demo_subject"
    async with anyio.create_task_group() as tg:
        uris: dict[str, str] = {}
        for name in names:
            rig = RigService(f"{scheme}://127.0.0.1:0", name=name)
            rig.handle(_SIGNAL_EVENTS)(_simulated_handler(name))
            host, port = await tg.start(rig.serve)
            uris[name] = f"{scheme}://{host}:{port}"
        print(f"Started {n_rigs} simulated rigs over {transport.upper()}:", file=out)
        for name, uri in uris.items():
            print(f"  {name:<10} {uri}", file=out)
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
                    print(f"rignet: error: {exc}", file=sys.stderr)
                    tg.cancel_scope.cancel()
                    return 1
                took = anyio.current_time() - began
                print(f"\n== {title} ({took * 1000:.1f} ms) ==", file=out)
                print(f"  {'rig':<10} {'time':>9}  completion data", file=out)
                for name, data in responses.items():
                    ms = (arrived.get(name, began) - began) * 1000
                    print(f"  {name:<10} {ms:>6.1f} ms  {json.dumps(data)}", file=out)
            elapsed = anyio.current_time() - total
        print(
            f"\nExperiment {exp_ref} complete: 6 steps x {n_rigs} rigs in {elapsed * 1000:.0f} ms.",
            file=out,
        )
        tg.cancel_scope.cancel()
    return 0


# --------------------------------------------------------------------- serve


def _cmd_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        return anyio.run(_serve, args.uri, args.name, not args.no_ack, args.fail_on)
    except (ValueError, TypeError) as exc:
        parser.error(f"cannot serve on {args.uri}: {exc}")  # a bad URI: usage error, like send
    except OSError as exc:
        return _fail(f"cannot serve on {args.uri}: {exc}")


async def _serve(uri: str, name: str | None, ack: bool, fail_on: list[ExpMessage]) -> int:
    rig = RigService(uri, name=name, ack=ack)
    failing = set(fail_on)

    def handle(msg: Message) -> Any:
        host, port = msg.addr or ("?", 0)
        print(f"{msg.event.name} from {host}:{port}: {json.dumps(msg.data)}", flush=True)
        if msg.event in failing:
            raise RuntimeError(f"simulated failure of {msg.event.name} (--fail-on)")
        return {"rig": rig.name, "done": _label(msg.event)}

    rig.handle(_SIGNAL_EVENTS)(handle)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with rig:
            print(f"rig {rig.name!r} listening on {rig.local_uri} (Ctrl-C to stop)", flush=True)
            async for signum in signals:
                print(f"stopping ({signal.Signals(signum).name})", flush=True)
                break
    return 0


# ---------------------------------------------------------------------- send


def _cmd_send(top: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    parser: argparse.ArgumentParser = args.subparser
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
        return anyio.run(_send, args.uri, event, args.arg, args.data, args.wait, args.timeout)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    except (RignetError, OSError) as exc:
        return _fail(str(exc))


async def _send(
    uri: str, event: str, arg: str | None, data: Any, wait: bool, timeout: float
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
                return _fail(str(next(iter(exc.failures.values()))))
            print(f"echo round trip: {rig.stats.rtt_max * 1000:.2f} ms")
            print(f"completion: {json.dumps(responses[uri])}")
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
        await sends[event]()
        print(f"echo round trip: {rig.stats.rtt_max * 1000:.2f} ms")
    return 0
