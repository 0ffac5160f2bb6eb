"""The servers of the fan-out benchmark: roomcast and the baselines, started the same way.

Every ASGI app runs under the same uvicorn command line (1 worker, uvloop,
httptools, the WebSocket implementation under test, pings every 25 s as
`roomcast serve` sets them, no access log) on a free loopback port; the
`websockets` library runs its own server on uvloop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
# Chat text a baseline gets is padded so that its frames are as long as
# roomcast's chat envelopes (about 185 bytes: type, room, epoch, offset, user, text, ts).
PAD = 160


@dataclass(frozen=True)
class Spec:
    name: str
    app: str  # "module:attr" for uvicorn, or a module run with `-m ... PORT`
    path: str
    dialect: str = "text"
    pad: int = PAD
    factory: bool = False
    uvicorn: bool = True
    env: dict[str, str] = field(default_factory=dict)
    ws: str = "websockets-sansio"

    def but(self, **changes: object) -> Spec:
        from dataclasses import replace

        return replace(self, **changes)  # type: ignore[arg-type]


ROOMCAST_ENV = {
    # The publisher sends far more than a person: no rate limit in the way.
    "RATE_LIMIT": "1000000",
    # One load generator opens every connection from one address: no CONNECT_RATE.
    "CONNECT_RATE": "0",
    "MAX_CONNECTIONS": "20000",
    "HISTORY_SIZE": "1000",
}

ROOMCAST = Spec(
    "roomcast", "roomcast.app:create_app", "/ws/bench", pad=0, factory=True, env=ROOMCAST_ENV
)
BASELINES = [
    Spec("bare ASGI", "benchmarks.baselines.bare_asgi:app", "/ws/bench"),
    Spec("websockets.broadcast()", "benchmarks.baselines.websockets_broadcast", "/", uvicorn=False),
    Spec("FastAPI tutorial", "benchmarks.baselines.fastapi_tutorial:app", "/ws/{i}"),
    Spec("broadcaster example", "benchmarks.baselines.broadcaster_example:app", "/"),
    Spec(
        "python-socketio",
        "benchmarks.baselines.socketio_rooms:app",
        "/socket.io/?EIO=4&transport=websocket",
        dialect="socketio",
    ),
]


@dataclass
class Running:
    spec: Spec
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.unlink(missing_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WEB_CONCURRENCY", "PORT")}
    # The worktree's code, not whatever an editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def start(spec: Spec, extra_env: dict[str, str] | None = None) -> Running:
    port = free_port()
    if spec.uvicorn:
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            spec.app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--ws",
            spec.ws,
            "--ws-ping-interval",
            "25",
            "--ws-ping-timeout",
            "25",
            "--timeout-graceful-shutdown",
            "5",
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        if spec.factory:
            command.append("--factory")
    else:
        command = [sys.executable, "-m", spec.app, str(port)]
    log = Path(tempfile.mkstemp(prefix="roomcast-bench-", suffix=".log")[1])
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment({**spec.env, **(extra_env or {})}),
            cwd=ROOT,
        )
    wait_for_port(port, process, log)
    return Running(spec, process, port, log)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited {process.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                time.sleep(0.2)  # the lifespan may still be starting behind the bound port
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"server did not listen in {STARTUP_TIMEOUT}s:\n{log.read_text()}")
