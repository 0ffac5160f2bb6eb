"""Background loops stop when cancelled, even when a library swallowed the CancelledError
(redis-py awaits commands through asyncio.wait_for, which on Python 3.11 can)."""

from __future__ import annotations

import asyncio
import contextlib

from roomcast.tasks import stop_if_cancelled


async def test_a_loop_stops_although_a_library_swallowed_its_cancellation() -> None:
    entered = asyncio.Event()
    turns = 0

    async def swallowing_call() -> None:
        if entered.is_set():
            return  # later turns: a call that answers at once
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # what the library did to us
            await asyncio.Event().wait()

    async def loop() -> None:
        nonlocal turns
        while turns < 3:  # bounded, so that a loop that missed the stop ends the test
            stop_if_cancelled()
            turns += 1
            await swallowing_call()

    task = asyncio.create_task(loop())
    await entered.wait()
    task.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and turns == 1


async def test_a_timeout_that_expired_inside_the_loop_does_not_stop_it() -> None:
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while turns < 3:
            stop_if_cancelled()
            turns += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.001):  # cancels the task, then uncancels it
                    await asyncio.Event().wait()

    async with asyncio.timeout(5):
        await loop()
    assert turns == 3
