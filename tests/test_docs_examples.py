"""Run every code example of the documentation, so the docs cannot drift from the code.

Each ``docs/examples/*.py`` is a complete program included in a page with
``{literalinclude}``; here each one runs in a subprocess and must exit 0 and
print its expected lines. The README's ``python`` block and the demo described
in ``getting-started.md`` run the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = DOCS / "examples"
TIMEOUT = 60  # seconds; a safety net, every example takes well under a second

# Lines each example must print (each one a whole line of stdout, in any order).
EXPECTED: dict[str, list[str]] = {
    "tutorial_endpoints.py": [
        "main: 2 signals confirmed",
        "video: received EXPINIT [{'subject': 'mouse1'}]",
        "video: received EXPSTART ['2024-01-01_1_mouse1', None]",
    ],
    "tutorial_echo_timeout.py": [
        "no echo within 0.1 s; endpoint open: True",
        "retry confirmed; timeouts so far: 1",
    ],
    "tutorial_rigs.py": [
        "init: {'video': [{'camera': 'ready', 'subject': 'mouse1'}], 'ephys': [{'probes': 2}]}",
        "start succeeded on: {'video': ['2024-01-01_1_mouse1', 'recording 2024-01-01_1_mouse1']}",
        "start failed on ephys: RuntimeError: probe01 is not connected",
        "stop: {'video': [None], 'ephys': [None]}",
        "cleanup: {'video': [None], 'ephys': [None]}",
    ],
    "tutorial_events.py": [
        "start: {'behaviour': ['2024-01-01_1_mouse1', 'task started']}",
        "behaviour reports RUNNING",
        "the rig ended the experiment: [{'trials': 42}]",
        "cleanup: {'behaviour': [None]}",
    ],
    "tutorial_cancel.py": [
        "init cancelled: True",
        "main PC awaiting an echo: False",
        "endpoints open: True",
        "late completion: ['camera ready']",
        "cleanup: {'video': [None]}",
    ],
    "services_experiment.py": [
        "  timeline: [0, 'timeline did EXPINFO']",
        "  ephys: ['ephys did EXPINIT']",
        "  video: ['2024-01-01_1_mouse1', 'video did EXPSTART']",
        "  timeline: [20]",
        "  video: ['video did EXPEND']",
        "stop handled by: ['ephys', 'video', 'timeline']",
        "  ephys: ['ephys did EXPCLEANUP']",
        "cleanup handled by: ['ephys', 'video', 'timeline']",
    ],
    "services_failures.py": [
        "timeline: ok, completion data [None]",
        "video: EchoTimeout",
        "ephys: CompletionTimeout",
        "behaviour: RemoteError 'ValueError: no subject called mouse1'",
        "the video rig did not answer in time",
    ],
    "services_endpoints.py": [
        "rigs: ['video', 'ephys']",
        "init: {'video': [None], 'ephys': [None]}",
        "status: {'video': [20]}",
        "video still open: True",
    ],
    "asyncio_main.py": [
        "init: {'video': [{'camera': 'ready'}]}",
        "start: {'video': ['2024-01-01_1_mouse1', None]}",
        "stop: {'video': [None]}",
        "trio imported: False",
    ],
    "asyncio_mixing.py": [
        "queue: video sent EXPSTATUS [0]",
        "init timed out; endpoints open: True",
        "cleanup: {'video': [None]}",
        "heartbeat ran meanwhile: True",
    ],
    "blocking_auxiliaries.py": [
        "info: {'cameras': [0, 'EXPINFO done'], 'timeline': [0, 'EXPINFO done']}",
        "init: {'cameras': ['EXPINIT done'], 'timeline': ['EXPINIT done']}",
        "cameras started",
        "timeline started",
        "start: {'cameras': ['2024-01-01_1_mouse1', 'EXPSTART done'], "
        "'timeline': ['2024-01-01_1_mouse1', 'EXPSTART done']}",
        "stop: {'cameras': ['EXPEND done'], 'timeline': ['EXPEND done']}",
        "status: {'cameras': [20], 'timeline': [20]}",
        "cleanup failed on timeline: RemoteError",
        "cleanup done on: {'cameras': ['EXPCLEANUP done']}",
        "threads left: []",
    ],
    "blocking_threads.py": [
        "start: {'behaviour': ['2024-01-01_1_mouse1', 'task started'], "
        "'video': ['2024-01-01_1_mouse1', None]}",
        "behaviour reports RUNNING",
        "then: no message within 0.2 s",
        "init: no completion within 0.1 s; cancelled",
        "gui thread: video stopped",
        "gui thread: behaviour stopped",
        "init: EndpointClosed: init: the blocking Services is closed",
    ],
    "compat_change_one_import.py": [
        "init: {'video': ['video did EXPINIT'], 'ephys': ['ephys did EXPINIT']}",
        "start: {'video': ['2024-01-01_1_mouse1', 'video did EXPSTART'], "
        "'ephys': ['2024-01-01_1_mouse1', 'ephys did EXPSTART']}",
        "stop: {'video': ['video did EXPEND'], 'ephys': ['ephys did EXPEND']}",
        "cleanup: {'video': ['video did EXPCLEANUP'], 'ephys': ['ephys did EXPCLEANUP']}",
        "TimeoutError: Failed to receive client response in time",
        "still open: True",
    ],
    "reliable_options.py": [
        "{'video': ['ready']}",
        "retransmits: 0",
    ],
    "clocks_align.py": [
        "video up",
        "offset within 2 ms: True",
        "frame time within 2 ms: True",
        "and back: True",
        "estimates logged: True",
        "offline within 2 ms: True",
    ],
    "cli_script.py": [
        'completion: [{"rig": "video", "done": "init"}]',
        "exit status of send init --wait: 0",
        "exit status of send start (--fail-on start): 1",
        "exit status of send status (no status): 2",
        "exit status of serve after Ctrl-C: 0",
    ],
}


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -X dev ARGS...`` from the repository root and return its result."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-X", "dev", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def assert_prints(result: subprocess.CompletedProcess[str], expected: list[str]) -> None:
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"exit status {result.returncode}\n{report}"
    lines = result.stdout.splitlines()
    missing = [line for line in expected if line not in lines]
    assert not missing, f"missing lines {missing}\n{report}"
    assert "Traceback" not in result.stderr, report
    assert "Warning" not in result.stderr, report


def test_every_example_has_expectations() -> None:
    examples = {p.name for p in EXAMPLES.glob("*.py")}
    assert not examples - set(EXPECTED), "add the expected output lines of these examples"
    assert not set(EXPECTED) - examples, "these examples no longer exist"


def test_every_example_is_shown_in_a_page() -> None:
    pages = "\n".join(page.read_text(encoding="utf-8") for page in DOCS.glob("*.md"))
    included = set(re.findall(r"\{literalinclude\}\s+examples/(\S+\.py)", pages))
    assert included == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example(name: str) -> None:
    assert_prints(run_python(str(EXAMPLES / name)), EXPECTED[name])


def test_readme_example(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", readme, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, "README.md should have exactly one python block"
    script = tmp_path / "readme_example.py"
    script.write_text(blocks[0], encoding="utf-8")
    assert_prints(
        run_python(str(script)),
        [
            "{'video': [{'camera': 'ready'}]}",
            "{'video': ['2024-01-01_1_mouse', None]}",
        ],
    )


def test_getting_started_demo() -> None:
    result = run_python("-m", "trio_rignet", "demo")
    assert_prints(result, ["Started 3 simulated rigs over UDP:"])
    out = result.stdout
    for step in ("info CONNECTED", "init", "start", "status RUNNING", "stop", "cleanup"):
        assert re.search(rf"^== {step}\b.* ms\) ==$", out, flags=re.MULTILINE), out
    assert '[0, {"rig": "video", "done": "info"}]' in out
    assert re.search(r"^Experiment \S+_1_demo_subject complete: 6 steps x 3 rigs in", out, re.M)
