"""Background loops that stop when told to, even when a library loses the cancellation.

On Python 3.11 `asyncio.wait_for` can swallow a cancellation that arrives just as
its awaitable finishes (3.12 rebuilt it on `asyncio.timeout`). redis-py awaits
every command through it, so a loop that talks to Redis could be cancelled by
`stop()` and simply go round again, and `stop()` would wait forever. The task
still counts the request (`Task.cancelling()`), so every background loop asks at
the top of each turn. roomcast itself uses `asyncio.timeout` (a test checks).
"""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise CancelledError if this task was asked to stop, even if the CancelledError
    itself was lost on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
