"""A rig or main PC running the reference implementation, iblutil 1.20.0.

The interop tests drive this peer in two ways:

* as a subprocess with its own asyncio loop (Trio backend)::

      python ibl_peer.py '{"role": "server", "scheme": "udp", "endpoints": [{"name": "rig0"}]}'

  It prints one JSON record per line on stdout and reads one JSON command per
  line on stdin; it exits when stdin is closed;
* inside the test's own asyncio loop (asyncio backend), through
  :class:`IblHarness` with an ``emit`` function instead of stdout.

Configuration (a JSON object)::

    role       "server" (each endpoint listens on a free loopback port) or
               "client" (each endpoint talks to its "target" URI)
    scheme     "udp" or "ws" (iblutil's plain TCP)
    endpoints  [{"name": "rig0", "target": "udp://127.0.0.1:PORT" (client only),
                 "answer": false, "raise_on": [event codes], "record_raw": false}, ...]
    services   true: also build an iblutil ``Services`` over the endpoints, named
               "services" in commands
    services_timeout  Services' completion timeout in seconds (default 10)

``answer``: on every signal the endpoint immediately sends the same event back
with its own communicator method (``await com.init(...)``), carrying
``{"rig": name, "got": <data received>}``: a rig that completes at once.
``raise_on``: the endpoint's callback for these events raises ``ValueError``.
``record_raw``: record every chunk of bytes the endpoint's protocol receives (a
datagram, or what one TCP read returned), before iblutil sees it.

Records (JSON objects, key "type"):

    ready      {"endpoints": {name: uri}}: listening (server) or connected
    recv       {"ep", "event", "data", "addr"}: a callback saw a message
               (event 0 is an error report from the other side)
    confirmed  {"ep", "event"}: a confirmed send of the endpoint got its echo
    raw        {"ep", "data" (base64), "addr"}: bytes received (``record_raw``)
    answered   {"ep", "event", "error"}: an ``answer`` completion finished
               (error is null or "Type: text")
    log        {"logger", "level", "msg"}: an iblutil log record, WARNING and up
    done       {"id", "result"} or {"id", "error"}: a command finished

Commands (JSON objects)::

    {"id": 1, "ep": "rig0", "call": "init", "args": [...], "kwargs": {...}}

calls that communicator method (or the Services method with ``"ep": "services"``)
and awaits it. ``addr`` lists become tuples; an ``alyx`` argument given as
``{"base_url", "user", "token"}`` becomes a logged-in Alyx stand-in. The extra
call ``send_many`` (args ``[messages, joined]``, kwarg ``addr``) writes several
messages back to back with ``send`` (one write if ``joined``), without
awaiting echoes, then waits until the other side has echoed them all
(consuming those echoes, which iblutil would otherwise take for new messages
and echo back forever).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import socket
import sys
from collections.abc import Callable
from functools import partial
from types import SimpleNamespace
from typing import Any

from iblutil.io.net import app, base

Record = dict[str, Any]

SIGNALS = (1, 2, 4, 8, 16, 32, 64, 128)
LOOPBACK = "127.0.0.1"


def free_port(scheme: str) -> int:
    """A loopback port free right now (bound, then released)."""
    kind = socket.SOCK_DGRAM if scheme == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _alyx(value: Any) -> Any:
    """A logged-in stand-in for ``one.webclient.AlyxClient`` from a dict."""
    if isinstance(value, dict):
        return SimpleNamespace(
            base_url=value["base_url"], user=value["user"], _token=value["token"], is_logged_in=True
        )
    return value


class _Swallow:
    """Echoes expected for messages sent with ``send_many``."""

    def __init__(self, remaining: bytes) -> None:
        self.remaining = remaining
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _LogForwarder(logging.Handler):
    def __init__(self, emit: Callable[[Record], None]) -> None:
        super().__init__(logging.WARNING)
        self._emit = emit

    def emit(self, record: logging.LogRecord) -> None:
        self._emit(
            {
                "type": "log",
                "logger": record.name,
                "level": record.levelname,
                "msg": record.getMessage(),
            }
        )


class IblHarness:
    """Open iblutil endpoints per a configuration and report what they see."""

    _serial = 0

    def __init__(self, config: dict[str, Any], emit: Callable[[Record], None]) -> None:
        self.config = config
        self.emit = emit
        self.scheme: str = config.get("scheme", "udp")
        self.coms: dict[str, app.EchoProtocol] = {}
        self.uris: dict[str, str] = {}
        self.services: app.Services | None = None
        self._transports: list[asyncio.BaseTransport] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._swallow: dict[str, _Swallow] = {}
        IblHarness._serial += 1
        # A logger of our own: iblutil's _setup_log would add a stdout handler.
        self.logger = logging.getLogger(f"ibl.peer{IblHarness._serial}")
        self.logger.setLevel(logging.WARNING)
        self._handler = _LogForwarder(emit)
        self.logger.addHandler(self._handler)

    # ----------------------------------------------------------------- opening

    async def open(self) -> dict[str, str]:
        """Open every endpoint; return name -> URI (a server's own, a client's target)."""
        role = self.config["role"]
        for spec in self.config["endpoints"]:
            name = spec["name"]
            log = self.logger.getChild(name)
            if role == "server":
                com, uri = await self._open_server(name, log)
            else:
                uri = spec["target"]
                com = await app.EchoProtocol.client(uri, name=name, log=log)
                if com._transport is not None:
                    self._transports.append(com._transport)
            self.coms[name] = com
            self.uris[name] = uri
            self._instrument(name, com, spec)
        if self.config.get("services"):
            self.services = app.Services(
                list(self.coms.values()), timeout=self.config.get("services_timeout", 10.0)
            )
        return dict(self.uris)

    async def _open_server(self, name: str, log: logging.Logger) -> tuple[app.EchoProtocol, str]:
        # iblutil rejects port 0: pick a free port, retry if someone took it meanwhile.
        for attempt in range(20):
            uri = f"{self.scheme}://{LOOPBACK}:{free_port(self.scheme)}"
            try:
                com = await app.EchoProtocol.server(uri, name=name, log=log)
            except OSError:
                if attempt == 19:
                    raise
                continue
            if com._transport is not None:  # UDP: the datagram transport
                self._transports.append(com._transport)
            return com, uri
        raise AssertionError("unreachable")

    def _instrument(self, name: str, com: app.EchoProtocol, spec: dict[str, Any]) -> None:
        # Callbacks run in registration order; one that raises stops the rest,
        # so the recorder goes first.
        for code in (0, *SIGNALS):
            com.assign_callback(base.ExpMessage(code), partial(self._record, name, code))
        for code in spec.get("raise_on", ()):
            com.assign_callback(base.ExpMessage(code), partial(self._raise, name, code))
        if spec.get("answer"):
            for code in SIGNALS:
                com.assign_callback(base.ExpMessage(code), partial(self._answer, name, com, code))

        original_send = com.confirmed_send

        async def confirmed_send(data: Any, addr: Any = None, timeout: Any = None) -> None:
            await original_send(data, addr=addr, timeout=timeout)
            event = json.loads(com.encode(data))[0]
            self.emit({"type": "confirmed", "ep": name, "event": event})

        com.confirmed_send = confirmed_send  # type: ignore[method-assign]

        original_receive = com._receive
        record_raw = bool(spec.get("record_raw"))

        def receive(data: bytes, addr: Any) -> None:
            if record_raw:
                encoded = base64.b64encode(data).decode()
                self.emit({"type": "raw", "ep": name, "data": encoded, "addr": list(addr[:2])})
            swallow = self._swallow.get(name)
            if swallow is not None and swallow.remaining:
                if swallow.remaining.startswith(data):
                    swallow.remaining, data = swallow.remaining[len(data) :], b""
                elif data.startswith(swallow.remaining):
                    data, swallow.remaining = data[len(swallow.remaining) :], b""
                if not swallow.remaining and not swallow.future.done():
                    swallow.future.set_result(None)
                if not data:
                    return
            original_receive(data, addr)

        com._receive = receive  # type: ignore[method-assign]

        if com.Server is not None:
            # iblutil's TCP server shares this protocol object between all its
            # connections; keep every transport so that all get closed.
            original_made = com.connection_made

            def connection_made(transport: asyncio.BaseTransport) -> None:
                self._transports.append(transport)
                original_made(transport)

            com.connection_made = connection_made  # type: ignore[method-assign]

    # --------------------------------------------------------------- callbacks

    def _record(self, name: str, code: int, data: Any, addr: Any) -> None:
        self.emit(
            {
                "type": "recv",
                "ep": name,
                "event": code,
                "data": _jsonable(data),
                "addr": list(addr[:2]),
            }
        )

    def _raise(self, name: str, code: int, data: Any, addr: Any) -> None:
        raise ValueError(f"{name} refuses {base.ExpMessage(code).name}: caméra non prête ✗")

    def _answer(self, name: str, com: app.EchoProtocol, code: int, data: Any, addr: Any) -> None:
        if code == base.ExpMessage.ALYX:
            return  # no completion for a token
        task = asyncio.ensure_future(self._send_answer(name, com, code, data, tuple(addr[:2])))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_answer(
        self, name: str, com: app.EchoProtocol, code: int, data: list[Any], addr: Any
    ) -> None:
        target = addr if com.role == "server" else None
        error = None
        try:
            if code == base.ExpMessage.EXPINIT:
                await com.init({"rig": name, "got": data[0]}, addr=target)
            elif code == base.ExpMessage.EXPSTART:
                await com.start(data[0], {"rig": name, "got": data[1]}, addr=target)
            elif code in (base.ExpMessage.EXPEND, base.ExpMessage.EXPINTERRUPT):
                immediately = code == base.ExpMessage.EXPINTERRUPT
                await com.stop({"rig": name, "got": data[0]}, immediately, addr=target)
            elif code == base.ExpMessage.EXPCLEANUP:
                await com.cleanup({"rig": name, "got": data[0]}, addr=target)
            elif code == base.ExpMessage.EXPSTATUS:
                await com.status(data[0], addr=target)
            elif code == base.ExpMessage.EXPINFO:
                await com.info(data[0], {"rig": name, "got": data[1]}, addr=target)
        except Exception as exc:
            error = _error_text(exc)
        self.emit({"type": "answered", "ep": name, "event": code, "error": error})

    # ---------------------------------------------------------------- commands

    async def execute(self, command: dict[str, Any]) -> Record:
        """Run one command; return its ``done`` record (never raises)."""
        try:
            result = await self._execute(command)
        except Exception as exc:
            return {"type": "done", "id": command.get("id"), "error": _error_text(exc)}
        return {"type": "done", "id": command.get("id"), "result": _jsonable(result)}

    async def _execute(self, command: dict[str, Any]) -> Any:
        ep = command["ep"]
        method = command["call"]
        args = list(command.get("args", ()))
        kwargs = dict(command.get("kwargs", {}))
        if kwargs.get("addr") is not None:
            kwargs["addr"] = tuple(kwargs["addr"])
        if method == "alyx":
            if args:
                args[0] = _alyx(args[0])
            if "alyx" in kwargs:
                kwargs["alyx"] = _alyx(kwargs["alyx"])
        if ep == "services":
            assert self.services is not None, "configure services: true"
            target: Any = self.services
        else:
            target = self.coms[ep]
        if method == "send_many":
            return await self._send_many(ep, target, *args, **kwargs)
        result = getattr(target, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _send_many(
        self,
        name: str,
        com: app.EchoProtocol,
        messages: list[Any],
        joined: bool = False,
        addr: Any = None,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        payloads = [com.encode(message) for message in messages]
        swallow = self._swallow[name] = _Swallow(b"".join(payloads))
        try:
            if joined:
                com.send(b"".join(payloads), addr)
            else:
                for payload in payloads:
                    com.send(payload, addr)
            await asyncio.wait_for(swallow.future, timeout)
        finally:
            del self._swallow[name]
        return {"sent": len(payloads), "echoed": True}

    # ----------------------------------------------------------------- closing

    async def close(self) -> None:
        """Cancel answer tasks, close every endpoint, server and transport."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for com in self.coms.values():
            com.close()
        for transport in self._transports:
            transport.close()
        for com in self.coms.values():
            if com.Server is not None:
                com.Server.close()
                await com.Server.wait_closed()
        await asyncio.sleep(0)  # let the transports run connection_lost
        await asyncio.sleep(0)
        self.logger.removeHandler(self._handler)


# ------------------------------------------------------------------ subprocess


def _print(record: Record) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _main(config: dict[str, Any]) -> None:
    harness = IblHarness(config, _print)
    tasks: set[asyncio.Task[Any]] = set()

    async def run(command: dict[str, Any]) -> None:
        _print(await harness.execute(command))

    try:
        _print({"type": "ready", "endpoints": await harness.open()})
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 24)  # a command may carry a large message
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            task = asyncio.ensure_future(run(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await harness.close()


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    asyncio.run(_main(json.loads(sys.argv[1])))
