"""Real servers for end-to-end tests: `roomcast serve` in a subprocess on a loopback port."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT = 20.0
# Tests connect from one address (127.0.0.1) far faster than people do, so servers
# they start allow that, unless a test sets CONNECT_RATE itself (those of the limit do).
TEST_ENV = {"CONNECT_RATE": "1000"}
# uvicorn's line, or hypercorn's.
_RUNNING = re.compile(r"(?:Uvicorn running|Running) on http://127\.0\.0\.1:(\d+)")


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    prefix: str = ""  # where roomcast is mounted in the app the server runs

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.prefix}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get_json(self, path: str) -> object:
        import json

        with urllib.request.urlopen(self.http + path, timeout=5) as response:
            return json.loads(response.read())

    def terminate(self, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise


REPO = Path(__file__).resolve().parent.parent


def start_server(
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    python: str = sys.executable,
    cwd: str | None = None,
) -> Server:
    """Start `roomcast serve --port 0` and wait until it accepts requests."""
    command = [python, "-m", "roomcast", "serve", "--host", "127.0.0.1", "--port", "0"]
    return _start([*command, *(args or [])], env, cwd, "")


def start_app(
    target: str, prefix: str, env: dict[str, str] | None = None, args: list[str] | None = None
) -> Server:
    """Start `uvicorn TARGET` (an app of the tests that mounts roomcast at `prefix`)."""
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", "0"]
    return _start([*command, *(args or [])], env, str(REPO), prefix)


def start_hypercorn(target: str, port: int, env: dict[str, str] | None = None) -> Server:
    """Start `hypercorn TARGET`, another ASGI server than uvicorn."""
    command = [sys.executable, "-m", "hypercorn", target, "--bind", f"127.0.0.1:{port}"]
    return _start(command, env, str(REPO), "")


def _start(command: list[str], env: dict[str, str] | None, cwd: str | None, prefix: str) -> Server:
    # The log outlives this function: the server writes to it until it stops.
    log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115
        prefix="roomcast-", suffix=".log", delete=False
    )
    full_env = {k: v for k, v in os.environ.items() if k not in ("WEB_CONCURRENCY", "PORT")}
    full_env.update(TEST_ENV)
    full_env.update(env or {})
    process = subprocess.Popen(
        command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
    )
    log_path = Path(log_file.name)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        match = _RUNNING.search(log_path.read_text(errors="replace"))
        if match:
            server = Server(process, int(match.group(1)), log_path, env or {}, prefix)
            try:  # with several workers the port is bound before they serve
                server.get_json("/healthz")
                return server
            except OSError:
                pass
        if process.poll() is not None:
            raise RuntimeError(
                f"{command[2:4]} exited {process.returncode}:\n{log_path.read_text()}"
            )
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(
        f"{command[2:4]} did not start in {STARTUP_TIMEOUT}s:\n{log_path.read_text()}"
    )
