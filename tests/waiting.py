"""Bounded waits for store-level tests (no server): every await has a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
TIMEOUT = 10.0


async def within(awaitable: Awaitable[T], timeout: float = TIMEOUT) -> T:
    return await asyncio.wait_for(awaitable, timeout)


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], within_s: float = TIMEOUT
) -> T:
    """Poll `probe` until `done` holds, or fail at the deadline."""
    deadline = time.monotonic() + within_s
    while True:
        value = await within(probe())
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached the expected state: last {value!r}")
        await asyncio.sleep(0.05)  # polling interval, bounded by the deadline
