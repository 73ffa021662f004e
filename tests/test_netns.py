"""A full UDP send buffer, in a network namespace with a rate-limited loopback.

Observed before: concurrent UDP sends with the send buffer full raised
``BusyResourceError`` (two tasks waiting for the same socket to be writable),
which escaped and killed a RigService. Now only the socket's writer task ever
waits for it, and every signal of a burst completes.

Needs root (``unshare -n`` and ``tc``): skipped, saying so, where unavailable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "netns" / "full_send_buffer.py"
SHAPE = "ip link set lo up && tc qdisc add dev lo root tbf rate 16mbit burst 16kb latency 2s"


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if not (shutil.which("unshare") and shutil.which("tc") and shutil.which("ip")):
        return "unshare, tc or ip is not installed"
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", SHAPE], capture_output=True, text=True, check=False
    )
    if probe.returncode:
        return f"cannot make a rate-limited network namespace here (needs root): {probe.stderr}"
    return None


REASON = _netns_unavailable()


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_a_burst_with_the_send_buffer_full_completes(backend: str) -> None:
    result = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            f'{SHAPE} && exec "$0" "$1" "$2"',
            sys.executable,
            str(SCRIPT),
            backend,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["full"], "the namespace did not fill the send buffer: the test proves nothing"
    assert report["outcomes"] == {"completed": 100}, report
    assert report["after"] == 4000  # the rig still answers
