"""Benchmark suite: trio-rignet (on Trio and on asyncio) against iblutil 1.20.0.

    python3 -m nox -s bench                  # full run (about 8-13 minutes on 2 cores)
    python3 -m nox -s bench -- --quick       # smoke run (about a minute)
    python benchmarks/run.py --only rtt,floor --reps 3

Needs trio-rignet and iblutil 1.20.0 (``pip install --no-deps iblutil==1.20.0
colorlog numpy``) in the running interpreter; matplotlib for the plot.

Every case runs in a fresh worker process (``roundtrip.py``, ``floor.py``,
``services_cycle.py``, ``memory.py``), which starts its own helper processes
(echo peers, rig simulators, the delay relay) and ends them when done. The
workers of one figure (trio-rignet on Trio, on asyncio, iblutil) start
together, warm up, then take turns: repetition 1 of each, repetition 2 of
each, and so on, the others idle meanwhile, so that load from elsewhere on
the machine hits all three alike. Each figure is the median of ``--reps``
repetitions, with the range (min-max).
The markdown table goes to stdout; ``--json`` saves the raw numbers and
``--plot`` the Services scaling plot (written to
``docs/_static/services_scaling.png`` by a full run).

The ``clock`` section (``clock_accuracy.py``, trio-rignet only, one run) times
clock-offset estimates against an injected offset and drift for ``clock_s``
seconds with an idle rig and again with a loaded one (60 s each in a full run,
15 s in a quick one, ``--clock-seconds`` to change it), and killed-rig
detection; it prints its own tables, "Clock offsets and liveness", and a full
run saves its plot to ``docs/_static/clock_offset.png`` (``--clock-plot``).
It adds about 3 minutes to a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_PLOT = ROOT / "docs" / "_static" / "services_scaling.png"
DEFAULT_CLOCK_PLOT = ROOT / "docs" / "_static" / "clock_offset.png"

LIBS = [("rignet", "trio"), ("rignet", "asyncio"), ("iblutil", "asyncio")]
COLUMNS = ["trio-rignet (Trio)", "trio-rignet (asyncio)", "iblutil 1.20.0"]
SECTIONS = ["rtt", "floor", "throughput", "services", "memory", "clock"]


@dataclass
class Config:
    reps: int = 5
    rtt_n: int = 2000
    rtt_warmup: int = 200
    throughput_s: float = 0.5
    services_counts: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    services_min_s: float = 0.3
    services_timeout: float = 5.0
    memory_n: int = 100_000
    endpoints: int = 128
    relay_ms: float = 1.0
    clock_s: float = 60.0
    clock_reps: int = 10
    case_timeout: float = 300.0


QUICK = Config(
    reps=3,
    rtt_n=300,
    rtt_warmup=50,
    throughput_s=0.2,
    services_counts=[1, 8],
    services_min_s=0.05,
    memory_n=10_000,
    clock_s=15.0,
    clock_reps=3,
)


# ------------------------------------------------------------------ running


def run_worker(args: list[str], timeout: float) -> dict[str, Any]:
    """Run one worker script to the end in a fresh interpreter; return its JSON result."""
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                [sys.executable, *args],
                cwd=HERE,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"no result within {timeout:g} s"}
        lines = proc.stdout.decode(errors="replace").strip().splitlines()
        try:
            result = dict(json.loads(lines[-1]))
        except (IndexError, ValueError):
            result = {"ok": False, "error": f"exit code {proc.returncode}"}
        if not result.get("ok"):
            report_stderr(args, err)
        return result


def report_stderr(args: list[str], err: IO[bytes]) -> None:
    err.seek(0)
    text = err.read().decode(errors="replace").strip()
    if text:
        sys.stderr.write(f"--- {' '.join(args)}\n{text[-2000:]}\n")


class Worker:
    """A worker started with ``--stepped``: one repetition per :meth:`step`."""

    def __init__(self, key: str, args: list[str]) -> None:
        self.key = key
        self.args = args
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, *args, "--stepped"],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
        )
        self.buf = b""
        self.last: dict[str, Any] | None = None

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the worker prints (a turn or its result)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if isinstance(msg, dict):
                    return msg
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {"ok": False, "error": f"no answer within {timeout:g} s"}
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait()
                    return {"ok": False, "error": f"worker exited (code {code})"}
                self.buf += chunk

    @property
    def waiting(self) -> bool:
        return bool(self.last and self.last.get("turn"))

    def step(self, timeout: float) -> None:
        """Run one repetition: say go, wait until the worker is done with it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        self.last = self.read(timeout)

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            if self.last is None or not self.last.get("ok"):
                report_stderr(self.args, self.err)
            self.err.close()


class Runner:
    def __init__(self, cfg: Config, verbose: bool = True, clock_plot: Path | None = None) -> None:
        self.cfg = cfg
        self.verbose = verbose
        self.clock_plot = clock_plot
        self.results: dict[str, Any] = {}

    def record(self, key: str, result: dict[str, Any], seconds: float) -> None:
        result["seconds"] = round(seconds, 2)
        self.results[key] = result
        if "cpu" in result:  # a second figure of the same runs, under its own key
            self.results[f"{key}/cpu"] = {"ok": True, "values": result["cpu"]}
        if self.verbose:
            status = summary(result) if result.get("ok") else f"FAILS: {result.get('error')}"
            print(f"  {key}: {status} ({result['seconds']} s)", file=sys.stderr, flush=True)

    def case(self, key: str, args: list[str], timeout: float | None = None) -> None:
        """One worker run to the end on its own."""
        t0 = time.perf_counter()
        result = run_worker(args, timeout or self.cfg.case_timeout)
        self.record(key, result, time.perf_counter() - t0)

    def group(self, cases: list[tuple[str, list[str]]]) -> None:
        """Workers whose figures are compared, with their repetitions interleaved.

        All start at once and warm up; then each repetition runs once per
        worker in turn (the others wait, idle), so a burst of load from
        elsewhere on the machine hits all of them alike.
        """
        t0 = time.perf_counter()
        timeout = self.cfg.case_timeout
        workers = [Worker(key, args) for key, args in cases]
        try:
            for w in workers:
                w.last = w.read(timeout)
            while any(w.waiting for w in workers):
                for w in workers:
                    if w.waiting:
                        w.step(timeout)
        finally:
            for w in workers:
                w.close()
        seconds = (time.perf_counter() - t0) / len(workers)
        for w in workers:
            last = w.last or {"ok": False, "error": "no result"}
            self.record(w.key, last, seconds)

    # Each section fills self.results under keys that the table reads.

    def rtt(self) -> None:
        c = self.cfg
        for where in ("inproc", "xproc"):
            for scheme in ("udp", "ws"):
                self.group(
                    [
                        (
                            f"rtt/{where}/{scheme}/{lib}-{backend}",
                            cli("roundtrip.py", "rtt", lib=lib, backend=backend, scheme=scheme,
                                where=where, n=c.rtt_n, warmup=c.rtt_warmup, reps=c.reps),
                        )
                        for lib, backend in LIBS
                    ]
                )  # fmt: skip

    def floor(self) -> None:
        c = self.cfg
        for scheme in ("udp", "ws"):
            self.group(
                [
                    (
                        f"floor/{scheme}/{kind}",
                        cli("floor.py", kind=kind, scheme=scheme, n=c.rtt_n,
                            warmup=c.rtt_warmup, reps=c.reps),
                    )
                    for kind in ("selectors", "trio", "asyncio", "protocol")
                ]
            )  # fmt: skip
        n = max(50, c.rtt_n // 8)
        self.case(
            "floor/relay",
            cli("floor.py", kind="relay", relay_ms=c.relay_ms, n=n, warmup=20, reps=c.reps),
        )

    def throughput(self) -> None:
        c = self.cfg
        for senders, peers in THROUGHPUT_CASES:
            self.group(
                [
                    (
                        f"throughput/{senders}x{peers}/{lib}-{backend}",
                        cli("roundtrip.py", "throughput", lib=lib, backend=backend,
                            senders=senders, peers=peers, duration=c.throughput_s,
                            reps=c.reps),
                    )
                    for lib, backend in LIBS
                ]
            )  # fmt: skip

    def services(self) -> None:
        c = self.cfg
        for relay in (None, c.relay_ms):
            net = "bare" if relay is None else "relay"
            for rigs in ("iblutil", "rignet"):
                for count in c.services_counts:
                    self.group(
                        [
                            (
                                f"services/{net}/{rigs}/{count}/{lib}-{backend}",
                                cli("services_cycle.py", lib=lib, backend=backend, rigs=rigs,
                                    count=count, relay_ms=relay, reps=c.reps,
                                    min_time=c.services_min_s, timeout=c.services_timeout),
                            )
                            for lib, backend in LIBS
                        ]
                    )  # fmt: skip

    def memory(self) -> None:
        c = self.cfg
        for lib, backend in LIBS:
            self.case(
                f"memory/sends/{lib}-{backend}",
                cli("memory.py", "sends", lib=lib, backend=backend, n=c.memory_n),
            )
            self.case(
                f"memory/endpoints/{lib}-{backend}",
                cli("memory.py", "endpoints", lib=lib, backend=backend, count=c.endpoints),
            )

    def clock(self) -> None:
        """Clock offsets of a RigService with an injected clock, killed-rig detection.

        trio-rignet only (iblutil measures neither); one run, no repetitions to
        interleave. Takes twice ``clock_s`` plus about 3 s per kill.
        """
        c = self.cfg
        plot = None if self.clock_plot is None else self.clock_plot.resolve()
        self.case(
            "clock",
            cli("clock_accuracy.py", seconds=c.clock_s, reps=c.clock_reps, plot=plot),
            timeout=max(c.case_timeout, 2 * c.clock_s + 10 * c.clock_reps + 120),
        )


def cli(script: str, *positional: str, **options: object) -> list[str]:
    """Command line of a worker: ``cli("x.py", "rtt", n=5)`` is ``x.py rtt --n 5``.

    Options whose value is None are left out.
    """
    args = [script, *positional]
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


THROUGHPUT_CASES = [(1, 1), (8, 1), (64, 1), (8, 8), (64, 8)]


# ------------------------------------------------------------------ figures


def summary(result: dict[str, Any]) -> str:
    if "values" in result:
        return fmt_stats(result["values"])
    if "detect" in result:
        return (
            f"offset error p99 {fmt_num(result['idle']['err_p99_us'])} µs idle, "
            f"{fmt_num(result['loaded']['err_p99_us'])} µs loaded; lost after "
            f"{fmt_num(result['detect']['median_ms'])} ms"
        )
    return "ok"


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def fmt_num(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_stats(values: list[float]) -> str:
    """``median [min-max]``."""
    if len(values) == 1:
        return fmt_num(values[0])
    return f"{fmt_num(med(values))} [{fmt_num(min(values))}-{fmt_num(max(values))}]"


def ratio_text(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs == 0:
        return "—"
    return f"{ours / theirs:.2f}"


class Table:
    def __init__(self, results: dict[str, Any]) -> None:
        self.r = results
        self.lines = [
            "| figure | " + " | ".join(COLUMNS) + " | ratio to iblutil (Trio / asyncio) |",
            "|---|" + "---:|" * (len(COLUMNS) + 1),
        ]
        self.pending = ""

    def section(self, title: str) -> None:
        """Start a section; its header row is written with its first row."""
        self.pending = f"| **{title}** |" + " |" * (len(COLUMNS) + 1)

    def add(self, line: str) -> None:
        if self.pending:
            self.lines.append(self.pending)
            self.pending = ""
        self.lines.append(line)

    def cell(self, key: str) -> tuple[str, float | None]:
        res = self.r.get(key)
        if res is None:
            return "not run", None
        if not res.get("ok"):
            return "fails", None
        return fmt_stats(res["values"]), med(res["values"])

    def row(self, label: str, keys: list[str], ratio: bool = True) -> None:
        cells = [self.cell(k) for k in keys]
        if not any(v is not None or t == "fails" for t, v in cells):
            return
        texts = [t for t, _ in cells]
        if ratio:
            ibl = cells[2][1]
            rt = f"{ratio_text(cells[0][1], ibl)} / {ratio_text(cells[1][1], ibl)}"
        else:
            rt = "—"
        self.add(f"| {label} | " + " | ".join(texts) + f" | {rt} |")

    def raw_row(self, label: str, texts: list[str], rt: str = "—") -> None:
        self.add(f"| {label} | " + " | ".join(texts) + f" | {rt} |")

    def text(self) -> str:
        return "\n".join(self.lines)


def lib_keys(prefix: str) -> list[str]:
    return [f"{prefix}/{lib}-{backend}" for lib, backend in LIBS]


def build_table(results: dict[str, Any], cfg: Config) -> str:
    t = Table(results)
    t.section("Confirmed-send round trip, one sender (µs, lower is better)")
    for where, wlabel in (
        ("inproc", "both ends in one process"),
        ("xproc", "peer in a subprocess"),
    ):
        for scheme, slabel in (("udp", "UDP"), ("ws", "TCP")):
            t.row(f"{slabel}, {wlabel}", lib_keys(f"rtt/{where}/{scheme}"))
    t.section("Floor: the same round trip without a library, one process (µs)")
    for scheme, slabel in (("udp", "UDP"), ("ws", "TCP")):
        text, _ = t.cell(f"floor/{scheme}/selectors")
        if results.get(f"floor/{scheme}/selectors"):
            t.raw_row(f"{slabel}, plain `socket` + `selectors` (epoll) loop", [text] * 3)
        t.row(
            f"{slabel}, raw sockets on the event loop (`trio.socket` / `loop.sock_*` / "
            "asyncio protocols)",
            [f"floor/{scheme}/trio", f"floor/{scheme}/asyncio", f"floor/{scheme}/protocol"],
            ratio=False,
        )
    if results.get("floor/relay"):
        text, _ = t.cell("floor/relay")
        t.raw_row(
            f"UDP through the {cfg.relay_ms:g} ms relay (plain sockets; {4 * 2 * cfg.relay_ms:g} "
            "ms cycle floor = 4 of these)",
            [text] * 3,
        )
    t.section("Throughput, UDP, peers in a subprocess (confirmed messages/s, higher is better)")
    for senders, peers in THROUGHPUT_CASES:
        s = "sender" if senders == 1 else "senders"
        p = "peer" if peers == 1 else "peers"
        t.row(f"{senders} {s} → {peers} {p}", lib_keys(f"throughput/{senders}x{peers}"))
    for net, nlabel in (
        ("bare", "bare loopback"),
        ("relay", f"{cfg.relay_ms:g} ms each way (relay)"),
    ):
        t.section(f"Services cycle init+start+stop+cleanup, UDP, {nlabel} (ms, lower is better)")
        for rigs, rlabel in (("iblutil", "iblutil rigs"), ("rignet", "RigService rigs")):
            for count in cfg.services_counts:
                t.row(f"{rlabel}, N = {count}", lib_keys(f"services/{net}/{rigs}/{count}"))
    t.section(
        f"Main PC's CPU per rig and signal, Services, UDP, {cfg.relay_ms:g} ms each way "
        "(µs of `time.process_time()` in the main process; rigs and relay elsewhere; "
        "lower is better)"
    )
    for rigs, rlabel in (("iblutil", "iblutil rigs"), ("rignet", "RigService rigs")):
        for count in cfg.services_counts:
            if count >= 32 or count == max(cfg.services_counts):
                t.row(f"{rlabel}, N = {count}", cpu_keys(f"services/relay/{rigs}/{count}"))
    memory_rows(t, results, cfg)
    return t.text()


def cpu_keys(prefix: str) -> list[str]:
    return [f"{prefix}/{lib}-{backend}/cpu" for lib, backend in LIBS]


def growth(res: dict[str, Any]) -> tuple[int, int, int]:
    """RSS (KiB), allocated blocks and gc objects gained from half-way to the end."""
    end, half = res["end"], res["half"]
    blocks = end.get("blocks", 0) - half.get("blocks", 0)
    return end["rss"] - half["rss"], blocks, end["objects"] - half["objects"]


def growth_text(res: dict[str, Any]) -> str:
    rss, blocks, objects = growth(res)
    return f"{rss:+d} / {blocks:+d} / {objects:+d}"


def memory_rows(t: Table, results: dict[str, Any], cfg: Config) -> None:
    sends = [results.get(k) for k in lib_keys("memory/sends")]
    ends = [results.get(k) for k in lib_keys("memory/endpoints")]
    if not any(sends) and not any(ends):
        return
    t.section("Memory, UDP, fresh process per case (one run each)")

    def pick(res: dict[str, Any] | None, fn: Callable[[dict[str, Any]], float]) -> float | None:
        if not res or not res.get("ok"):
            return None
        return fn(res)

    def texts(vals: list[float | None], f: Callable[[float], str], ress: list[Any]) -> list[str]:
        out = []
        for v, res in zip(vals, ress, strict=True):
            if v is not None:
                out.append(f(v))
            else:
                out.append("fails" if res else "not run")
        return out

    n = cfg.memory_n
    peak = [pick(r, lambda r: r["end"]["maxrss"] / 1024) for r in sends]
    t.raw_row(
        f"peak RSS after {n:,} confirmed sends (MiB)",
        texts(peak, lambda v: f"{v:.1f}", sends),
        f"{ratio_text(peak[0], peak[2])} / {ratio_text(peak[1], peak[2])}",
    )
    t.raw_row(
        f"growth from {n // 2:,} to {n:,} sends: RSS KiB, allocated blocks, gc objects",
        [growth_text(r) if r and r.get("ok") else ("fails" if r else "not run") for r in sends],
    )
    peak_e = [pick(r, lambda r: r["after"]["maxrss"] / 1024) for r in ends]
    t.raw_row(
        f"peak RSS with {cfg.endpoints} open endpoints (MiB)",
        texts(peak_e, lambda v: f"{v:.1f}", ends),
        f"{ratio_text(peak_e[0], peak_e[2])} / {ratio_text(peak_e[1], peak_e[2])}",
    )
    per = [
        pick(r, lambda r: (r["after"]["rss"] - r["before"]["rss"]) / cfg.endpoints) for r in ends
    ]
    t.raw_row(
        "memory per open endpoint (KiB)",
        texts(per, lambda v: f"{v:.1f}", ends),
        f"{ratio_text(per[0], per[2])} / {ratio_text(per[1], per[2])}",
    )


def build_clock_table(results: dict[str, Any]) -> str:
    """The "Clock offsets and liveness" tables (empty if not run)."""
    res = results.get("clock")
    if res is None:
        return ""
    title = "**Clock offsets and liveness** (trio-rignet only)"
    if not res.get("ok"):
        return f"{title}: fails ({res.get('error')})"
    c = res["config"]
    idle, loaded, detect = res.get("idle"), res.get("loaded"), res.get("detect")
    out = [
        f"{title}: a RigService in a subprocess with an injected clock "
        f"{c['offset_ms']:g} ms ahead and {c['drift_ppm']:g} ppm fast; Services on Trio, "
        f"heartbeat {c['heartbeat']:g} s; the estimate read every {c['every']:g} s for "
        f"{c['seconds']:g} s per run, its error taken as `clock.offset_at(now)` minus the "
        "injected offset at that instant. Loaded: a busy Python thread in the rig process, "
        f"a process spinning on a CPU, {c['senders']} tasks sending status signals back to "
        "back. One run.",
        "",
        "| figure | idle rig | loaded rig |",
        "|---|---:|---:|",
    ]

    def row(label: str, fn: Callable[[dict[str, Any]], str]) -> None:
        cells = [fn(r) if r else "not run" for r in (idle, loaded)]
        out.append(f"| {label} | " + " | ".join(cells) + " |")

    row("offset error, median (µs)", lambda r: fmt_num(r["err_median_us"]))
    row("offset error, 99th percentile (µs)", lambda r: fmt_num(r["err_p99_us"]))
    row("offset error, largest (µs)", lambda r: fmt_num(r["err_max_us"]))
    if (idle or loaded or {}).get("settled_estimates"):
        settle = f"after the first {c['settle']:g} s"
        row(f"offset error {settle}, median (µs)", lambda r: fmt_num(r["settled_median_us"]))
        row(f"offset error {settle}, 99th percentile (µs)", lambda r: fmt_num(r["settled_p99_us"]))
    row("reported uncertainty, median (µs)", lambda r: fmt_num(r["unc_median_us"]))
    row("reported uncertainty, 99th percentile (µs)", lambda r: fmt_num(r["unc_p99_us"]))
    row("estimates whose error is within their uncertainty", lambda r: f"{r['within_unc']:.1%}")
    row(
        f"drift at the end (ppm; injected {c['drift_ppm']:g})",
        lambda r: f"{r['drift_ppm']:.1f}",
    )
    row("estimates read / heartbeat exchanges", lambda r: f"{r['estimates']} / {r['exchanges']}")
    row(
        "status signals answered (failed) meanwhile",
        lambda r: f"{r['signals']:,} ({r['signal_failures']})",
    )
    if detect:
        out += [
            "",
            f"| killed rig (SIGKILL) until the `lost` change, {len(detect['times_ms'])} kills "
            f"(ms) | median | min | max | bound: lost_after + heartbeat |",
            "|---|---:|---:|---:|---:|",
            f"| lost_after = {c['lost_after']:g} s, heartbeat = {c['heartbeat']:g} s | "
            f"{fmt_num(detect['median_ms'])} | {fmt_num(detect['min_ms'])} | "
            f"{fmt_num(detect['max_ms'])} | {(c['lost_after'] + c['heartbeat']) * 1e3:.0f} |",
        ]
    return "\n".join(out)


# ------------------------------------------------------------------ targets


def value(results: dict[str, Any], key: str) -> float | None:
    res = results.get(key)
    if not res or not res.get("ok"):
        return None
    return med(res["values"])


def verdict(ok: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[ok]


def build_targets(results: dict[str, Any], cfg: Config) -> str:
    out = ["Targets (medians from the table above):", ""]

    def both(a: float | None, b: float | None, limit: float) -> bool | None:
        if a is None or b is None:
            return None
        return a / b <= limit

    for scheme, slabel in (("udp", "UDP"), ("ws", "TCP")):
        ibl = value(results, f"rtt/inproc/{scheme}/iblutil-asyncio")
        floor = value(results, f"floor/{scheme}/selectors")
        for lib, backend in LIBS[:2]:
            ours = value(results, f"rtt/inproc/{scheme}/{lib}-{backend}")
            if ours is None:
                continue
            loop_floor = value(results, f"floor/{scheme}/{backend}")
            r_ibl = f"{ours / ibl:.2f}x iblutil" if ibl else "iblutil fails"
            parts = [f"{r_ibl} (target ≤ 0.5x: {verdict(both(ours, ibl, 0.5))})"]
            if floor:
                parts.append(
                    f"{ours / floor:.2f}x the plain-socket floor "
                    f"(target ≤ 2x: {verdict(both(ours, floor, 2.0))})"
                )
            if loop_floor:
                parts.append(
                    f"{ours / loop_floor:.2f}x the raw-socket floor on {backend} "
                    f"(target ≤ 2x: {verdict(both(ours, loop_floor, 2.0))})"
                )
            out.append(
                f"- Confirmed send, {slabel} in one process, {backend}: {fmt_num(ours)} µs = "
                + ", ".join(parts)
                + "."
            )
    n32 = 32 if 32 in cfg.services_counts else max(cfg.services_counts)
    floor_ms = 4 * 2 * cfg.relay_ms
    for rigs, rlabel in (("iblutil", "iblutil rigs"), ("rignet", "RigService rigs")):
        for lib, backend in LIBS[:2]:
            bare = value(results, f"services/bare/{rigs}/{n32}/{lib}-{backend}")
            bare_ibl = value(results, f"services/bare/{rigs}/{n32}/iblutil-asyncio")
            if bare is not None:
                rt = f"{bare / bare_ibl:.2f}x iblutil" if bare_ibl else "iblutil fails"
                out.append(
                    f"- Services cycle, N = {n32}, bare, {rlabel}, {backend}: "
                    f"{fmt_num(bare)} ms = {rt} (target ≤ 0.5x: "
                    f"{verdict(both(bare, bare_ibl, 0.5))})."
                )
            rel = value(results, f"services/relay/{rigs}/{n32}/{lib}-{backend}")
            rel_ibl = value(results, f"services/relay/{rigs}/{n32}/iblutil-asyncio")
            if rel is not None:
                rt = f"{rel / rel_ibl:.2f}x iblutil" if rel_ibl else "iblutil fails"
                out.append(
                    f"- Services cycle, N = {n32}, {cfg.relay_ms:g} ms each way, {rlabel}, "
                    f"{backend}: {fmt_num(rel)} ms = {rt} (target ≤ 0.1x: "
                    f"{verdict(both(rel, rel_ibl, 0.1))}), {rel / floor_ms:.2f}x the "
                    f"{floor_ms:g} ms latency floor (target ≤ 3x: {verdict(rel <= 3 * floor_ms)})."
                )
    lo, hi = min(cfg.services_counts), max(cfg.services_counts)
    if hi > lo:
        limit = hi / lo / 4
        for net in ("bare", "relay"):
            for rigs in ("iblutil", "rignet"):
                parts = []
                for lib, backend in LIBS:
                    a = value(results, f"services/{net}/{rigs}/{lo}/{lib}-{backend}")
                    b = value(results, f"services/{net}/{rigs}/{hi}/{lib}-{backend}")
                    if a and b:
                        if lib == "iblutil":
                            parts.append(f"iblutil {b / a:.1f}x")
                        else:
                            parts.append(f"{backend} {b / a:.1f}x ({verdict(b / a <= limit)})")
                if parts:
                    rlabel = "iblutil rigs" if rigs == "iblutil" else "RigService rigs"
                    out.append(
                        f"- Growth of the cycle time from N = {lo} to N = {hi} ({hi // lo}x the "
                        f"rigs), {net}, {rlabel}: " + ", ".join(parts) + " (target: well below "
                        f"linear, here taken as ≤ {limit:g}x, a quarter of linear)."
                    )
    for lib, backend in LIBS:
        res = results.get(f"memory/sends/{lib}-{backend}")
        if res and res.get("ok"):
            rss, blocks, objects = growth(res)
            half = cfg.memory_n // 2
            flat = rss < 256 and blocks < half // 100 and objects < 100
            name = "iblutil" if lib == "iblutil" else f"trio-rignet on {backend}"
            out.append(
                f"- Memory, {name}: RSS {rss:+d} KiB, {blocks:+d} allocated blocks, "
                f"{objects:+d} gc objects from {half:,} to {cfg.memory_n:,} sends (target flat, "
                f"taken as < 256 KiB of RSS, < 1 block per 100 messages and < 100 objects: "
                f"{verdict(flat)})."
            )
    clock = results.get("clock")
    if clock and clock.get("ok"):
        c = clock["config"]
        for case in ("idle", "loaded"):
            if case in clock:
                p99 = clock[case]["err_p99_us"]
                out.append(
                    f"- Clock offset, {case} rig: 99 % of the estimates within "
                    f"{fmt_num(p99)} µs of the injected offset (target ≤ 2 ms, the tests' "
                    f"bound: {verdict(p99 <= 2000)})."
                )
        if "detect" in clock:
            d = clock["detect"]
            bound = (c["lost_after"] + c["heartbeat"]) * 1e3
            out.append(
                f"- Killed rig reported lost: median {fmt_num(d['median_ms'])} ms, at most "
                f"{fmt_num(d['max_ms'])} ms over {len(d['times_ms'])} kills (target ≤ "
                f"lost_after + one heartbeat = {bound:.0f} ms: {verdict(d['max_ms'] <= bound)})."
            )
    return "\n".join(out)


# --------------------------------------------------------------------- plot


def plot(results: dict[str, Any], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Stacked panels, sized for the documentation's text column (about 700 px):
    # shown at that width, the labels and legends stay readable.
    plt.rcParams.update({"font.size": 11, "legend.fontsize": 9.5})
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 10), sharey=False)
    styles = {
        "rignet-trio": ("trio-rignet (Trio)", "tab:blue", "o"),
        "rignet-asyncio": ("trio-rignet (asyncio)", "tab:green", "s"),
        "iblutil-asyncio": ("iblutil 1.20.0", "tab:red", "^"),
    }
    for ax, net, title in (
        (axes[0], "bare", "bare loopback"),
        (axes[1], "relay", f"{cfg.relay_ms:g} ms each way"),
    ):
        for rigs, ls in (("iblutil", "-"), ("rignet", "--")):
            for lib, backend in LIBS:
                label, color, marker = styles[f"{lib}-{backend}"]
                xs, ys, lo, hi = [], [], [], []
                for n in cfg.services_counts:
                    res = results.get(f"services/{net}/{rigs}/{n}/{lib}-{backend}")
                    if res and res.get("ok"):
                        v = res["values"]
                        xs.append(n)
                        ys.append(med(v))
                        lo.append(med(v) - min(v))
                        hi.append(max(v) - med(v))
                if xs:
                    rl = "iblutil rigs" if rigs == "iblutil" else "RigService rigs"
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=[lo, hi],
                        ls=ls,
                        color=color,
                        marker=marker,
                        capsize=3,
                        label=f"{label}, {rl}",
                    )
        anchor = [
            med(res["values"])
            for n in cfg.services_counts[:1]
            if (res := results.get(f"services/{net}/iblutil/{n}/iblutil-asyncio")) and res.get("ok")
        ]
        if anchor and len(cfg.services_counts) > 1:
            n0 = cfg.services_counts[0]
            ns = cfg.services_counts
            ax.plot(
                ns,
                [anchor[0] * n / n0 for n in ns],
                color="grey",
                ls="-.",
                lw=1,
                label="linear in N (from iblutil at N = 1)",
            )
        if net == "relay":
            ax.axhline(4 * 2 * cfg.relay_ms, color="grey", ls=":", label="latency floor (4 x 2 ms)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cfg.services_counts, [str(n) for n in cfg.services_counts])
        ax.set_xlabel("rigs (N)")
        ax.set_ylabel("ms per cycle (init, start, stop, cleanup)")
        ax.set_title(f"Services cycle, UDP, {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(loc="upper left")
    guides = [
        (h, lab)
        for h, lab in zip(*axes[1].get_legend_handles_labels(), strict=True)
        if lab.startswith(("linear", "latency"))
    ]
    if guides:
        axes[1].legend(*zip(*guides, strict=True), loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --------------------------------------------------------------------- main


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    versions = []
    for mod in ("trio_rignet", "trio", "anyio", "iblutil"):
        try:
            from importlib.metadata import version

            versions.append(f"{mod.replace('_', '-')} {version(mod.replace('_', '-'))}")
        except Exception:
            versions.append(f"{mod} (not installed)")
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    if commit:
        versions[0] += f" (source tree {commit})"
    return (
        f"{platform.python_implementation()} {platform.python_version()} on {platform.system()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average before the run {load}; "
        + ", ".join(versions)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run")
    parser.add_argument("--reps", type=int, help="repetitions per figure")
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.add_argument("--counts", help="Services rig counts, e.g. 1,8,32,128")
    parser.add_argument("--json", type=Path, help="save raw results here")
    parser.add_argument("--from-json", type=Path, help="print table/plot from saved results")
    parser.add_argument("--plot", type=Path, help="save the Services plot here")
    parser.add_argument("--clock-plot", type=Path, help="save the clock offset plot here")
    parser.add_argument("--clock-seconds", type=float, help="length of each clock run, s")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args()

    cfg = QUICK if args.quick else Config()
    if args.reps:
        cfg.reps = args.reps
    if args.clock_seconds:
        cfg.clock_s = args.clock_seconds
    if args.counts:
        cfg.services_counts = [int(x) for x in args.counts.split(",")]
    sections = args.only.split(",") if args.only else SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        results, header = saved["results"], saved["machine"]
        cfg.__dict__.update(saved.get("config", {}))
        elapsed = saved.get("elapsed_s", 0.0)
    else:
        header = machine()
        clock_plot = args.clock_plot or (None if args.quick or args.no_plot else DEFAULT_CLOCK_PLOT)
        runner = Runner(cfg, verbose=not args.quiet, clock_plot=clock_plot)
        t0 = time.perf_counter()
        for name in SECTIONS:
            if name in sections:
                if not args.quiet:
                    print(f"[{name}]", file=sys.stderr, flush=True)
                getattr(runner, name)()
        elapsed = time.perf_counter() - t0
        results = runner.results
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "machine": header,
                        "config": cfg.__dict__,
                        "elapsed_s": elapsed,
                        "results": results,
                    },
                    indent=1,
                )
            )

    mode = "quick smoke run" if args.quick else "full run"
    print(f"Benchmarks ({mode}, {cfg.reps} repetitions, median [min-max]; {elapsed:.0f} s)\n")
    print(header + "\n")
    table = build_table(results, cfg)
    if table.count("\n") > 1:  # more than the header
        print(table + "\n")
    clock_table = build_clock_table(results)
    if clock_table:
        print(clock_table + "\n")
    print(build_targets(results, cfg))

    plot_path = args.plot or (None if args.quick or args.no_plot else DEFAULT_PLOT)
    if (
        plot_path is not None
        and not args.no_plot
        and any(k.startswith("services/") for k in results)
    ):
        try:
            plot(results, cfg, plot_path)
            print(f"\nPlot saved to {plot_path}")
        except ImportError:
            print("\n(matplotlib not installed: no plot)")


if __name__ == "__main__":
    main()
