"""Throughput of :class:`trio_rignet.StreamDecoder` on a realistic TCP stream.

A plain script, not a test: ``python benchmarks/bench_framing.py``.

The stream is ~1 MB of iblutil-style messages (init, start, status, info with
nested data, alyx, stop, cleanup, error reports) written back to back as
iblutil does on TCP. It is fed in 1-byte pieces (worst case: a peer trickling
bytes) and in 4 KiB pieces (a typical socket read), and the script prints MB/s.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable

from trio_rignet import StreamDecoder
from trio_rignet._messages import (
    build_alyx,
    build_cleanup,
    build_error,
    build_info,
    build_init,
    build_start,
    build_status,
    build_stop,
)


class _Alyx:
    base_url = "https://alyx.internationalbrainlab.org"
    user = "experimenter"
    _token = "0123456789abcdef0123456789abcdef01234567"
    is_logged_in = True


def make_stream(target_bytes: int, seed: int = 0) -> tuple[bytes, int]:
    """Return ``(stream, message_count)`` with at least ``target_bytes`` bytes."""
    rng = random.Random(seed)
    subjects = ["SWC_043", "ZFM-01935", "KS023", "CSHL_020", "\u00e9l\u00e8ve_7"]

    def exp_ref() -> dict[str, object]:
        return {
            "date": f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
            "sequence": rng.randint(1, 5),
            "subject": rng.choice(subjects),
        }

    def info_data() -> dict[str, object]:
        return {
            "task": "_iblrig_tasks_trainingChoiceWorld",
            "trial": rng.randint(0, 2000),
            "contrasts": [rng.choice([1.0, 0.25, 0.125, 0.0625, 0.0]) for _ in range(8)],
            "notes": 'quote " and [brackets] and {braces} and \\ backslash',
            "devices": {"camera": {"left": 60, "right": 150}, "microphone": None},
        }

    builders: list[Callable[[], bytes]] = [
        lambda: build_init({"exp_ref": exp_ref(), "pcs": ["video", "ephys", "timeline"]}),
        lambda: build_start(exp_ref(), {"protocol": "v1", "n_trials": rng.randint(1, 900)}),
        lambda: build_status(rng.choice(["CONNECTED", "INITIALIZED", "RUNNING", "STOPPED"])),
        lambda: build_info(20, info_data()),
        lambda: build_alyx(_Alyx()),
        lambda: build_stop({"reason": "done"}, immediately=rng.random() < 0.1),
        lambda: build_cleanup({"files": [f"raw_video_data/_iblrig_{i}.mp4" for i in range(3)]}),
        lambda: build_error(ValueError('callback failed: [bad] "data"'), 2),
    ]
    parts: list[bytes] = []
    size = 0
    while size < target_bytes:
        message = rng.choice(builders)()
        json.loads(message)  # sanity: every message is valid JSON
        parts.append(message)
        size += len(message)
    return b"".join(parts), len(parts)


def bench(stream: bytes, chunk_size: int, expected: int, repeat: int) -> float:
    """Return the best throughput in MB/s over ``repeat`` runs."""
    chunks = [stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)]
    best = float("inf")
    for _ in range(repeat):
        decoder = StreamDecoder()
        feed = decoder.feed
        count = 0
        start = time.perf_counter()
        for chunk in chunks:
            count += len(feed(chunk))
        elapsed = time.perf_counter() - start
        decoder.eof()
        if count != expected:
            raise AssertionError(f"framed {count} messages, expected {expected}")
        best = min(best, elapsed)
    return len(stream) / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="stream size in bytes")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (best is kept)")
    args = parser.parse_args()
    stream, count = make_stream(args.size)
    print(
        f"stream: {len(stream):,} bytes, {count:,} messages "
        f"(mean {len(stream) / count:.0f} B/message), best of {args.repeat}"
    )
    for label, chunk_size in [("1-byte feeds", 1), ("4 KiB feeds", 4096)]:
        rate = bench(stream, chunk_size, count, args.repeat)
        print(f"{label:>14}: {rate:8.2f} MB/s")


if __name__ == "__main__":
    main()
