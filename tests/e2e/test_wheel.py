"""The built wheel, installed for real in a fresh virtual environment, serves the chat page.

The source folder is service/ and the import name roomcast: an installed wheel
holds `roomcast` (with its templates and Lua scripts as package data) and no
top-level `service`, so a user's own `service.py` does not collide with it. This
builds the wheel, installs it (dependencies from the package index) into a new
venv, and runs `roomcast serve` with that venv's Python from a directory outside
the checkout. Nothing is reused between runs.

The wheel is built from a fresh copy of the working tree: setuptools keeps
build/lib/ in the tree it builds from and ships whatever is left there, so a
module deleted from service/ would still be in a wheel built in the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..brokers import free_port
from ..servers import start_server

REPO = Path(__file__).resolve().parent.parent.parent
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT + INSTALL_TIMEOUT + 120)

_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "node_modules",
)


def _isolated_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on sys.path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
    result = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=_isolated_env(),
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="roomcast-wheel-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    source = workdir / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCE)
    outdir = workdir / "dist"
    _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir)],
        BUILD_TIMEOUT,
        cwd=source,
    )
    wheels = list(outdir.glob("roomcast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(workdir: Path, wheel: Path) -> Path:
    venv = workdir / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], INSTALL_TIMEOUT)
    return venv


def test_wheel_ships_the_templates_and_only_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert "roomcast/templates/index.html" in names, names
    for static in ("roomcast.js", "chat.js", "chat.css"):
        assert f"roomcast/templates/static/{static}" in names, names
    for admin in ("admin.html", "static/admin.js", "static/admin.css"):
        assert f"roomcast/templates/{admin}" in names, names
    assert "roomcast/py.typed" in names, names
    assert "roomcast/__main__.py" in names, names
    assert "roomcast/backends/history/redis_append.lua" in names, names
    assert "roomcast/backends/presence/redis_lib.lua" in names, names
    top_level = {n.split("/", 1)[0] for n in names}
    extra = {t for t in top_level if t != "roomcast" and not t.endswith(".dist-info")}
    assert not extra, f"the wheel installs more than `roomcast`: {extra}"
    assert "roomcast = roomcast.cli.main:main" in scripts, scripts


def test_installed_wheel_serves_the_chat_page_outside_the_checkout(
    venv: Path, workdir: Path
) -> None:
    python = venv / "bin" / "python"
    elsewhere = workdir / "elsewhere"  # holds no service/ and no templates/
    elsewhere.mkdir()

    imported = _run(
        [str(python), "-c", "import roomcast.web.pages as p; print(p.templates_dir())"],
        60,
        cwd=elsewhere,
    ).strip()
    assert Path(imported).is_relative_to(venv), f"templates from {imported}, not the venv"
    assert not Path(imported).is_relative_to(REPO), imported
    missing = subprocess.run(
        [str(python), "-c", "import service"],
        cwd=elsewhere,
        env=_isolated_env(),
        check=False,
        capture_output=True,
        text=True,
    )
    assert "ModuleNotFoundError: No module named 'service'" in missing.stderr, missing.stderr

    server = start_server(python=str(python), cwd=str(elsewhere), env={"PYTHONPATH": ""})
    try:
        with urllib.request.urlopen(server.http + "/", timeout=10) as response:
            assert response.status == 200
            assert response.headers.get_content_type() == "text/html"
            page = response.read().decode()
        assert "<title>" in page, page
        assert "roomcast" in page.lower(), page

        with urllib.request.urlopen(server.http + "/healthz", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] == "ok"

        with urllib.request.urlopen(server.http + "/schema.json", timeout=10) as response:
            assert response.status == 200
            assert "$defs" in json.loads(response.read())

        for path, needle in (
            ("/roomcast.js", "export class Client"),
            ("/roomcast.d.ts", "Welcome"),
        ):
            with urllib.request.urlopen(server.http + path, timeout=10) as response:
                assert response.status == 200 and needle in response.read().decode(), path
    finally:
        server.terminate()
    assert str(REPO) not in server.log(), server.log()


def test_installed_console_script_runs(venv: Path, workdir: Path) -> None:
    roomcast = venv / "bin" / "roomcast"
    assert roomcast.is_file(), sorted(p.name for p in (venv / "bin").iterdir())
    assert os.access(roomcast, os.X_OK)
    usage = _run([str(roomcast), "--help"], 60, cwd=workdir)
    assert "serve" in usage and "schema" in usage, usage
    serve_usage = _run([str(roomcast), "serve", "--help"], 60, cwd=workdir)
    assert "--broadcast-url" in serve_usage, serve_usage
    schema = json.loads(_run([str(roomcast), "schema"], 60, cwd=workdir))
    assert "ClientMessage" in schema["$defs"], schema


def test_readme_app_runs_beside_a_service_py_of_its_own(venv: Path, workdir: Path) -> None:
    """A user's app whose folder has its own `service.py` (a common name) imports both
    roomcast and its own module, under `python app.py` and `uvicorn app:app`."""
    python = venv / "bin" / "python"
    project = workdir / "userapp"
    project.mkdir()
    (project / "service.py").write_text('GREETING = "from my own service.py"\n')
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "Starlette(" in b)
    (project / "app.py").write_text(
        "from service import GREETING\n"
        + example
        + "\nif __name__ == '__main__':\n    print(GREETING, type(rc).__module__)\n"
    )
    printed = _run([str(python), "app.py"], 60, cwd=project)
    assert printed.strip() == "from my own service.py roomcast.app", printed

    port = free_port()
    server = subprocess.Popen(
        [str(python), "-m", "uvicorn", "app:app", "--port", str(port)],
        cwd=project,
        env=_isolated_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/rt/schema.json") as r:
                    assert "TypingNotice" in json.loads(r.read())["$defs"]
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                assert time.monotonic() < deadline, "the user's app never answered"
                time.sleep(0.1)  # polling, bounded by the deadline
    finally:
        server.terminate()
        output = server.communicate(timeout=20)[0].decode(errors="replace")
    assert "Error" not in output, output
