"""Aligning a rig's timestamps with the main PC's clock: live, and offline from a log."""

import bisect
import time

import trio

from trio_rignet import RigService, Services

# A stand-in for the rig PC's own clock, 3.2 ms ahead of the main PC's and 100 ppm
# fast. A real rig leaves `clock` out (it is time.time); here both ends share one
# machine, so the true offset is known and the example can check the estimates.
T0 = time.time()


def rig_clock() -> float:
    now = time.time()
    return now + 0.0032 + 100e-6 * (now - T0)


def true_offset(main_time: float) -> float:
    return 0.0032 + 100e-6 * (main_time - T0)


async def log_clocks(services: Services, log: list[tuple[str, float, float, float, float]]) -> None:
    """Every 0.25 s, record each rig's estimate (in a session: a file beside the data)."""
    while True:
        await trio.sleep(0.25)
        for name, state in services.state.items():
            if state.clock is not None:
                c = state.clock
                log.append((name, c.at, c.offset, c.drift, c.uncertainty))


def offset_at(log: list[tuple[str, float, float, float, float]], rig: str, t: float) -> float:
    """Offline: the offset of `rig` at main-PC time `t`, linear between logged estimates."""
    points = sorted({(at, offset, drift) for name, at, offset, drift, _ in log if name == rig})
    i = bisect.bisect(points, (t,))
    if i == 0 or i == len(points):  # before the first or after the last: use the drift
        at, offset, drift = points[0] if i == 0 else points[-1]
        return offset + drift * (t - at)
    (t_a, o_a, _), (t_b, o_b, _) = points[i - 1], points[i]
    return o_a + (o_b - o_a) * (t - t_a) / (t_b - t_a)


def rig_to_main(log: list[tuple[str, float, float, float, float]], rig: str, t: float) -> float:
    """Offline: a timestamp of the rig's clock in main-PC time (solves t = m + offset(m))."""
    main = t - offset_at(log, rig, t)
    return t - offset_at(log, rig, main)  # one more step: the offset barely changes


async def main() -> None:
    rig = RigService("udp://127.0.0.1:0", name="video", clock=rig_clock)
    log: list[tuple[str, float, float, float, float]] = []
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(rig.serve)
        async with (
            Services.open(
                {"video": f"udp://{host}:{port}"}, heartbeat=0.02, trio_rigs=True
            ) as services,
            services.watch() as changes,
        ):
            nursery.start_soon(log_clocks, services, log)
            async for change in changes:  # the rig answers its first heartbeat
                print(change.peer, change.kind)
                break
            await trio.sleep(2)  # ... the experiment runs ...

            # Live: a camera frame stamped with the rig's clock, in main-PC time.
            frame_time = rig_clock()
            clock = services.state["video"].clock
            assert clock is not None
            main_time = clock.to_ours(frame_time)
            now = time.time()
            print("offset within 2 ms:", abs(clock.offset_at(now) - true_offset(now)) < 0.002)
            print("frame time within 2 ms:", abs(main_time - now) < 0.002)
            print("and back:", abs(clock.to_peer(main_time) - frame_time) < 1e-6)
        nursery.cancel_scope.cancel()

    # Offline, after the session: the same frame time from the logged estimates.
    print("estimates logged:", len(log) >= 4)
    print("offline within 2 ms:", abs(rig_to_main(log, "video", frame_time) - now) < 0.002)


trio.run(main)
