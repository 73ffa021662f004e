"""The ``rignet`` command: ``demo``, ``serve`` and ``send``.

Most cases run the real command as a subprocess (``python -m trio_rignet``);
argument errors, ``--help`` and a few sends run ``main([...])`` in-process,
which is cheaper. Every subprocess is bounded by ``TIMEOUT`` (a safety net,
never an assertion), and killed and reaped in a ``finally`` so none outlives
its test.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import pytest

from trio_rignet.cli import main

TIMEOUT = 30  # seconds: a safety net against hangs, never an assertion
LOCALHOST = "127.0.0.1"
EXP_REF = "2024-01-01_1_mouse"
STEPS = ("info CONNECTED", "init", "start ", "status RUNNING", "stop", "cleanup")
LISTENING = re.compile(r"^rig '(?P<name>.*)' listening on (?P<uri>\S+) \(Ctrl-C to stop\)$")


def rignet(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m trio_rignet ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "trio_rignet", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """The command failed with one ``rignet: error:`` line on stderr containing ``fragments``."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rignet: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def free_port(kind: socket.SocketKind) -> int:
    """A loopback port nothing listens on (bound, then released at once)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _restore_rignet_logger() -> Iterator[None]:
    """``main(["send", ...])`` silences the ``trio_rignet`` logger; undo it after each test."""
    logger = logging.getLogger("trio_rignet")
    handlers, propagate = logger.handlers[:], logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate


# ---------------------------------------------------------------------- serve


class Serve:
    """A running ``rignet serve`` subprocess; its output is read by two threads."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read, args=(proc.stdout, self.stdout, True), daemon=True),
            threading.Thread(
                target=self._read, args=(proc.stderr, self.stderr, False), daemon=True
            ),
        ]
        for thread in self._threads:
            thread.start()
        self.name = self.uri = ""

    def wait_listening(self) -> None:
        """Read the first line, ``rig 'NAME' listening on URI (Ctrl-C to stop)``."""
        first = self.next_line()
        match = LISTENING.match(first)
        assert match, f"unexpected first line {first!r}; stderr: {self.stderr}"
        self.name = match["name"]
        self.uri = match["uri"]

    def _read(self, stream: IO[str], lines: list[str], forward: bool) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if forward:
                self.lines.put(line.rstrip("\n"))
        if forward:
            self.lines.put(None)

    def next_line(self) -> str:
        """The next line on stdout (fails if the process ends or stays silent too long)."""
        line = self.lines.get(timeout=TIMEOUT)
        assert line is not None, f"serve ended early; stderr: {self.stderr}"
        return line

    def expect_line(self, pattern: str) -> str:
        """Skip stdout lines until one matches ``pattern`` (a regular expression)."""
        while True:
            line = self.next_line()
            if re.search(pattern, line):
                return line

    def stop(self, sig: signal.Signals = signal.SIGINT) -> None:
        """Interrupt the rig like Ctrl-C; it must exit 0 without a traceback."""
        self.proc.send_signal(sig)
        assert self.proc.wait(timeout=TIMEOUT) == 0, self.stderr
        self.join()
        assert f"stopping ({sig.name})" in self.stdout
        assert not any("Traceback" in line for line in self.stderr), self.stderr

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=TIMEOUT)


@contextmanager
def serve(*args: str) -> Iterator[Serve]:
    """Start ``rignet serve ARGS``; yield once it listens; always kill and reap it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "trio_rignet", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    try:
        with proc:
            server = Serve(proc)
            try:
                server.wait_listening()
                yield server
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait(timeout=TIMEOUT)
                server.join()
    finally:
        if proc.poll() is None:  # pragma: no cover - only if waiting above failed
            proc.kill()
            proc.wait()


@pytest.fixture(params=["udp", "ws"])
def scheme(request: pytest.FixtureRequest) -> str:
    """The transport: UDP, or plain TCP under iblutil's ``ws://`` scheme."""
    return str(request.param)


# ----------------------------------------------------------------------- demo


@pytest.mark.parametrize("rigs", [3, 5])
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_demo(transport: str, backend: str, rigs: int) -> None:
    result = rignet("demo", "--transport", transport, "--backend", backend, "--rigs", str(rigs))
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "ERROR" not in result.stderr
    assert f"Started {rigs} simulated rigs over {transport.upper()}:" in result.stdout
    names = ["timeline", "video", "ephys", "rig3", "rig4"][:rigs]
    scheme = "udp" if transport == "udp" else "ws"
    for step in STEPS:
        assert f"== {step}" in result.stdout
    for name in names:
        assert re.search(rf"^  {name} +{scheme}://127\.0\.0\.1:\d+$", result.stdout, re.M)
        # one completion line per step, carrying that rig's own data
        rows = re.findall(rf"^  {name} +[\d.]+ ms  (.*)$", result.stdout, re.M)
        assert len(rows) == len(STEPS)
        for row in rows:
            assert json.loads(row)[-1]["rig"] == name
    assert "rig5" not in result.stdout
    if rigs == 3:
        assert "rig3" not in result.stdout
    assert re.search(rf"complete: 6 steps x {rigs} rigs in \d+ ms\.$", result.stdout, re.M)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_demo_in_process(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--rigs", "1", "--backend", backend]) == 0
    out = capsys.readouterr().out
    assert "Started 1 simulated rigs over UDP:" in out
    assert '[0, {"rig": "timeline", "done": "info"}]' in out
    assert '"done": "cleanup"' in out
    assert "video" not in out


# -------------------------------------------------------------- serve + send


def test_serve_and_send(scheme: str) -> None:
    with serve(f"{scheme}://{LOCALHOST}:0", "--name", "cam") as rig:
        assert rig.name == "cam"
        assert re.fullmatch(rf"{scheme}://127\.0\.0\.1:\d+", rig.uri)
        assert rig.uri.split(":")[-1] != "0"

        result = rignet("send", rig.uri, "init", "--data", '{"a": 1}', "--wait")
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert len(lines) == 2
        assert re.fullmatch(r"echo round trip: \d+\.\d\d ms", lines[0])
        assert lines[1] == 'completion: [{"rig": "cam", "done": "init"}]'
        rig.expect_line(r'^EXPINIT from 127\.0\.0\.1:\d+: \[\{"a": 1\}\]$')

        result = rignet("send", rig.uri, "start", EXP_REF, "--wait")
        assert result.returncode == 0, result.stderr
        assert f'completion: ["{EXP_REF}", {{"rig": "cam", "done": "start"}}]' in result.stdout
        rig.expect_line(rf'^EXPSTART from 127\.0\.0\.1:\d+: \["{EXP_REF}", null\]$')

        result = rignet("send", rig.uri, "stop")  # no --wait: the echo only
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert re.fullmatch(r"echo round trip: \d+\.\d\d ms\n", result.stdout)
        rig.expect_line(r"^EXPEND from 127\.0\.0\.1:\d+: \[null\]$")

        rig.stop(signal.SIGINT)


def test_serve_fail_on(scheme: str) -> None:
    with serve(f"{scheme}://{LOCALHOST}:0", "--fail-on", "start") as rig:
        assert rig.name == f"{scheme}://{LOCALHOST}:0"  # no --name: the URI
        result = rignet("send", rig.uri, "start", EXP_REF, "--wait")
        line = assert_one_line_error(
            result, "EXPSTART", "RuntimeError: simulated failure of EXPSTART"
        )
        assert "completion" not in result.stdout
        assert line.startswith(f"rignet: error: 127.0.0.1:{rig.uri.split(':')[-1]} ")

        # Other events are still answered.
        result = rignet("send", rig.uri, "init", "--wait")
        assert result.returncode == 0, result.stderr
        assert 'completion: [{"rig": "' in result.stdout
        rig.stop(signal.SIGINT)
    assert any("simulated failure of EXPSTART" in line for line in rig.stderr)


def test_serve_no_ack(scheme: str) -> None:
    with serve(f"{scheme}://{LOCALHOST}:0", "--no-ack", "--name", "cam") as rig:
        result = rignet("send", rig.uri, "init", "--wait", "--timeout", "0.5")
        assert_one_line_error(result, "EXPINIT", "no completion update within 0.5 s")
        rig.expect_line(r"^EXPINIT from ")

        result = rignet("send", rig.uri, "cleanup", "--timeout", "5")  # the echo still comes
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("echo round trip: ")
        rig.stop(signal.SIGTERM)


def test_send_every_event_in_process(scheme: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``main(["send", ...])`` in-process against a serve subprocess: every EVENT maps right."""
    cases = [
        (["init"], "EXPINIT", [None], '[{"rig": "cam", "done": "init"}]'),
        (["start", EXP_REF], "EXPSTART", [EXP_REF, None], f'["{EXP_REF}", '),
        (["stop", "--data", "[1, 2]"], "EXPEND", [[1, 2]], '[{"rig": "cam", "done": "end"}]'),
        (["interrupt"], "EXPINTERRUPT", [None], '[{"rig": "cam", "done": "interrupt"}]'),
        (["cleanup"], "EXPCLEANUP", [None], '[{"rig": "cam", "done": "cleanup"}]'),
        (["status", "RUNNING"], "EXPSTATUS", [20], '[{"rig": "cam", "done": "status"}]'),
        (["status", "30"], "EXPSTATUS", [30], '[{"rig": "cam", "done": "status"}]'),
        (
            ["info", "initialized", "--data", '{"k": "v"}'],
            "EXPINFO",
            [10, {"k": "v"}],
            '[10, {"rig": "cam", "done": "info"}]',
        ),
    ]
    with serve(f"{scheme}://{LOCALHOST}:0", "--name", "cam") as rig:
        for args, event, received, completion in cases:
            assert main(["send", rig.uri, *args, "--wait"]) == 0
            out, err = capsys.readouterr()
            assert err == ""
            assert out.startswith("echo round trip: ")
            assert f"completion: {completion}" in out
            line = rig.expect_line(rf"^{event} from ")
            assert json.loads(line.split(": ", 1)[1]) == received
        rig.stop()


@pytest.mark.parametrize("wait", [False, True])
def test_send_to_closed_udp_port(wait: bool) -> None:
    port = free_port(socket.SOCK_DGRAM)
    result = rignet("send", f"udp://{LOCALHOST}:{port}", "init", *(["--wait"] if wait else []))
    assert_one_line_error(result, f"127.0.0.1:{port}", "nothing is listening")
    assert result.stdout == ""


@pytest.mark.parametrize("wait", [False, True])
def test_send_to_closed_tcp_port(wait: bool) -> None:
    port = free_port(socket.SOCK_STREAM)
    result = rignet("send", f"ws://{LOCALHOST}:{port}", "init", *(["--wait"] if wait else []))
    assert_one_line_error(result, f"127.0.0.1:{port}", "cannot connect")
    assert result.stdout == ""


def test_serve_on_a_busy_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((LOCALHOST, 0))
        port = busy.getsockname()[1]
        result = rignet("serve", f"udp://{LOCALHOST}:{port}")
    assert_one_line_error(result, f"cannot serve on udp://127.0.0.1:{port}")
    assert result.stdout == ""


# ------------------------------------------------------------ argument errors


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``main(argv)``; it must exit 2 (argparse usage error); return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("usage: rignet")
    return err


def test_send_invalid_uri(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["send", "bogus://x", "init"], capsys)
    assert "Unsupported scheme 'bogus'" in err
    assert "udp://" in err
    assert "ws://" in err


def test_serve_invalid_uri(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["serve", "bogus://x"], capsys)
    assert "cannot serve on bogus://x" in err
    assert "udp://" in err


def test_invalid_uri_subprocess() -> None:
    result = rignet("send", "bogus://x", "init")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "rignet send: error: Unsupported scheme 'bogus'" in result.stderr


def test_send_invalid_json(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["send", "udp://127.0.0.1:9", "init", "--data", "{bad"], capsys)
    assert "argument --data: invalid JSON" in err
    assert """--data '{"key": 1}'""" in err


@pytest.mark.parametrize("event", ["status", "info"])
def test_send_status_needs_a_status(event: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["send", "udp://127.0.0.1:9", event], capsys)
    assert f"{event} needs a status, e.g. `rignet send URI {event} RUNNING`" in err


def test_send_unknown_status(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["send", "udp://127.0.0.1:9", "status", "BOGUS"], capsys)
    assert "Unrecognized status 'BOGUS'" in err
    assert "RUNNING=20" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["send", "udp://127.0.0.1:9", "launch"], "invalid choice: 'launch'"),
        (["send", "udp://127.0.0.1:9", "init", "extra"], "init takes no EXP_REF or status"),
        (["send", "udp://127.0.0.1:9", "status", "RUNNING", "--data", "1"], "status takes no"),
        (["send", "udp://127.0.0.1:9", "init", "--timeout", "0"], "positive number of seconds"),
        (["send", "udp://127.0.0.1:9", "init", "--timeout", "soon"], "seconds as a number"),
        (["demo", "--rigs", "0"], "expected at least 1, got 0"),
        (["demo", "--rigs", "many"], "expected a whole number, got 'many'"),
        (["demo", "--transport", "carrier-pigeon"], "invalid choice"),
        (["serve", "udp://127.0.0.1:0", "--fail-on", "nope"], "Unrecognized event 'nope'"),
        (["serve", "udp://127.0.0.1:0", "--fail-on", "init|start"], "--fail-on"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_other_argument_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in usage_error(argv, capsys)


@pytest.mark.parametrize("command", [[], ["demo"], ["serve"], ["send"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"usage: rignet {' '.join(command)}".rstrip())
    if not command:
        for sub in ("demo", "serve", "send"):
            assert sub in out


def test_help_subprocess() -> None:
    result = rignet("send", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: rignet send")
    assert "--wait" in result.stdout
