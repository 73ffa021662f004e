"""What a confirmed send waits on (``waiter_class()``), on both backends.

The contract: :meth:`wait` returns once :meth:`set` was called (before or
during the wait) or at its deadline, whichever is first; a wait that returned
at its deadline or was cancelled does not make the next one return early; a
cancelled wait leaves nothing behind. On asyncio this is a future and a timer
instead of AnyIO's cancel scope and event, so it is checked here directly.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import anyio
import pytest
import sniffio
import trio
import trio.testing
from tests.conftest import proactor_loop

from trio_rignet._transport import Waiter, waiter_class

pytestmark = pytest.mark.anyio

FAR = 3600.0  # a deadline no test reaches: only set() ends such a wait
HANG = 60  # hang guard only, never a timing assertion


async def _set_later(waiter: Waiter, log: list[str]) -> None:
    await anyio.lowlevel.checkpoint()
    log.append("set")
    waiter.set()


async def test_set_before_the_wait_ends_it_at_once() -> None:
    waiter = waiter_class()()
    waiter.set()
    waiter.set()  # repeated: harmless
    with anyio.fail_after(HANG):
        await waiter.wait(anyio.current_time() + FAR)
        await waiter.wait(anyio.current_time() + FAR)  # still set


async def test_a_wait_is_a_checkpoint_even_when_set() -> None:
    waiter = waiter_class()()
    waiter.set()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await waiter.wait(anyio.current_time() + FAR)
    assert scope.cancelled_caught


async def test_set_during_the_wait_ends_it() -> None:
    waiter, log = waiter_class()(), []
    with anyio.fail_after(HANG):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_later, waiter, log)
            await waiter.wait(anyio.current_time() + FAR)
            assert log == ["set"]


async def test_a_wait_that_reached_its_deadline_does_not_end_the_next() -> None:
    waiter, log = waiter_class()(), []
    with anyio.fail_after(HANG):
        deadline = anyio.current_time() + 0.001
        await waiter.wait(deadline)
        assert anyio.current_time() >= deadline - _resolution()
        await waiter.wait(anyio.current_time() - 1)  # already past: returns, unset
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_later, waiter, log)
            await waiter.wait(anyio.current_time() + FAR)
            assert log == ["set"]  # it waited for set(), not for an old expiry


async def test_a_cancelled_wait_does_not_end_the_next() -> None:
    waiter, log = waiter_class()(), []
    with anyio.fail_after(HANG):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await waiter.wait(anyio.current_time() + FAR)
        assert scope.cancelled_caught
        with anyio.move_on_after(0.001) as scope:
            await waiter.wait(anyio.current_time() + FAR)
        assert scope.cancelled_caught
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_later, waiter, log)
            await waiter.wait(anyio.current_time() + FAR)
            assert log == ["set"]


async def test_a_cancelled_or_ended_wait_leaves_no_timer(anyio_backend_name: str) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("Trio's waiter is a trio.CancelScope: its deadline goes with it")
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def recording_call_at(when: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        timer = call_at(when, callback, *args)
        timers.append(timer)
        return timer

    loop.call_at = recording_call_at  # type: ignore[method-assign]
    try:
        waiter = waiter_class()()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await waiter.wait(loop.time() + FAR)
        log: list[str] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_set_later, waiter, log)
            await waiter.wait(loop.time() + FAR)
        await waiter_class()().wait(loop.time() + 0.001)  # ends at its deadline
    finally:
        del loop.call_at
    mine = [timer for timer in timers if timer.when() > loop.time() + FAR / 2]
    assert len(mine) == 2
    assert all(timer.cancelled() for timer in mine)


@pytest.mark.trio
async def test_trio_deadline_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    waiter = waiter_class()()
    deadline = trio.current_time() + 7.5
    await waiter.wait(deadline)
    assert trio.current_time() == deadline


def _resolution() -> float:
    """How early asyncio may run a timer (its clock's resolution); 0 on Trio."""
    if sniffio.current_async_library() == "trio":
        return 0.0
    return time.get_clock_info("monotonic").resolution


# Races between the timer and something else, both before the waiting task
# resumes. The deadline is already past, so the timer runs in the loop's next
# pass; a helper task started before the wait runs in that pass too, yields
# once, and acts in the pass after it, still before the waiting task (whose
# wake-up the timer queued behind the helper). Plain asyncio code on the
# tests' loop: AnyIO's scopes never cancel a task whose future is already done,
# but a host's own ``task.cancel()`` may.


def _run_on_the_tests_loop(main: Any) -> None:
    loop = proactor_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def test_a_set_racing_the_timer_is_kept() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiter = waiter_class()()

        async def set_after_the_timer() -> None:
            await asyncio.sleep(0)
            waiter.set()

        helper = asyncio.ensure_future(set_after_the_timer())
        await waiter.wait(loop.time() - 1)
        await helper
        await asyncio.wait_for(waiter.wait(loop.time() + FAR), HANG)  # set: at once

    _run_on_the_tests_loop(main)


def test_a_cancellation_racing_the_timer_does_not_end_the_next_wait() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiter, task = waiter_class()(), asyncio.current_task()
        assert task is not None

        async def cancel_after_the_timer() -> None:
            await asyncio.sleep(0)
            task.cancel()

        helper = asyncio.ensure_future(cancel_after_the_timer())
        with pytest.raises(asyncio.CancelledError):
            await waiter.wait(loop.time() - 1)
        if sys.version_info >= (3, 11):
            task.uncancel()
        await helper
        log: list[str] = []

        async def set_later() -> None:
            await asyncio.sleep(0)
            log.append("set")
            waiter.set()

        setter = asyncio.ensure_future(set_later())
        guard = loop.call_later(HANG, task.cancel)  # hang guard only
        await waiter.wait(loop.time() + FAR)
        guard.cancel()
        assert log == ["set"]  # it waited for set(), not for the cancelled wait's expiry
        await setter

    _run_on_the_tests_loop(main)
