"""Processes of a benchmark run: started in their own process group, ended with it.

Every load generator (and every server) runs in a session of its own, so
that one `killpg` ends it with whatever it started (a load generator's
helper processes); `group()` does that in `finally`, on an error and on
Ctrl-C alike. A load generator also asks the kernel to kill it when its
parent dies (`die_with_parent`), which covers an orchestrator that is
itself killed without a chance to clean up. The rest reads /proc: a
process tree's CPU time and memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

PR_SET_PDEATHSIG = 1


def spawn(command: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start `command` as the leader of a new process group."""
    return subprocess.Popen(command, start_new_session=True, **kwargs)


def end(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process's group, then SIGKILL what is left of it after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    # The leader may be gone while a child of its group lingers: kill the group anyway.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
    deadline = time.monotonic() + 5
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)  # the kernel reaps the group's other members asynchronously


@contextlib.contextmanager
def group(command: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[Any]]:
    """`spawn()`, and `end()` when the block is left, however it is left."""
    process = spawn(command, **kwargs)
    try:
        yield process
    finally:
        end(process)


def group_alive(pgid: int) -> bool:
    """Whether any process (not a zombie) is still in process group `pgid`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def end_on_sigterm() -> None:
    """SIGTERM unwinds the run like Ctrl-C does, through every `finally` that ends a group."""
    signal.signal(signal.SIGTERM, _terminated)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it ends."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted`; returns the limit now.
    Beyond the hard limit only a process with CAP_SYS_RESOURCE may go."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    target = min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def nofile_ceiling(wanted: int) -> int:
    """The most open files a process started from here can get, up to `wanted`: the hard
    limit, raised first where this process may (CAP_SYS_RESOURCE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, wanted))
        except (ValueError, OSError):
            return hard
    return wanted


# --- /proc readings --------------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """CPU time of the processes' threads, in nanoseconds from the scheduler (utime +
    stime in /proc/PID/stat only count clock ticks of 10 ms)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:  # a process that just ended
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:  # a thread that just ended
                pass
    return total / 1e9


def memory(pids: list[int], key: str) -> int:
    """Sum of a /proc/PID/status field (VmRSS, VmHWM) in bytes."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
    return total
