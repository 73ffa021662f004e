"""Round trips of two trees of trio-rignet in one process, in alternating bursts.

A plain script for before/after comparisons of the round trip, not a test::

    python benchmarks/paired_rtt.py --base ../old-checkout --scheme ws --backend trio

The tree under test is the ``trio_rignet`` the interpreter imports. ``--base``
names another checkout: its ``src/trio_rignet`` is copied to a temporary
directory as the package ``trio_rignet_base`` (the package imports itself only
relatively, so the copy runs unchanged). One event loop then holds an echo
server and a client of each tree on loopback, and times bursts of ``--per``
confirmed sends of the round-trip benchmark's message on each tree in turn,
swapping which goes first every burst. With ``--where xproc`` each tree's echo
peer runs in a subprocess of its own (the client stays in this process). It
prints the median of the per-burst ratios (tree under test / base) with their
quartiles, and each tree's fastest burst and tenth percentile.

Why: on a shared machine separate runs of ``roundtrip.py`` move by 10-30 %,
and a slow spell lands on one tree and not the other. Here a slow spell
lands on both bursts of a pair: on this project's 2-CPU virtual machine, two
series of 24 alternated ``roundtrip.py`` runs gave median ratios of 1.06 and
1.17 for the same two trees, where series of this script agree within about
2 %. Pin ``--where inproc`` to one CPU (``taskset -c 1``), as the other
in-process round trips are; do not pin ``xproc`` (the peers would inherit it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
from _common import PAYLOAD


def load_base(tree: Path, into: Path) -> Any:
    """Import ``tree``'s trio_rignet as the package ``trio_rignet_base``."""
    source = tree / "src" / "trio_rignet"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"{tree} is not a trio-rignet checkout (no src/trio_rignet)")
    shutil.copytree(source, into / "trio_rignet_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("trio_rignet_base")


_PEER = """
import sys, anyio
package = __import__(sys.argv[1])
async def main():
    async with package.EchoProtocol.server(sys.argv[2] + "://127.0.0.1:0", name="peer") as peer:
        print(peer.local_address[1], flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)  # until the runner closes stdin
anyio.run(main, backend=sys.argv[3])
"""
"""An echo peer in a subprocess: ``python -c _PEER package scheme backend``."""


def start_peer(package: str, scheme: str, backend: str, path: Path) -> subprocess.Popen[str]:
    """An echo peer of ``package`` in a subprocess; its port is its first line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-c", _PEER, package, scheme, backend],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


async def measure(
    trees: dict[str, Any], args: argparse.Namespace, path: Path
) -> dict[str, list[float]]:
    """Microseconds per round trip of each burst, per tree."""
    scheme = args.scheme
    async with AsyncExitStack() as stack:
        sends = {}
        for name, package in trees.items():
            if args.where == "xproc":
                peer = start_peer(package.__name__, scheme, args.backend, path)
                stack.callback(peer.wait)
                assert peer.stdin is not None
                assert peer.stdout is not None
                stack.callback(peer.stdin.close)
                port = int(peer.stdout.readline())
            else:
                server = await stack.enter_async_context(
                    package.EchoProtocol.server(f"{scheme}://127.0.0.1:0", name=f"{name}-peer")
                )
                port = server.local_address[1]
            client = await stack.enter_async_context(
                package.EchoProtocol.client(f"{scheme}://127.0.0.1:{port}")
            )
            sends[name] = client.confirmed_send
        for send in sends.values():
            for _ in range(args.warmup):
                await send(PAYLOAD)
        times: dict[str, list[float]] = {name: [] for name in trees}
        names = list(trees)
        for i in range(args.bursts):
            for name in names if i % 2 else names[::-1]:
                send = sends[name]
                start = time.perf_counter()
                for _ in range(args.per):
                    await send(PAYLOAD)
                times[name].append((time.perf_counter() - start) / args.per * 1e6)
        return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout")
    parser.add_argument("--scheme", choices=["udp", "ws"], default="udp")
    parser.add_argument("--backend", choices=["trio", "asyncio"], default="trio")
    parser.add_argument(
        "--where",
        choices=["inproc", "xproc"],
        default="inproc",
        help="echo peers in this process, or each in a subprocess of its own tree",
    )
    parser.add_argument("--bursts", type=int, default=200, help="bursts per tree")
    parser.add_argument("--per", type=int, default=200, help="round trips per burst")
    parser.add_argument("--warmup", type=int, default=5000, help="round trips first, per tree")
    args = parser.parse_args()
    import trio_rignet

    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base.resolve(), Path(tmp))
        times = anyio.run(
            measure, {"base": base, "new": trio_rignet}, args, Path(tmp), backend=args.backend
        )
    ratios = sorted(n / b for b, n in zip(times["base"], times["new"], strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    print(
        f"{args.scheme} {args.backend} {args.where}: "
        f"{args.bursts} bursts of {args.per} round trips each"
    )
    # Which code was measured: an installed trio_rignet can shadow the checkout.
    print(f"  new: {Path(trio_rignet.__file__).parent}; base: {args.base.resolve()}")
    for name in ("base", "new"):
        values = sorted(times[name])
        print(
            f"  {name}: fastest burst {values[0]:.1f} us, "
            f"10th percentile {values[len(values) // 10]:.1f} us per round trip"
        )
    print(f"  new / base, median of the pairs: {median:.3f} (quartiles {q1:.3f}-{q3:.3f})")


if __name__ == "__main__":
    main()
