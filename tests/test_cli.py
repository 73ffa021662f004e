"""The ``rignet`` command: ``run``, ``demo``, ``serve`` and ``send``.

Most cases run the real command as a subprocess (``python -m trio_rignet``);
argument errors, ``--help`` and a few sends run ``main([...])`` in-process,
which is cheaper. Every subprocess is bounded by ``TIMEOUT`` (a safety net,
never an assertion), and killed and reaped in a ``finally`` so none outlives
its test.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import anyio
import pytest

from trio_rignet import __version__
from trio_rignet.cli import main

TIMEOUT = 30  # seconds: a safety net against hangs, never an assertion
LOCALHOST = "127.0.0.1"
EXP_REF = "2024-01-01_1_mouse"
STEPS = ("info CONNECTED", "init", "start ", "status RUNNING", "stop", "cleanup")
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
LISTENING = re.compile(
    rf"^{TIMESTAMP} rig '(?P<name>.*)' listening on (?P<uri>\S+) \(Ctrl-C to stop\)$"
)
POSIX_SIGNALS = pytest.mark.skipif(
    sys.platform == "win32", reason="sends POSIX signals to a subprocess"
)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trio_rignet", *args]


def rignet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m trio_rignet ARGS`` to completion and capture its output."""
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
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
    """``main()`` configures the ``trio_rignet`` logger; check it undid that."""
    logger = logging.getLogger("trio_rignet")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    assert logger.handlers == handlers
    assert (logger.propagate, logger.level) == (propagate, level)


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """``main([...])`` installs SIGINT/SIGTERM handlers; it must put the old ones back."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


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
        """Read the first line, ``TIME rig 'NAME' listening on URI (Ctrl-C to stop)``."""
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
        assert re.fullmatch(rf"{TIMESTAMP} stopping \({sig.name}\)", self.stdout[-1])
        assert not any("Traceback" in line for line in self.stderr), self.stderr

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=TIMEOUT)


@contextmanager
def serve(*args: str) -> Iterator[Serve]:
    """Start ``rignet serve ARGS``; yield once it listens; always kill and reap it."""
    proc = subprocess.Popen(
        command("serve", *args),
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


@pytest.fixture(scope="module")
def three_rigs() -> Iterator[dict[str, Serve]]:
    """Three ``rignet serve`` rigs (UDP, TCP, UDP), shared by the ``run`` tests."""
    with ExitStack() as stack:
        yield {
            "timeline": stack.enter_context(serve(f"udp://{LOCALHOST}:0", "--name", "timeline")),
            "video": stack.enter_context(serve(f"ws://{LOCALHOST}:0", "--name", "video")),
            "ephys": stack.enter_context(serve(f"udp://{LOCALHOST}:0", "--name", "ephys")),
        }


def rig_options(rigs: dict[str, Serve]) -> list[str]:
    return [arg for name, rig in rigs.items() for arg in ("--rig", f"{name}={rig.uri}")]


# ----------------------------------------------------------------------- demo


@pytest.mark.parametrize(
    ("transport", "backend", "rigs"),
    [("udp", "trio", 3), ("tcp", "trio", 5), ("udp", "asyncio", 5), ("tcp", "asyncio", 3)],
)
def test_demo(transport: str, backend: str, rigs: int) -> None:
    result = rignet("demo", "--transport", transport, "--backend", backend, "--rigs", str(rigs))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert f"Started {rigs} simulated rigs over {transport.upper()}:" in result.stdout
    names = ["timeline", "video", "ephys", "rig3", "rig4"][:rigs]
    scheme = "udp" if transport == "udp" else "ws"
    for step in STEPS:
        assert f"== {step}" in result.stdout
    for name in names:
        assert re.search(rf"^  {name} +{scheme}://127\.0\.0\.1:\d+$", result.stdout, re.M)
        # one completion line per step, carrying that rig's own data
        rows = re.findall(rf"^  {name} +[\d.]+ ms  (.*)$", result.stdout, re.M)
        assert [json.loads(row)[-1] for row in rows] == [
            {"rig": name, "done": done}
            for done in ("info", "init", "start", "status", "stop", "cleanup")
        ]
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
    assert '[{"rig": "timeline", "done": "stop"}]' in out
    assert "video" not in out


def test_demo_quiet_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """-q after the subcommand: only the result line."""
    assert main(["demo", "--rigs", "1", "-q"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert re.fullmatch(r"Experiment \S+ complete: 6 steps x 1 rigs in \d+ ms\.\n", out)


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
        rig.expect_line(rf'^{TIMESTAMP} init from 127\.0\.0\.1:\d+: \[\{{"a": 1\}}\]$')

        # An option between positionals.
        result = rignet("send", rig.uri, "start", "--wait", EXP_REF)
        assert result.returncode == 0, result.stderr
        assert f'completion: ["{EXP_REF}", {{"rig": "cam", "done": "start"}}]' in result.stdout
        rig.expect_line(rf'^{TIMESTAMP} start from 127\.0\.0\.1:\d+: \["{EXP_REF}", null\]$')

        # No --wait: the echo, and the rig's completion update is still confirmed
        # (-vv shows it arriving, after this endpoint echoed it).
        result = rignet("send", rig.uri, "stop", "-vv")
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"echo round trip: \d+\.\d\d ms\n", result.stdout)
        # (The rig's tag, JSON whitespace before the closing bracket, shows in the repr.)
        assert """received b'[4, {"rig": "cam", "done": "stop"}""" in result.stderr
        assert "WARNING" not in result.stderr
        rig.expect_line(rf"^{TIMESTAMP} stop from 127\.0\.0\.1:\d+: \[null\]$")

        rig.stop(signal.SIGINT)
    # The rig never logged an unconfirmed completion update (or anything else).
    assert rig.stderr == []


def test_serve_fail_on(scheme: str) -> None:
    with serve(f"{scheme}://{LOCALHOST}:0", "--fail-on", "start", "--backend", "asyncio") as rig:
        assert rig.name == f"{scheme}://{LOCALHOST}:0"  # no --name: the URI
        result = rignet("send", rig.uri, "start", EXP_REF, "--wait")
        line = assert_one_line_error(
            result,
            "the rig failed to handle start: RuntimeError: simulated failure of start "
            "(--fail-on start)",
        )
        assert "completion" not in result.stdout
        assert line.startswith(f"rignet: error: {rig.uri}: ")

        # Other events are still answered.
        result = rignet("send", rig.uri, "init", "--wait")
        assert result.returncode == 0, result.stderr
        assert 'completion: [{"rig": "' in result.stdout
        rig.stop(signal.SIGINT)
    assert any(
        re.search(r" ERROR trio_rignet\.rig: .*handler for start failed: RuntimeError", line)
        for line in rig.stderr
    ), rig.stderr


def test_serve_no_ack(scheme: str) -> None:
    with serve(f"{scheme}://{LOCALHOST}:0", "--no-ack", "--name", "cam") as rig:
        result = rignet("send", rig.uri, "init", "--wait", "--timeout", "0.5")
        line = assert_one_line_error(
            result, "confirmed init but sent no completion update within 0.5 s"
        )
        assert "--timeout" in line
        rig.expect_line(r" init from ")

        result = rignet("send", rig.uri, "cleanup", "--timeout", "5")  # the echo still comes
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("echo round trip: ")
        rig.stop(signal.SIGTERM)


def test_serve_quiet_and_log_file(tmp_path: Path) -> None:
    """-q: only the listening and stopping lines; --log-file keeps every signal line."""
    log = tmp_path / "rig.log"
    with serve(f"udp://{LOCALHOST}:0", "-q", "--log-file", str(log), "--name", "cam") as rig:
        assert main(["send", rig.uri, "init", "--wait"]) == 0
        rig.stop()
    assert len(rig.stdout) == 2
    text = log.read_text(encoding="utf-8")
    assert re.search(rf"^{TIMESTAMP} INFO trio_rignet\.cli: {TIMESTAMP} init from ", text, re.M)
    assert re.search(rf"^{TIMESTAMP} INFO trio_rignet\.echo: \[cam\] listening on ", text, re.M)


def test_send_every_event_in_process(scheme: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``main(["send", ...])`` in-process against a serve subprocess: every EVENT maps right."""
    cases = [
        (["init"], "init", [None], '[{"rig": "cam", "done": "init"}]'),
        (["start", EXP_REF], "start", [EXP_REF, None], f'["{EXP_REF}", '),
        (["stop", "--data", "[1, 2]"], "stop", [[1, 2]], '[{"rig": "cam", "done": "stop"}]'),
        (["interrupt"], "interrupt", [None], '[{"rig": "cam", "done": "interrupt"}]'),
        (["cleanup"], "cleanup", [None], '[{"rig": "cam", "done": "cleanup"}]'),
        (["status", "RUNNING"], "status", [20], '[{"rig": "cam", "done": "status"}]'),
        (["status", "30"], "status", [30], '[{"rig": "cam", "done": "status"}]'),
        (
            ["info", "initialized", "--data", '{"k": "v"}'],
            "info",
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
            line = rig.expect_line(rf"^{TIMESTAMP} {event} from ")
            assert json.loads(line.split(": ", 1)[1]) == received
        rig.stop()


@pytest.mark.parametrize("wait", [False, True])
def test_send_to_closed_udp_port(wait: bool) -> None:
    port = free_port(socket.SOCK_DGRAM)
    uri = f"udp://{LOCALHOST}:{port}"
    result = rignet("send", uri, "init", *(["--wait"] if wait else []))
    line = assert_one_line_error(result, f"{uri}: nothing is listening there")
    assert result.stdout == ""
    assert "endpoint" not in line  # library wording stays out of the command line


@pytest.mark.parametrize("wait", [False, True])
def test_send_to_closed_tcp_port(wait: bool) -> None:
    port = free_port(socket.SOCK_STREAM)
    uri = f"ws://{LOCALHOST}:{port}"
    result = rignet("send", uri, "init", *(["--wait"] if wait else []))
    assert_one_line_error(result, f"{uri}: cannot connect", "is the rig's software running?")
    assert result.stdout == ""


def test_send_to_a_rig_that_does_not_echo() -> None:
    """No echo in time: command-line wording, no library advice, no doubled names."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOCALHOST, 0))
        uri = f"udp://{LOCALHOST}:{silent.getsockname()[1]}"
        result = rignet("send", uri, "init", "--timeout", "0.3")
    line = assert_one_line_error(result)
    assert line == (
        f"rignet: error: {uri}: no echo within 0.3 s: the rig is off, unreachable, or not "
        "running its rig software"
    )


def test_serve_on_a_busy_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((LOCALHOST, 0))
        port = busy.getsockname()[1]
        result = rignet("serve", f"udp://{LOCALHOST}:{port}")
    assert_one_line_error(result, f"cannot serve on udp://127.0.0.1:{port}")
    assert result.stdout == ""


# ------------------------------------------------------------------------ run


def assert_run_line(out: str, step: str, name: str, kind: str = "ok") -> str:
    match = re.search(rf"^{step} +{name} +{kind} +(.*)$", out, re.M)
    assert match, f"no `{step} {name} {kind}` line in:\n{out}"
    return match[1]


def summary(out: str) -> dict[str, list[str]]:
    """The summary table: rig -> its cells for init, start, stop, cleanup."""
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if re.match(r"rig +init +start", line)))
    table: dict[str, list[str]] = {}
    for line in lines[first + 1 :]:
        name, *cells = re.split(r"  +", line)
        if not cells:  # the blank line or the outcome after the table
            break
        table[name] = cells
    return table


def test_run_three_rigs(three_rigs: dict[str, Serve], tmp_path: Path) -> None:
    # iblrig's remote_devices.yaml, as yaml.safe_dump writes it (keys sorted).
    devices = tmp_path / "remote_devices.yaml"
    devices.write_text(
        "".join(f"{name}: {three_rigs[name].uri}\n" for name in sorted(three_rigs)),
        encoding="utf-8",
    )
    result = rignet("run", EXP_REF, "--rigs", str(devices), "--duration", "0.05")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith(f"Running {EXP_REF} on 3 rigs: ephys, timeline, video\n")
    for name in three_rigs:
        for step in ("init", "start", "stop", "cleanup"):
            data = assert_run_line(out, step, name)
            assert data.endswith(json.dumps({"rig": name, "done": step}) + "]")
    assert re.search(rf"^running +{EXP_REF} for 0\.05 s", out, re.M)
    assert summary(out) == {name: ["ok"] * 4 for name in sorted(three_rigs)}
    assert out.endswith(f"{EXP_REF}: complete on all 3 rigs in {out.split(' in ')[-1]}")
    for rig in three_rigs.values():
        for step in ("init", "start", "stop", "cleanup"):
            rig.expect_line(rf"^{TIMESTAMP} {step} from ")


def test_run_toml_and_rig_option(three_rigs: dict[str, Serve], tmp_path: Path) -> None:
    rigs = tmp_path / "rigs.toml"
    video = three_rigs["video"].uri
    rigs.write_text(f'[rigs]\nvideo = "{video}"\nephys = "udp://{LOCALHOST}:9"\n')
    # --rig replaces the file's ephys; positionals after options; -q: no progress lines.
    ephys = three_rigs["ephys"].uri
    result = rignet("run", "--rigs", str(rigs), "--rig", f"ephys={ephys}", "-q", EXP_REF)
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == {"video": ["ok"] * 4, "ephys": ["ok"] * 4}
    assert not re.search("^init ", result.stdout, re.M)  # no progress lines
    assert result.stdout.startswith("rig ")


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_run_with_rigs_down(three_rigs: dict[str, Serve], tmp_path: Path, backend: str) -> None:
    """A TCP rig and a UDP rig that are down are named; the others run the experiment."""
    tcp_down = f"ws://{LOCALHOST}:{free_port(socket.SOCK_STREAM)}"
    udp_down = f"udp://{LOCALHOST}:{free_port(socket.SOCK_DGRAM)}"
    devices = tmp_path / "remote_devices.yaml"
    devices.write_text(
        f"# rigs of this lab\ntimeline: {three_rigs['timeline'].uri}\n"
        f"'cameras:left': {tcp_down}\nvideo: '{three_rigs['video'].uri}'\nneuropixel: {udp_down}\n",
        encoding="utf-8",
    )
    result = rignet(
        "run", EXP_REF, "--rigs", str(devices), "--backend", backend, "--color", "never"
    )
    assert result.returncode == 1, result
    assert result.stderr == ""
    out = result.stdout
    assert "cannot connect" in assert_run_line(out, "init", "cameras:left", "down")
    assert "nothing is listening" in assert_run_line(out, "init", "neuropixel", "down")
    assert summary(out) == {
        "timeline": ["ok"] * 4,
        "cameras:left": ["down", "-", "-", "-"],
        "video": ["ok"] * 4,
        "neuropixel": ["down", "-", "-", "-"],
    }
    assert re.search(rf"^cameras:left \({re.escape(tcp_down)}\): init: cannot connect", out, re.M)
    assert re.search(
        rf"^neuropixel \({re.escape(udp_down)}\): init: nothing is listening", out, re.M
    )
    assert out.endswith(f"{EXP_REF}: 2 of 4 rigs completed; failed: cameras:left, neuropixel.\n")
    assert "Traceback" not in out


def test_run_no_rig_reachable() -> None:
    tcp_down = f"ws://{LOCALHOST}:{free_port(socket.SOCK_STREAM)}"
    result = rignet("run", EXP_REF, "--rig", f"video={tcp_down}", "--timeout", "2")
    assert result.returncode == 3, result
    assert result.stdout.endswith(f"{EXP_REF}: no rig could be reached.\n")


def test_run_a_rig_fails_start(three_rigs: dict[str, Serve]) -> None:
    """The failing rig is named with its error and still gets cleanup; exit 1."""
    with serve(f"udp://{LOCALHOST}:0", "--name", "cam", "--fail-on", "start") as cam:
        rigs = {"timeline": three_rigs["timeline"], "cam": cam}
        result = rignet("run", EXP_REF, *rig_options(rigs))
        assert result.returncode == 1, result
        out = result.stdout
        error = assert_run_line(out, "start", "cam", "error")
        assert error == (
            "the rig failed to handle start: RuntimeError: simulated failure of start "
            "(--fail-on start)"
        )
        assert summary(out) == {"timeline": ["ok"] * 4, "cam": ["ok", "error", "-", "ok"]}
        assert out.endswith(f"{EXP_REF}: 1 of 2 rigs completed; failed: cam.\n")

        # --abort-on-failure: nobody starts... timeline did start: it is stopped, and both clean up.
        result = rignet("run", EXP_REF, *rig_options(rigs), "--abort-on-failure", "--duration", "5")
        assert result.returncode == 1, result
        assert summary(result.stdout) == {
            "timeline": ["ok", "ok", "ok", "ok"],
            "cam": ["ok", "error", "-", "ok"],
        }
        assert "running " not in result.stdout  # the 5 s between start and stop were skipped


def test_run_timeouts_name_each_rig_once(three_rigs: dict[str, Serve]) -> None:
    with serve(f"udp://{LOCALHOST}:0", "--name", "cam", "--no-ack") as cam:
        rigs = {"timeline": three_rigs["timeline"], "cam": cam}
        result = rignet("run", EXP_REF, *rig_options(rigs), "--timeout", "0.3")
    assert result.returncode == 1, result
    out = result.stdout
    assert assert_run_line(out, "init", "cam", "no reply") == (
        "confirmed init but sent no completion update within 0.3 s (if the rig needs "
        "longer, pass a longer --timeout)"
    )
    assert f"\ncam ({cam.uri}): init: confirmed init but sent no completion" in out
    assert "cam: cam" not in out
    assert "endpoint" not in out
    assert summary(out) == {"timeline": ["ok"] * 4, "cam": ["no reply", "-", "-", "-"]}


def test_run_colour(three_rigs: dict[str, Serve]) -> None:
    rigs = {"timeline": three_rigs["timeline"]}
    result = rignet("run", EXP_REF, *rig_options(rigs), "--color", "always")
    assert result.returncode == 0
    assert "\x1b[32mok" in result.stdout
    result = rignet("run", EXP_REF, *rig_options(rigs))  # a pipe: no colour
    assert "\x1b[" not in result.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
@pytest.mark.parametrize("no_color", [False, True])
def test_colour_on_a_terminal(no_color: bool) -> None:
    """On a terminal the error is coloured, unless NO_COLOR is set."""
    import pty

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    if no_color:
        env["NO_COLOR"] = "1"
    port = free_port(socket.SOCK_STREAM)
    try:
        proc = subprocess.run(
            command("send", f"ws://{LOCALHOST}:{port}", "init"),
            stdout=follower,
            stderr=follower,
            env=env,
            timeout=TIMEOUT,
            check=False,
        )
        os.close(follower)
        follower = -1
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal has no more writers
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert proc.returncode == 1
    assert b"rignet: " in output
    assert (b"\x1b[" in output) is not no_color


@POSIX_SIGNALS
def test_run_interrupted_while_running_sends_interrupt(three_rigs: dict[str, Serve]) -> None:
    """Ctrl-C while the rigs record: they are sent interrupt; one line; exit 130."""
    rigs = {"video": three_rigs["video"], "ephys": three_rigs["ephys"]}
    with subprocess.Popen(
        command("run", EXP_REF, *rig_options(rigs), "--duration", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("running "):
                    break
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert err == (
        "rignet: interrupted (SIGINT) while the rigs were running; sent interrupt to video, ephys\n"
    )
    for rig in rigs.values():
        rig.expect_line(rf"^{TIMESTAMP} interrupt from ")


# ------------------------------------------------------------------- Ctrl-C


def interrupt_at_random(
    args: list[str], sig: signal.Signals, rng: random.Random, window: float
) -> tuple[int, str, str, float]:
    """Start ``rignet ARGS``; once it printed its first line, signal it within ``window`` s."""
    with subprocess.Popen(
        command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            delay = rng.uniform(0, window)
            threading.Event().wait(delay)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, first + out, err, delay


def baseline(args: list[str]) -> float:
    """Seconds from the first line of output to the end of an uninterrupted run."""
    with subprocess.Popen(command(*args), stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        proc.stdout.readline()
        began = time.monotonic()
        proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0
    return time.monotonic() - began


def check_interruptions(args: list[str], final: str, tries: int = 20) -> None:
    """Ctrl-C at random points: one line and exit 130, or exit 0 if the work was done."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    window = 1.2 * baseline(args)
    outcomes = []
    for _ in range(tries):
        status, out, err, delay = interrupt_at_random(args, signal.SIGINT, rng, window)
        context = (
            f"seed {seed}, delay {delay:.3f} s, status {status}\nstdout:\n{out}\nstderr:\n{err}"
        )
        assert "Traceback" not in err, context
        if status == 0:
            assert err == "", context
            assert final in out, context
        else:
            assert status == 130, context
            lines = err.splitlines()
            assert len(lines) == 1, context
            assert lines[0].startswith("rignet: interrupted (SIGINT)"), context
        outcomes.append(status)
    assert 130 in outcomes, f"seed {seed}: no try was interrupted before the end (window {window})"


@POSIX_SIGNALS
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_demo_interrupted_at_random(backend: str) -> None:
    check_interruptions(["demo", "--rigs", "5", "--backend", backend], "complete: 6 steps")


@POSIX_SIGNALS
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_run_interrupted_at_random(three_rigs: dict[str, Serve], backend: str) -> None:
    args = ["run", EXP_REF, *rig_options(three_rigs), "--backend", backend, "--duration", "0.05"]
    check_interruptions(args, "complete on all 3 rigs")


@POSIX_SIGNALS
def test_sigterm_demo() -> None:
    """SIGTERM: one line, exit 130 (as for Ctrl-C), or 0 if the demo had finished."""
    status, out, err, _ = interrupt_at_random(["demo"], signal.SIGTERM, random.Random(0), 0)
    assert "Traceback" not in err
    if status == 0:  # pragma: no cover - the demo finished first
        assert "complete: 6 steps" in out
        return
    assert status == 130, err
    assert re.fullmatch(r"rignet: interrupted \(SIGTERM\)\n", err), err


@POSIX_SIGNALS
def test_sigterm_run(three_rigs: dict[str, Serve]) -> None:
    rigs = {"timeline": three_rigs["timeline"]}
    with subprocess.Popen(
        command("run", EXP_REF, *rig_options(rigs), "--duration", "60", "--backend", "asyncio"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("running "):
                    break
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130, err
    assert err == (
        "rignet: interrupted (SIGTERM) while the rigs were running; sent interrupt to timeline\n"
    )
    rigs["timeline"].expect_line(rf"^{TIMESTAMP} interrupt from ")


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
    assert "cannot serve: Unsupported scheme 'bogus'" in err
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
        (["demo", "--backend", "curio"], "invalid choice: 'curio'"),
        (["demo", "--color", "purple"], "invalid choice: 'purple'"),
        (["-v", "demo", "-q"], "-v and -q cannot be combined"),
        (["serve", "udp://127.0.0.1:0", "--fail-on", "nope"], "unknown event 'nope'; choose"),
        (["serve", "udp://127.0.0.1:0", "--fail-on", "init|start"], "--fail-on"),
        (["run", EXP_REF], "no rigs: pass --rigs FILE"),
        (["run", EXP_REF, "--rig", "video"], "expected NAME=URI"),
        (["run", EXP_REF, "--rig", "video=bogus://x"], "rig 'video': Unsupported scheme"),
        (["run", EXP_REF, "--rig", "video=udp://10.0.0.1:99999"], "Invalid port number"),
        (["run", EXP_REF, "--rigs", "/nonexistent/rigs.yaml"], "cannot read rigs file"),
        (["run", EXP_REF, "--rig", "v=udp://127.0.0.1:9", "--duration", "-1"], "0 or more"),
        (["run", EXP_REF, "--rig", "v=udp://127.0.0.1:9", "--init-data", "{"], "invalid JSON"),
        (["run", "--rig", "v=udp://127.0.0.1:9"], "required: EXP_REF"),
        (["demo", "--log-file", "/nonexistent/dir/rignet.log"], "cannot open the log file"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_other_argument_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert expected in usage_error(argv, capsys)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("rigs.yaml", "video:\n  uri: udp://10.0.0.2\n", "line 1: rig 'video' has no URI"),
        ("rigs.yaml", "- udp://10.0.0.2\n", "line 1: a YAML list is not a rig list"),
        ("rigs.toml", "[rig]\nvideo = 'udp://x'\n", "unknown key(s) 'rig'"),
        ("rigs.json", "{}", "name it .yaml"),
        ("rigs.yaml", "{}\n", "lists no rigs"),
    ],
)
def test_bad_rigs_file(
    name: str, text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    err = usage_error(["run", EXP_REF, "--rigs", str(path)], capsys)
    assert "rignet run: error: " in err
    assert expected in err


@pytest.mark.parametrize("command_args", [[], ["run"], ["demo"], ["serve"], ["send"]])
def test_version(command_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command_args, "--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"rignet {__version__} (trio-rignet, Python 3.")


def test_version_subprocess() -> None:
    result = rignet("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"rignet {__version__} ")


@pytest.mark.parametrize("command_args", [[], ["run"], ["demo"], ["serve"], ["send"]])
def test_help(command_args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command_args, "--help"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"usage: rignet {' '.join(command_args)}".rstrip())
    assert "--log-file FILE" in out
    if not command_args:
        for sub in ("run", "demo", "serve", "send"):
            assert sub in out


def test_help_subprocess() -> None:
    result = rignet("send", "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: rignet send")
    assert "--wait" in result.stdout


def test_verbose_anywhere_and_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-v before and after the command add up; --log-file after the command works."""
    log = tmp_path / "demo.log"
    assert main(["-v", "demo", "--rigs", "1", "-v", "--log-file", str(log)]) == 0
    _, err = capsys.readouterr()
    assert re.search(rf"^{TIMESTAMP} DEBUG trio_rignet\.echo: ", err, re.M)  # -vv
    assert "trio_rignet.cli" not in err  # the command's own lines are on stdout only
    text = log.read_text(encoding="utf-8")
    assert re.search(rf"^{TIMESTAMP} INFO trio_rignet\.cli: Experiment \S+ complete", text, re.M)


# ------------------------------------------------------- rigs that never connect


@pytest.fixture
def never_connects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoints named ``slow`` never finish connecting (a TCP host that drops SYNs)."""
    import trio_rignet._cli_run as cli_run

    real_client = cli_run.EchoProtocol.client

    @asynccontextmanager
    async def hanging(uri: str, **options: Any) -> AsyncIterator[Any]:
        await anyio.sleep_forever()
        yield  # pragma: no cover

    def client(uri: str, **options: Any) -> Any:
        if options.get("name") == "slow":
            return hanging(uri, **options)
        return real_client(uri, **options)

    monkeypatch.setattr(cli_run.EchoProtocol, "client", client)


@pytest.mark.usefixtures("never_connects")
def test_run_rig_that_never_connects(capsys: pytest.CaptureFixture[str]) -> None:
    with serve(f"udp://{LOCALHOST}:0", "--name", "cam") as cam:
        argv = ["run", EXP_REF, "--rig", f"cam={cam.uri}", "--rig", "slow=ws://10.0.0.2"]
        assert main([*argv, "--timeout", "0.2"]) == 1
    out = capsys.readouterr().out
    assert assert_run_line(out, "init", "slow", "down") == (
        "no TCP connection within 0.2 s: is the rig on?"
    )
    assert summary(out) == {"cam": ["ok"] * 4, "slow": ["down", "-", "-", "-"]}


@POSIX_SIGNALS
@pytest.mark.usefixtures("never_connects")
def test_ctrl_c_while_a_rig_connects(capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C is not held up by a rig that is still connecting."""
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        status = main(["run", EXP_REF, "--rig", "slow=ws://10.0.0.2", "--timeout", "60"])
    finally:
        timer.cancel()
    assert status == 130
    assert capsys.readouterr().err == "rignet: interrupted (SIGINT) while connecting to the rigs\n"


@POSIX_SIGNALS
def test_ctrl_c_after_a_send_was_confirmed() -> None:
    """Ctrl-C while send listens for the completion update: the signal was delivered, exit 0."""
    with (
        serve(f"udp://{LOCALHOST}:0", "--no-ack") as rig,
        subprocess.Popen(
            command("send", rig.uri, "init"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as proc,
    ):
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("echo round trip: ")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    assert err == ""


CANCEL_WHILE_OPENING = """
import os, signal, sys
from contextlib import asynccontextmanager
import anyio
import trio_rignet._cli_run as cli_run
from trio_rignet.cli import main

real_client = cli_run.EchoProtocol.client
fired = []

@asynccontextmanager
async def cancelled_as_it_opens(uri, **options):
    async with real_client(uri, **options) as rig:
        if not fired:
            # Ctrl-C arrives as the first endpoint opens: the cancellation is in
            # force before the rig is handed over (task_status.started()).
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.1)
        yield rig

cli_run.EchoProtocol.client = cancelled_as_it_opens
uri, backend = sys.argv[1:]
rigs = ["--rig", "a=" + uri, "--rig", "b=" + uri]
sys.exit(main(["run", "2024-01-01_1_mouse", *rigs, "--backend", backend]))
"""


@POSIX_SIGNALS
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_ctrl_c_as_a_rig_opens(backend: str) -> None:
    """Regression: an endpoint opened just as Ctrl-C came was held open, shielded, forever.

    Trio's (and AnyIO's) start() leaves a task that calls started() under a
    cancelled caller where it is, and waits for it to end; it must not then
    shield itself. This hung on asyncio; on Trio the same race hung 2 runs in 150
    when Ctrl-C came within 3 ms of the first line.
    """
    with serve(f"udp://{LOCALHOST}:0", "--name", "cam") as cam:
        result = subprocess.run(
            [sys.executable, "-c", CANCEL_WHILE_OPENING, cam.uri, backend],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert result.returncode == 130, result
    assert result.stderr == "rignet: interrupted (SIGINT) while connecting to the rigs\n"
