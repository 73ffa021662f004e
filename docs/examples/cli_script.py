"""Drive the rignet command from a script: a simulated rig in a subprocess, then one-shot sends."""

import contextlib
import io
import re
import signal
import subprocess
import sys

from trio_rignet.cli import main as rignet


def run(*argv: str) -> int:
    """Run `rignet ARGV...` in this process; return its exit status."""
    try:
        return rignet(list(argv))
    except SystemExit as exc:  # argparse exits with status 2 on bad arguments
        return int(exc.code or 0)


# `rignet serve` in a subprocess; its first line says where it listens.
command = [sys.executable, "-m", "trio_rignet", "serve", "udp://127.0.0.1:0", "--name", "video"]
with subprocess.Popen(
    [*command, "--fail-on", "start"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
) as serve:
    assert serve.stdout is not None
    found = re.search(r"listening on (\S+)", serve.stdout.readline())
    assert found, "rignet serve did not say where it listens"
    uri = found.group(1)

    with contextlib.redirect_stderr(io.StringIO()):  # error messages are not shown here
        status = run("send", uri, "init", "--data", '{"subject": "mouse1"}', "--wait")
        print("exit status of send init --wait:", status)
        print("exit status of send start (--fail-on start):", run("send", uri, "start", "--wait"))
        print("exit status of send status (no status):", run("send", uri, "status"))

    serve.send_signal(signal.SIGINT)  # what Ctrl-C does
    print("exit status of serve after Ctrl-C:", serve.wait(timeout=10))
