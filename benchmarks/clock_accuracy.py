"""Worker: accuracy of the clock offsets a main PC measures, and how fast a killed rig is lost.

    python clock_accuracy.py --seconds 60 --reps 10 --plot ../docs/_static/clock_offset.png

A :class:`trio_rignet.RigService` runs in a subprocess (``clock_accuracy.py
rig``, so its CPU load is real and separate from the main PC's) with an
injected clock: ``time.time() + offset + drift * (time.time() - t0)``, 3.2 ms
ahead and 50 ppm fast by default. Both processes read the same system clock,
so the true offset at any instant is known exactly. The main PC opens
:class:`trio_rignet.Services` on Trio with a heartbeat (``--heartbeat`` 0.2 s,
``--lost-after`` 0.8 s, the defaults) and every ``--every`` 0.1 s reads
``services.state[rig].clock``: the error is ``clock.offset_at(now)`` minus the
true offset at ``now`` (what a conversion with ``to_ours``/``to_peer`` at that
moment would be off by), next to the reported ``uncertainty``.

Two runs of ``--seconds`` each: an *idle* rig, and a *loaded* one: a pure
Python busy thread in the rig process (it competes with the rig's event loop
for the GIL), another process spinning on a CPU, and ``--senders`` tasks on the
main PC sending status signals to the rig back to back over the same endpoint
the heartbeats use.

Then killed-rig detection, ``--reps`` times: a fresh rig process and Services,
wait for the rig's ``up``, let it run a second, ``SIGKILL`` it and time the
``lost`` change from ``services.watch()``.

Errors are reported over the whole run and over the readings after
``--settle`` seconds (15: the drift is fitted after 64 exchanges, 12.8 s at the
default heartbeat). Prints one JSON line (``{"ok": true, "idle": {...},
"loaded": {...}, "detect": {...}}``, errors in µs, times in ms); ``--plot
PATH`` draws the estimated offset, its uncertainty band and the injected offset
over time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import emit, exit_when_stdin_closes, ready, spawn, stop

# ------------------------------------------------------------------ the rig


def busy_loop(stop_event: threading.Event) -> None:
    """Pure Python work that never sleeps: holds the GIL in 5 ms slices."""
    x = 0
    while not stop_event.is_set():
        for i in range(10_000):
            x ^= i


def rig_main(args: argparse.Namespace) -> None:
    """The rig process: a RigService with the injected clock, until stdin closes."""
    import anyio

    from trio_rignet import RigService

    offset, drift, t0 = args.offset_ms / 1e3, args.drift_ppm / 1e6, args.t0

    def rig_clock() -> float:
        now = time.time()
        return now + offset + drift * (now - t0)

    if args.busy_thread:
        threading.Thread(target=busy_loop, args=(threading.Event(),), daemon=True).start()

    async def serve() -> None:
        rig = RigService("udp://127.0.0.1:0", name="video", clock=rig_clock)
        async with rig:
            ready({"port": rig.local_address[1]})
            await anyio.sleep_forever()

    exit_when_stdin_closes()
    anyio.run(serve, backend="trio")


def start_rig(
    args: argparse.Namespace, t0: float, busy: bool
) -> tuple[subprocess.Popen[bytes], str]:
    cmd = [
        sys.executable,
        __file__,
        "rig",
        "--offset-ms",
        str(args.offset_ms),
        "--drift-ppm",
        str(args.drift_ppm),
        "--t0",
        repr(t0),
    ]
    if busy:
        cmd.append("--busy-thread")
    proc, info = spawn(cmd)
    return proc, f"udp://127.0.0.1:{info['port']}"


# ------------------------------------------------------------------ accuracy


def start_spinner() -> subprocess.Popen[bytes]:
    """A process keeping one CPU busy (killed by the caller)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


async def record(args: argparse.Namespace, loaded: bool) -> dict[str, Any]:
    """One run of ``--seconds``: every estimate against the truth."""
    import anyio

    from trio_rignet import ExpStatus, Services, ServicesError

    offset, drift = args.offset_ms / 1e3, args.drift_ppm / 1e6
    t0 = time.time()
    spinner = None
    proc, uri = start_rig(args, t0, busy=loaded)
    series: list[tuple[float, float, float, float, int]] = []  # (t, estimate, truth, unc, n)
    signals = failures = 0
    try:
        if loaded:
            spinner = start_spinner()
        async with Services.open(
            {"video": uri},
            heartbeat=args.heartbeat,
            lost_after=args.lost_after,
            trio_rigs=True,
            timeout=5,
        ) as services:

            async def traffic() -> None:
                nonlocal signals, failures
                while True:
                    try:
                        await services.status(ExpStatus.RUNNING)
                        signals += 1
                    except ServicesError:
                        failures += 1

            async with anyio.create_task_group() as tg:
                if loaded:
                    for _ in range(args.senders):
                        tg.start_soon(traffic)
                start = time.time()
                while time.time() - start < args.seconds:
                    await anyio.sleep(args.every)
                    clock = services.state["video"].clock
                    if clock is None:
                        continue
                    now = time.time()
                    truth = offset + drift * (now - t0)
                    series.append(
                        (now - start, clock.offset_at(now), truth, clock.uncertainty, clock.samples)
                    )
                tg.cancel_scope.cancel()
            last = services.state["video"].clock
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        stop(proc)
    if not series or last is None:
        raise RuntimeError("no clock estimate")
    errors = [abs(est - truth) * 1e6 for _, est, truth, _, _ in series]
    uncs = [unc * 1e6 for *_, unc, _ in series]
    covered = sum(e <= u for e, u in zip(errors, uncs, strict=True)) / len(errors)
    # Once the drift is fitted (64 exchanges: 12.8 s at the default heartbeat).
    settled = [e for e, row in zip(errors, series, strict=True) if row[0] >= args.settle]
    return {
        "estimates": len(series),
        "first_s": round(series[0][0], 3),
        "err_median_us": statistics.median(errors),
        "err_p99_us": percentile(errors, 99),
        "err_max_us": max(errors),
        "settled_estimates": len(settled),
        "settled_median_us": statistics.median(settled) if settled else None,
        "settled_p99_us": percentile(settled, 99) if settled else None,
        "unc_median_us": statistics.median(uncs),
        "unc_p99_us": percentile(uncs, 99),
        "within_unc": covered,
        "drift_ppm": last.drift * 1e6,
        "exchanges": last.samples,
        "signals": signals,
        "signal_failures": failures,
        "series": [[round(v, 9) for v in row[:4]] for row in series],
    }


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# ------------------------------------------------------------------ detection


async def detect(args: argparse.Namespace) -> dict[str, Any]:
    """Kill the rig process ``--reps`` times; ms from the kill to the ``lost`` change."""
    import anyio

    from trio_rignet import Services

    times = []
    for _ in range(args.reps):
        proc, uri = start_rig(args, time.time(), busy=False)
        try:
            async with (
                Services.open(
                    {"video": uri},
                    heartbeat=args.heartbeat,
                    lost_after=args.lost_after,
                    trio_rigs=True,
                ) as services,
                services.watch() as changes,
            ):
                with anyio.fail_after(30):
                    async for change in changes:
                        if change.kind == "up":
                            break
                    # At a random phase of the heartbeat, as a crash would be.
                    await anyio.sleep(1.0 + random.uniform(0, args.heartbeat))
                    proc.kill()
                    killed = anyio.current_time()
                    async for change in changes:
                        if change.kind == "lost":
                            times.append((change.at - killed) * 1e3)
                            break
        finally:
            stop(proc)
    return {
        "times_ms": times,
        "median_ms": statistics.median(times),
        "max_ms": max(times),
        "min_ms": min(times),
    }


# ------------------------------------------------------------------ plot


def plot(results: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "legend.fontsize": 9.5})
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 10), height_ratios=[1.2, 1, 1])
    top = axes[0]
    colors = {"idle": "tab:blue", "loaded": "tab:orange"}
    truth_drawn = False
    for case in ("idle", "loaded"):
        res = results.get(case)
        if not res:
            continue
        t, est, truth, unc = (list(col) for col in zip(*res["series"], strict=True))
        est_ms = [e * 1e3 for e in est]
        unc_ms = [u * 1e3 for u in unc]
        if not truth_drawn:
            top.plot(t, [x * 1e3 for x in truth], color="black", lw=1.2, label="injected offset")
            truth_drawn = True
        top.plot(t, est_ms, color=colors[case], lw=1, ls="--", label=f"estimated, {case} rig")
        top.fill_between(
            t,
            [e - u for e, u in zip(est_ms, unc_ms, strict=True)],
            [e + u for e, u in zip(est_ms, unc_ms, strict=True)],
            color=colors[case],
            alpha=0.2,
            lw=0,
            label=f"± uncertainty, {case} rig",
        )
    if truth_drawn:
        # Around the injected offset: a loaded rig's first estimates can be far off
        # this scale (the panels below show their whole error).
        lo = (
            min(
                x
                for res in results.values()
                if isinstance(res, dict) and "series" in res
                for x in (row[2] for row in res["series"])
            )
            * 1e3
        )
        hi = (
            max(
                x
                for res in results.values()
                if isinstance(res, dict) and "series" in res
                for x in (row[2] for row in res["series"])
            )
            * 1e3
        )
        top.set_ylim(lo - 1.5, hi + 2.5)
    top.set_xlabel("time since start (s)")
    top.set_ylabel("rig clock - main-PC clock (ms)")
    top.set_title(
        f"Clock offset of a rig {args.offset_ms:g} ms ahead, {args.drift_ppm:g} ppm fast "
        f"(heartbeat {args.heartbeat:g} s)"
    )
    top.legend(loc="upper left")
    top.grid(True, alpha=0.3)
    for ax, case in zip(axes[1:], ("idle", "loaded"), strict=True):
        res = results.get(case)
        if not res:
            ax.set_visible(False)
            continue
        t, est, truth, unc = (list(col) for col in zip(*res["series"], strict=True))
        err = [(e - x) * 1e3 for e, x in zip(est, truth, strict=True)]
        unc_ms = [u * 1e3 for u in unc]
        ax.fill_between(
            t,
            [-u for u in unc_ms],
            unc_ms,
            color=colors[case],
            alpha=0.2,
            lw=0,
            label="± reported uncertainty",
        )
        ax.plot(t, err, color=colors[case], lw=1, label="estimate - injected")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("time since start (s)")
        ax.set_ylabel("error (ms)")
        ax.set_title(f"Error of the estimate, {case} rig")
        ax.legend(loc="upper right")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", choices=["bench", "rig"], default="bench")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each run")
    parser.add_argument("--every", type=float, default=0.1, help="seconds between readings")
    parser.add_argument("--reps", type=int, default=10, help="rig kills timed")
    parser.add_argument("--offset-ms", type=float, default=3.2, help="injected offset")
    parser.add_argument("--drift-ppm", type=float, default=50.0, help="injected drift")
    parser.add_argument("--heartbeat", type=float, default=0.2, help="seconds between pings")
    parser.add_argument("--lost-after", type=float, default=0.8, help="seconds of silence")
    parser.add_argument("--settle", type=float, default=15.0, help="settled after, s")
    parser.add_argument("--senders", type=int, default=4, help="signal senders when loaded")
    parser.add_argument("--only", help="comma-separated: idle,loaded,detect")
    parser.add_argument("--plot", type=Path, help="save the offset plot here")
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--busy-thread", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "rig":
        rig_main(args)
        return
    import anyio

    parts = args.only.split(",") if args.only else ["idle", "loaded", "detect"]
    results: dict[str, Any] = {"ok": True, "config": {
        k: getattr(args, k)
        for k in ("seconds", "every", "reps", "offset_ms", "drift_ppm", "heartbeat",
                  "lost_after", "senders", "settle")
    }}  # fmt: skip
    try:
        for part in ("idle", "loaded"):
            if part in parts:
                results[part] = anyio.run(record, args, part == "loaded", backend="trio")
        if "detect" in parts:
            results["detect"] = anyio.run(detect, args, backend="trio")
    except Exception as exc:
        results = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if results.get("ok") and args.plot is not None:
        try:
            plot(results, args, args.plot)
            print(f"plot saved to {args.plot}", file=sys.stderr)
        except ImportError:
            print("matplotlib not installed: no plot", file=sys.stderr)
    for part in ("idle", "loaded"):
        if part in results:
            results[part].pop("series")
    if results.get("ok"):
        print(
            json.dumps({k: v for k, v in results.items() if k != "ok"}, indent=1), file=sys.stderr
        )
    emit(results)


if __name__ == "__main__":
    main()
