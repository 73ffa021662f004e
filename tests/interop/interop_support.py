"""Support for the interop tests: an iblutil peer on either backend, payloads, links.

:func:`open_ibl_peer` yields an :class:`IblPeer`, the same interface whether
iblutil runs in a subprocess (used on Trio, which cannot host asyncio code) or
inside the test's own asyncio loop (used on the asyncio backend, mixing both
libraries in one loop). The peer collects the records described in
``ibl_peer.py``; tests wait for them with :meth:`IblPeer.expect` and send
commands with :meth:`IblPeer.call`.

:func:`open_link` connects one trio-rignet endpoint and one iblutil endpoint,
either side listening. :data:`SIGNALS` lists every signal with the data it must
arrive with.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

from trio_rignet import EchoProtocol, ExpMessage, Message

PEER_SCRIPT = Path(__file__).with_name("ibl_peer.py")
LOOPBACK = "127.0.0.1"
WAIT = 5.0
"""Seconds any single wait may take before the test fails (a safety net only)."""

Record = dict[str, Any]


class IblCallError(Exception):
    """A command run by the iblutil peer raised: ``text`` is ``"Type: message"``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclass
class FakeAlyx:
    """Duck-typed logged-in ``one.webclient.AlyxClient`` for trio-rignet."""

    base_url: str = "https://alyx.example.org"
    user: str = "expérimentatrice"
    _token: str = "jeton-Ω-0123456789abcdef"
    is_logged_in: bool = True

    def as_command(self) -> dict[str, str]:
        """The same client as an ``ibl_peer`` command argument."""
        return {"base_url": self.base_url, "user": self.user, "token": self._token}


def uri_of(endpoint: EchoProtocol) -> str:
    """The URI a peer reaches ``endpoint`` at (its real port, port 0 resolved)."""
    host, port = endpoint.local_address
    return f"{endpoint.protocol}://{host}:{port}"


@dataclass
class IblPeer:
    """Records from, and commands to, an iblutil peer."""

    mode: str
    endpoints: dict[str, str] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    _consumed: set[int] = field(default_factory=set)
    _changed: anyio.Event = field(default_factory=anyio.Event)
    _closed: str | None = None
    _proc: Process | None = None
    _harness: Any = None
    _calls: dict[int, Record] = field(default_factory=dict)
    _next_id: int = 0
    _stderr: bytearray = field(default_factory=bytearray)
    _loop_errors: list[dict[str, Any]] = field(default_factory=list)

    # ---------------------------------------------------------------- records

    def add(self, record: Record) -> None:
        if record.get("type") == "done" and record.get("id") is not None:
            self._calls[record["id"]] = record
        else:
            self.records.append(record)
        self._changed.set()
        self._changed = anyio.Event()

    def mark_closed(self, why: str) -> None:
        self._closed = why
        self._changed.set()

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace")

    def _dead(self) -> AssertionError:
        return AssertionError(f"iblutil peer is gone ({self._closed}); stderr:\n{self.stderr}")

    def find(self, **fields: Any) -> list[Record]:
        """Every record (consumed or not) whose fields equal ``fields``."""
        return [r for r in self.records if all(r.get(k) == v for k, v in fields.items())]

    async def expect(self, timeout: float = WAIT, **fields: Any) -> Record:
        """The first not yet consumed record matching ``fields``; waits for it."""
        with anyio.fail_after(timeout):
            while True:
                for index, record in enumerate(self.records):
                    if index not in self._consumed and all(
                        record.get(k) == v for k, v in fields.items()
                    ):
                        self._consumed.add(index)
                        return record
                if self._closed is not None:
                    raise self._dead()
                await self._changed.wait()

    async def expect_recv(self, ep: str, event: int, timeout: float = WAIT) -> Record:
        return await self.expect(timeout, type="recv", ep=ep, event=event)

    # --------------------------------------------------------------- commands

    async def call(self, ep: str, method: str, *args: Any, timeout: float = WAIT, **kw: Any) -> Any:
        """Run ``ep.method(*args, **kw)`` in the peer (``ep="services"``: its Services).

        Returns the JSON result; raises :class:`IblCallError` if it raised.
        """
        self._next_id += 1
        command = {"id": self._next_id, "ep": ep, "call": method, "args": args, "kwargs": kw}
        # Both modes round-trip the command through JSON, so they see the same values.
        command = json.loads(json.dumps(command))
        with anyio.fail_after(timeout):
            if self._harness is not None:
                done = await self._harness.execute(command)
            else:
                assert self._proc is not None
                assert self._proc.stdin is not None
                try:
                    await self._proc.stdin.send(json.dumps(command).encode() + b"\n")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    with anyio.move_on_after(1):  # let its stderr be read
                        while self._closed is None:
                            await self._changed.wait()
                    raise self._dead() from None
                while command["id"] not in self._calls:
                    if self._closed is not None:
                        raise self._dead()
                    await self._changed.wait()
                done = self._calls.pop(command["id"])
        if "error" in done:
            raise IblCallError(done["error"])
        return done["result"]

    async def send_many(
        self, ep: str, messages: list[Any], *, joined: bool, addr: Any = None
    ) -> Any:
        """Write ``messages`` back to back (one write if ``joined``); wait for their echoes."""
        return await self.call(ep, "send_many", messages, joined, addr=addr)


def _backend_mode(anyio_backend: object) -> str:
    name = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]  # type: ignore[index]
    return "subprocess" if name == "trio" else "inloop"


@asynccontextmanager
async def open_ibl_peer(mode: str, config: dict[str, Any]) -> AsyncIterator[IblPeer]:
    """Start an iblutil peer with ``config`` (see ``ibl_peer.py``); stop it on exit.

    ``mode`` is ``"subprocess"`` or ``"inloop"`` (asyncio backend only).
    """
    peer = IblPeer(mode)
    if mode == "inloop":
        import ibl_peer  # the test directory is on sys.path (rootdir-less import mode)

        harness = ibl_peer.IblHarness(config, peer.add)
        peer._harness = harness
        loop = asyncio.get_running_loop()
        handler = loop.get_exception_handler()
        # Errors asyncio would only log (an exception in a callback of iblutil's
        # protocol, a task that failed unobserved) fail the test instead.
        loop.set_exception_handler(lambda _, context: peer._loop_errors.append(context))
        try:
            with anyio.fail_after(WAIT):
                peer.endpoints = await harness.open()
            yield peer
        finally:
            with anyio.CancelScope(shield=True), anyio.fail_after(WAIT):
                await harness.close()
            loop.set_exception_handler(handler)
        assert not peer._loop_errors, f"errors in the asyncio loop: {peer._loop_errors}"
        return

    env = dict(os.environ)
    env.pop("PYTHONDEVMODE", None)  # the peer's own asyncio debug output is noise here
    proc = await anyio.open_process(
        [sys.executable, "-u", str(PEER_SCRIPT), json.dumps(config)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    peer._proc = proc
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_records, proc, peer)
            tg.start_soon(_drain_stderr, proc, peer)
            try:
                ready = await peer.expect(WAIT, type="ready")
                peer.endpoints = ready["endpoints"]
                yield peer
            finally:
                await _stop(proc, tg)
    finally:
        with anyio.CancelScope(shield=True):
            await proc.aclose()
    # The peer exited on its own, without an unhandled error.
    assert proc.returncode == 0, f"iblutil peer exited with {proc.returncode}:\n{peer.stderr}"
    for sign in _TROUBLE:
        assert sign not in peer.stderr, f"iblutil peer reported trouble:\n{peer.stderr}"


_TROUBLE = ("Traceback", "Exception in callback", "never retrieved", "Task was destroyed")


async def _read_records(proc: Process, peer: IblPeer) -> None:
    assert proc.stdout is not None
    lines = BufferedByteReceiveStream(proc.stdout)
    try:
        while True:
            line = await lines.receive_until(b"\n", 1 << 24)
            peer.add(json.loads(line))
    except (anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
        peer.mark_closed("stdout closed")


async def _drain_stderr(proc: Process, peer: IblPeer) -> None:
    assert proc.stderr is not None
    try:
        async for chunk in proc.stderr:
            peer._stderr += chunk
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass


async def _stop(proc: Process, tg: TaskGroup) -> None:
    """Close the peer's stdin (it then closes its endpoints and exits); kill if it hangs."""
    with anyio.CancelScope(shield=True):
        assert proc.stdin is not None
        await proc.stdin.aclose()
        with anyio.move_on_after(WAIT):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        tg.cancel_scope.cancel()


@asynccontextmanager
async def ibl_peer_for(anyio_backend: object, config: dict[str, Any]) -> AsyncIterator[IblPeer]:
    """:func:`open_ibl_peer` in the mode that suits the backend under test."""
    async with open_ibl_peer(_backend_mode(anyio_backend), config) as peer:
        yield peer


# ------------------------------------------------------------------ payloads

DATA: dict[str, Any] = {
    "subject": "souris_é",
    "notes": "Maus Ω 🐭, naïve café",
    "nested": {"深さ": [1, 2.5, None, True, False, {"k": [[], {}]}], "empty": {}},
    # Brackets, quotes and backslashes inside strings: TCP framing must not care.
    "tricky": '[not] a "frame" \\ ]]} {[',
    "count": -3,
}
"""Nested JSON with non-ASCII text, sent with every signal."""

EXP_REF = "2022-01-01_1_subject"
EXP_REF_DICT = {"date": "2024-05-06", "sequence": 3, "subject": "souris_é"}
EXP_REF_DICT_WIRE = "2024-05-06_3_souris_é"


@dataclass(frozen=True)
class Signal:
    """One signal: the method call (same on both libraries) and what must arrive."""

    label: str
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    event: ExpMessage
    data: list[Any]
    """The message's elements after the event code, as both libraries deliver them."""


SIGNALS: tuple[Signal, ...] = (
    Signal("init", "init", (DATA,), {}, ExpMessage.EXPINIT, [DATA]),
    Signal("start-str", "start", (EXP_REF, DATA), {}, ExpMessage.EXPSTART, [EXP_REF, DATA]),
    Signal(
        "start-dict",
        "start",
        (EXP_REF_DICT,),
        {},
        ExpMessage.EXPSTART,
        [EXP_REF_DICT_WIRE, None],
    ),
    Signal("stop", "stop", (DATA,), {}, ExpMessage.EXPEND, [DATA]),
    Signal("interrupt", "stop", (DATA,), {"immediately": True}, ExpMessage.EXPINTERRUPT, [DATA]),
    Signal("cleanup", "cleanup", ("Fertig ✓",), {}, ExpMessage.EXPCLEANUP, ["Fertig ✓"]),
    Signal("status", "status", (20,), {}, ExpMessage.EXPSTATUS, [20]),
    Signal("status-name", "status", ("INITIALIZED",), {}, ExpMessage.EXPSTATUS, [10]),
    Signal("info", "info", ("STOPPED", DATA), {}, ExpMessage.EXPINFO, [30, DATA]),
)
"""Every signal but Alyx (which needs an Alyx client or a reply: tested on its own)."""


def completion(signal: Signal, rig: str) -> list[Any]:
    """What a rig answering ``signal`` at once sends back (after the event code).

    Both the iblutil rigs of ``ibl_peer.py`` (``answer``) and the trio-rignet
    rigs of the tests answer with ``{"rig": name, "got": <data received>}``;
    a status is answered with the same status.
    """
    got = {"rig": rig, "got": signal.data[-1]}
    if signal.event == ExpMessage.EXPSTART:
        return [signal.data[0], got]
    if signal.event == ExpMessage.EXPSTATUS:
        return list(signal.data)
    if signal.event == ExpMessage.EXPINFO:
        return [signal.data[0], got]
    return [got]


async def next_message(messages: AsyncIterator[Message], timeout: float = WAIT) -> Message:
    """The next message of a subscription (bounded wait)."""
    with anyio.fail_after(timeout):
        return await messages.__anext__()


# --------------------------------------------------------------------- links


@dataclass
class Link:
    """A trio-rignet endpoint and an iblutil endpoint talking to each other.

    Attributes:
        rig: the trio-rignet endpoint.
        peer: the iblutil peer; its endpoint is named :attr:`ep`.
        rig_addr: ``addr`` for trio-rignet sends (None when it is the client).
        peer_addr: ``addr`` for iblutil sends (None when it is the client).
    """

    rig: EchoProtocol
    peer: IblPeer
    ep: str
    rig_addr: tuple[str, int] | None
    peer_addr: list[Any] | None
    rignet_listens: bool


@asynccontextmanager
async def open_link(
    open_ibl: Any, scheme: str, rignet_listens: bool, **ibl_options: Any
) -> AsyncIterator[Link]:
    """Connect trio-rignet and iblutil over ``scheme``, the one or the other listening.

    The connecting side first sends a status, confirmed: then a TCP connection
    is surely accepted on both sides and the listening side knows the
    connecting side's address. ``ibl_options`` go into the iblutil endpoint's
    configuration (``raise_on``, ``answer``).
    """
    ep = "ibl"
    if rignet_listens:
        async with EchoProtocol.server(f"{scheme}://{LOOPBACK}:0", name="rignet") as rig:
            config = {
                "role": "client",
                "scheme": scheme,
                "endpoints": [{"name": ep, "target": uri_of(rig), **ibl_options}],
            }
            async with open_ibl(config) as peer:
                async with rig.subscribe(ExpMessage.EXPSTATUS) as hello:
                    await peer.call(ep, "status", 0)
                    msg = await next_message(hello)
                assert msg.addr is not None
                await peer.expect(type="confirmed", ep=ep, event=32)
                yield Link(rig, peer, ep, msg.addr, None, rignet_listens)
    else:
        config = {
            "role": "server",
            "scheme": scheme,
            "endpoints": [{"name": ep, **ibl_options}],
        }
        async with (
            open_ibl(config) as peer,
            EchoProtocol.client(peer.endpoints[ep], name="rignet") as rig,
        ):
            await rig.status(0)
            await peer.expect_recv(ep, 32)
            yield Link(rig, peer, ep, None, list(rig.local_address), rignet_listens)


def real_warnings(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """Warnings and errors among ``records``, without asyncio's debug-mode notes that a
    callback was slow (``PYTHONDEVMODE`` on a loaded machine: timing, not a fault)."""
    return [
        r
        for r in records
        if r.levelno >= logging.WARNING
        and not (r.name == "asyncio" and str(r.msg).startswith("Executing "))
    ]
