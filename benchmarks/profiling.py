"""Where roomcast's time goes: py-spy samples the server during a burst.

py-spy is found as `$PY_SPY`, on PATH, or beside the running Python (a
virtualenv's bin/); without it the profile is skipped with a note.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import procs, servers
from .harness import loadgen_command
from .servers import ROOMCAST


@dataclass
class Profile:
    samples: int
    by_function: list[tuple[str, float]] = field(default_factory=list)
    by_area: list[tuple[str, float]] = field(default_factory=list)
    note: str = ""  # why there is no profile


AREAS = [  # first match wins: (substring of the frame's file, area)
    ("service/engine/frames.py", "roomcast prepared frames and wire"),
    ("service/engine/wire.py", "roomcast prepared frames and wire"),
    ("service/engine/connection.py", "roomcast outbox and sender"),
    ("service/engine/sequencer.py", "roomcast hub fan-out"),
    ("service/engine/hub.py", "roomcast hub fan-out"),
    ("service/web/sockets.py", "roomcast socket edge (decode, dispatch)"),
    ("service/", "roomcast other (history, envelopes, transport)"),
    ("broadcaster/", "broadcaster memory backend"),
    ("starlette/", "Starlette (WebSocket, routing)"),
    ("uvicorn/", "uvicorn WebSocket protocol (send, framing, flow control)"),
    ("websockets/", "websockets sans-I/O framing"),
    ("asyncio/", "asyncio (tasks, futures, events)"),
]


def find_py_spy() -> str | None:
    given = os.environ.get("PY_SPY")
    if given is not None:
        return given if os.access(given, os.X_OK) else None
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if os.access(beside, os.X_OK) else None)


def profile(subscribers: int, window: int, seconds: float) -> Profile:
    """py-spy samples the roomcast server during a burst, once every subscriber joined
    (py-spy leaves idle samples out)."""
    spy_path = find_py_spy()
    if spy_path is None:
        return Profile(
            0, note="py-spy was not found (it comes with the bench extra): no profile this run."
        )
    running = servers.start(ROOMCAST)
    work = Path(tempfile.mkdtemp())
    raw, gate = work / "raw.txt", work / "gate"
    plan = {
        "subscribers": subscribers,
        "settle": 0.5,
        "gate": str(gate),
        "phases": [{"mode": "burst", "messages": int(seconds * 80), "window": window}],
    }
    spy_log = work / "py-spy.log"
    try:
        with procs.group(
            loadgen_command(running, plan),
            stdout=subprocess.DEVNULL,
            env=servers.environment(),
            cwd=servers.ROOT,
        ) as generator:
            deadline = time.monotonic() + 60
            while not Path(str(gate) + ".ready").exists():
                if time.monotonic() > deadline or generator.poll() is not None:
                    raise RuntimeError("the profile's load generator did not get ready")
                time.sleep(0.02)  # the generator says so through a file
            record = [spy_path, "record", "--pid", str(running.process.pid), "--rate", "500"]
            with (
                spy_log.open("wb") as log,
                procs.group(
                    [*record, "--format", "raw", "--output", str(raw), "--nonblocking"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ) as spy,
            ):
                time.sleep(0.5)  # py-spy attaches
                Path(str(gate) + ".go").touch()
                generator.wait(120)
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has
                spy.wait(30)
        return _summary(raw, spy_log)
    finally:
        running.stop()
        shutil.rmtree(work, ignore_errors=True)


def _summary(raw: Path, spy_log: Path) -> Profile:
    functions: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    lines = raw.read_text().splitlines() if raw.exists() else []
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        frames = stack.split(";")
        count = int(count_text)
        total += count
        functions[_short(frames[-1])] += count
        areas[_area(frames)] += count
    if not total:
        said = spy_log.read_text(errors="replace").strip().splitlines()
        return Profile(0, note=f"py-spy recorded no samples: {said[-1] if said else 'silent'}.")

    def share(counter: Counter[str], top: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(top)]

    return Profile(total, share(functions, 15), share(areas, 12))


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rstrip(")")
    for marker in ("site-packages/", f"{servers.ROOT}/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path.rsplit(':', 1)[0]})"


def _area(frames: list[str]) -> str:
    """The innermost frame that belongs to a known area."""
    for frame in reversed(frames):
        for marker, area in AREAS:
            if marker in frame:
                return area
    return "other (event loop, interpreter)"


def table(p: Profile, n: int) -> str:
    if not p.samples:
        return f"### Where roomcast's time goes\n\nNo profile: {p.note}"
    return "\n".join(
        [
            "### Where roomcast's time goes\n",
            f"py-spy, {p.samples} samples of the roomcast server during a burst to {n} "
            "subscribers (samples idle in the event loop left out). By area (the innermost "
            "frame of a known library; time in C code called from it counts to it, so the "
            "system calls of `transport.write` count to the wire):\n",
            "| area | % |",
            "| --- | ---: |",
            *(f"| {a} | {s} |" for a, s in p.by_area),
            "\nBy function (self time):\n",
            "| function | % |",
            "| --- | ---: |",
            *(f"| `{f}` | {s} |" for f, s in p.by_function),
        ]
    )
