"""``rignet status``: each rig's state, once (``--once``) or live.

Rigs are ``rignet serve`` subprocesses on loopback ports chosen by the system,
and raw sockets standing in for iblutil rigs. ``--for`` is only an upper bound
here: ``--once`` ends as soon as every trio-rignet rig has answered, so no
test depends on how fast the machine is.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import anyio
import pytest
from tests.helpers import raw_server
from tests.test_cli import (  # the autouse fixtures apply here too
    LOCALHOST,
    POSIX_SIGNALS,
    TIMEOUT,
    Serve,
    _restore_rignet_logger,  # noqa: F401
    _signal_handlers_restored,  # noqa: F401
    command,
    free_port,
    rig_options,
    rignet,
    serve,
)

from trio_rignet._messages import ExpMessage
from trio_rignet.cli import main

BOUND = "10"  # --for: an upper bound only (a safety net, never an assertion)
OFFSET = re.compile(r"^[+-]\d+\.\d{3} ms ± \d+\.\d{3} ms$")
RTT = re.compile(r"^\d+\.\d{3} ms$")
SUMMARY = re.compile(r"^(all \d+ rigs?|\d+ of \d+ rigs) reachable")
COLUMNS = ["rig", "state", "peer", "round trip", "clock offset", "last event", "note"]


def status_table(out: str) -> dict[str, dict[str, str]]:
    """The table of ``--once``: rig name -> column -> cell (cut at the header's columns)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rig "))
    header = lines[start]
    at = [header.index(column) for column in COLUMNS]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 1 :]:
        if not line or SUMMARY.match(line):
            break
        cells = [line[a:b].strip() for a, b in zip(at, [*at[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


@pytest.fixture(scope="module")
def two_rigs() -> Iterator[dict[str, Serve]]:
    """Two ``rignet serve`` rigs, UDP and TCP."""
    with ExitStack() as stack:
        yield {
            "timeline": stack.enter_context(serve(f"udp://{LOCALHOST}:0", "--name", "timeline")),
            "video": stack.enter_context(serve(f"ws://{LOCALHOST}:0", "--name", "video")),
        }


def assert_trio_rig_up(row: dict[str, str]) -> None:
    assert row["state"] == "up", row
    assert row["peer"] == "trio-rignet", row
    assert RTT.match(row["round trip"]), row
    assert OFFSET.match(row["clock offset"]), row


@pytest.mark.parametrize(("backend", "trio"), [("trio", False), ("asyncio", False), ("trio", True)])
def test_status_once_two_trio_rigs(two_rigs: dict[str, Serve], backend: str, trio: bool) -> None:
    timeline, video = two_rigs["timeline"], two_rigs["video"]
    args = ["status", timeline.uri, "--rig", f"video={video.uri}", "--once", "--for", BOUND]
    result = rignet(*args, "--backend", backend, *(["--trio"] if trio else []))
    assert result.returncode == 0, result
    assert result.stderr == ""
    rows = status_table(result.stdout)
    assert list(rows) == [timeline.uri, "video"]
    for row in rows.values():
        assert_trio_rig_up(row)
        # Without --trio, the rig answered the status probe: its completion is the last event.
        assert row["last event"].startswith("-" if trio else "status, ")
    assert result.stdout.endswith("all 2 rigs reachable.\n")
    if not trio:
        for rig in two_rigs.values():
            rig.expect_line(r" status from .*: \[0\]$")


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_status_once_rigs_down(two_rigs: dict[str, Serve], backend: str) -> None:
    udp_down = f"udp://{LOCALHOST}:{free_port(socket.SOCK_DGRAM)}"
    tcp_down = f"ws://{LOCALHOST}:{free_port(socket.SOCK_STREAM)}"
    rigs = {"timeline": two_rigs["timeline"]}
    args = [*rig_options(rigs), "--rig", f"cam={udp_down}", "--rig", f"ephys={tcp_down}"]
    result = rignet("status", "--once", "--for", BOUND, *args, "--backend", backend)
    assert result.returncode == 1, result
    rows = status_table(result.stdout)
    assert_trio_rig_up(rows["timeline"])
    assert rows["cam"]["state"] == "down"
    assert rows["cam"]["note"].startswith("nothing is listening")
    assert rows["ephys"]["state"] == "down"
    assert rows["ephys"]["note"].startswith("cannot connect over TCP")
    for name in ("cam", "ephys"):
        assert rows[name]["round trip"] == rows[name]["clock offset"] == "-"
    assert result.stdout.endswith("1 of 3 rigs reachable; unreachable: cam, ephys.\n")
    assert "Traceback" not in result.stderr


def test_status_once_no_rig_reachable(capsys: pytest.CaptureFixture[str]) -> None:
    udp_down = f"udp://{LOCALHOST}:{free_port(socket.SOCK_DGRAM)}"
    assert main(["status", udp_down, "--once", "--for", BOUND]) == 3
    out = capsys.readouterr().out
    assert status_table(out)[udp_down]["state"] == "down"
    assert out.endswith(f"0 of 1 rigs reachable; unreachable: {udp_down}.\n")


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_status_rigs_file(
    two_rigs: dict[str, Serve], tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rigs = tmp_path / f"remote_devices{suffix}"
    if suffix == ".yaml":  # iblrig's file, as yaml.safe_dump writes it
        rigs.write_text("".join(f"{n}: {r.uri}\n" for n, r in sorted(two_rigs.items())))
    else:
        rigs.write_text("[rigs]\n" + "".join(f'{n} = "{r.uri}"\n' for n, r in two_rigs.items()))
    assert main(["status", "--rigs", str(rigs), "--once", "--for", BOUND]) == 0
    rows = status_table(capsys.readouterr().out)
    assert sorted(rows) == sorted(two_rigs)
    for row in rows.values():
        assert_trio_rig_up(row)


def test_status_needs_rigs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["status", "--once"])
    assert exc.value.code == 2
    assert "no rigs: give URIs" in capsys.readouterr().err


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["udp", "ws"])
async def test_status_iblutil_rig(scheme: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A rig that echoes but never sends a tagged message (iblutil) gets only what it parses.

    iblutil 1.20.0 decodes each message as JSON and needs a list of at least two
    elements whose first is an event code (``base.EchoProtocol._receive``); a
    heartbeat ping (``[{"rignet": "ping", ...}]``) would make it warn.
    """
    received: list[bytes] = []
    async with raw_server(scheme) as rig:

        async def echo() -> None:
            try:
                while True:
                    data = await rig.recv()
                    received.append(data)
                    await rig.send(data)
            except anyio.EndOfStream:  # TCP: the command closed its connection
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(echo)
            argv = ["status", rig.uri, "--once", "--for", "0.5"]
            status = await anyio.to_thread.run_sync(main, argv)
            tg.cancel_scope.cancel()
    assert status == 0
    row = status_table(capsys.readouterr().out)[rig.uri]
    assert row["state"] == "up"
    assert row["peer"] == "other"
    assert RTT.match(row["round trip"])
    assert row["clock offset"] == "-"
    assert received
    for data in received:
        message = json.loads(data)
        assert isinstance(message, list), data
        assert len(message) > 1, data
        assert ExpMessage.validate(message[0], allow_bitwise=False) is ExpMessage.EXPSTATUS


@POSIX_SIGNALS
def test_status_live_snapshots_and_ctrl_c(two_rigs: dict[str, Serve]) -> None:
    """Not a terminal: plain snapshots; Ctrl-C ends the view with status 0."""
    with subprocess.Popen(
        command("status", *rig_options(two_rigs)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert re.match(r"^\d{4}-\d\d-\d\d .* \d of 2 rigs up  \(Ctrl-C to stop\)$", first)
            assert proc.stdout.readline().startswith("rig ")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    assert "\x1b[" not in first + out
    assert "Traceback" not in err


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_status_live_redraws_in_place_on_a_terminal(two_rigs: dict[str, Serve]) -> None:
    """On a terminal the view is redrawn in place (cursor up, line cleared); Ctrl-C: 0."""
    import pty

    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "TERM")}
    proc = subprocess.Popen(
        command("status", *rig_options(two_rigs)), stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    output = b""
    try:
        # Two frames drawn: the second begins by moving up over the first (4 lines).
        while b"\x1b[4F" not in output:
            ready, _, _ = select.select([leader], [], [], TIMEOUT)
            assert ready, output
            output += os.read(leader, 4096)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    assert b"\x1b[2K" in output
    assert b"Traceback" not in output


def test_status_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["status", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: rignet status")
    for option in ("--once", "--for", "--trio", "--rigs", "--rig"):
        assert option in out
