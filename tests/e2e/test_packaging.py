"""The checkout as Heroku and a developer use it: pinned requirements, the Procfile under
honcho, and `scripts/serve` that reinstalls only when pyproject.toml changed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ..brokers import free_port

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent


def test_requirements_txt_is_compiled_from_requirements_in(tmp_path: Path) -> None:
    """uv keeps the pins of the output file it is given: compiling again changes nothing
    unless requirements.in or pyproject.toml's dependencies changed."""
    out = tmp_path / "requirements.txt"
    shutil.copy(REPO / "requirements.txt", out)
    command = (REPO / "requirements.in").read_text().split("#   ", 1)[1].splitlines()[0]
    args = command.split()[3:]  # after `uv pip compile`
    args[args.index("-o") + 1] = str(out)
    run = subprocess.run(
        [str(BIN / "uv"), "pip", "compile", "--quiet", "--custom-compile-command", command, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_text() == (REPO / "requirements.txt").read_text(), (
        "requirements.txt is out of date: run " + command
    )


def test_requirements_txt_pins_every_package_it_installs() -> None:
    lines = [
        line.split(";")[0].strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "." in lines, "roomcast itself is installed from the checkout"
    loose = [line for line in lines if line != "." and "==" not in line]
    assert not loose, loose
    names = {line.split("==")[0].lower() for line in lines if "==" in line}
    assert {"starlette", "uvicorn", "broadcaster", "msgspec", "redis", "anyio"} <= names


def test_scripts_serve_installs_once_and_prints_no_setuptools_warning() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "WEB_CONCURRENCY")}

    def serve_help() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REPO / "scripts" / "serve"), "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )

    serve_help()  # installs, if pyproject.toml changed since the last install
    again = serve_help()
    assert again.returncode == 0, again.stderr
    assert "--broadcast-url" in again.stdout
    output = again.stdout + again.stderr
    assert "installing" not in output, output
    assert "setuptools" not in output.lower() and "Please be careful" not in output, output


@pytest.mark.slow
def test_honcho_runs_the_procfile_as_heroku_would() -> None:
    """`honcho start` in the checkout, with the venv's bin/ on PATH (as the README says)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WEB_CONCURRENCY"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PORT=str(port))
    process = subprocess.Popen(
        [str(BIN / "honcho"), "start"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the Procfile's web process never answered"
                time.sleep(0.1)  # polling /healthz, bounded by the deadline
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode(errors="replace")
    assert "roomcast: not found" not in output, output
