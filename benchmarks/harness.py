"""What every scenario does: start a server, run the load generator against it, end both."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

from . import procs, servers
from .servers import Running, Spec

_T0 = time.monotonic()


def say(what: str) -> None:
    print(f"  {time.monotonic() - _T0:6.1f} s  {what}", file=sys.stderr, flush=True)


def loadgen_command(running: Running, plan: dict[str, Any]) -> list[str]:
    plan = {
        "url": running.url,
        "path": running.spec.path,
        "dialect": running.spec.dialect,
        "pad": running.spec.pad,
        "pid": running.process.pid,
        **plan,
    }
    return [sys.executable, "-m", "benchmarks.loadgen", json.dumps(plan)]


def loadgen(running: Running, plan: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Run the load generator (and its helpers) to the end; its process group is ended
    whatever happens, Ctrl-C included."""
    with procs.group(
        loadgen_command(running, plan),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=servers.environment(),
        cwd=servers.ROOT,
    ) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(
                f"loadgen against {running.spec.name} did not finish in {timeout} s"
            ) from None
    if process.returncode != 0:
        raise RuntimeError(f"loadgen failed against {running.spec.name}:\n{err[-3000:]}")
    return json.loads(out)  # type: ignore[no-any-return]


def measure(
    spec: Spec,
    plan: dict[str, Any],
    env: dict[str, str] | None = None,
    nofile: int = 0,
    timeout: float = 300,
) -> dict[str, Any]:
    """One server, one load generator; roomcast's report gets its writes by path."""
    running = servers.start(spec, env, nofile)
    try:
        report = loadgen(running, plan, timeout)
        if spec.roomcast:
            report["writes"] = writes(running)
        return report
    finally:
        running.stop()


_WRITES = re.compile(r'^roomcast_writes_total\{path="(\w+)"\} (\S+)$', re.MULTILINE)


def writes(running: Running) -> dict[str, int]:
    """roomcast_writes_total by path (fast, asgi), from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{running.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {path: int(float(count)) for path, count in _WRITES.findall(text)}


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")
