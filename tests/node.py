"""Node tools the tests run for real (tsc, json-schema-to-typescript, ajv), from the npm
registry, installed once into a cache folder so that later runs start at once.

A missing `node` or `npm` fails the test that needs it: never a skip.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGES = {
    "typescript": "5.9.3",
    "json-schema-to-typescript": "16.0.0",
    "ajv": "8.20.0",
    "ajv-cli": "5.0.0",
}
CACHE = Path(
    os.environ.get("ROOMCAST_NODE_CACHE", Path.home() / ".cache" / "roomcast-tests" / "node")
)
TSC_OPTIONS = [
    "--strict",
    "--noEmit",
    "--target",
    "es2022",
    "--module",
    "es2022",
    "--moduleResolution",
    "bundler",
    "--lib",
    "es2022,dom",
]


def node_tools() -> Path:
    """The folder whose node_modules/.bin holds the tools, installed when missing."""
    for command in ("node", "npm"):
        if shutil.which(command) is None:
            pytest.fail(
                f"`{command}` is missing: install Node.js (Debian: apt-get install -y nodejs npm)",
                pytrace=False,
            )
    wanted = json.dumps(PACKAGES, sort_keys=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = CACHE / "installed.json"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs install once
        if not stamp.is_file() or stamp.read_text() != wanted:
            specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
            subprocess.run(
                ["npm", "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", *specs],
                check=True,
                capture_output=True,
                timeout=300,
            )
            stamp.write_text(wanted)
    return CACHE


def run_node_tool(tool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run node_modules/.bin/`tool`; a failure shows what it printed."""
    binary = node_tools() / "node_modules" / ".bin" / tool
    done = subprocess.run(
        [str(binary), *args], cwd=cwd, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
    return done


def run_node(script: str, *args: str, cwd: Path) -> str:
    """Run a node script with the cached packages importable; returns its stdout."""
    env = {**os.environ, "NODE_PATH": str(node_tools() / "node_modules")}
    done = subprocess.run(
        ["node", "-e", script, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, f"node failed:\n{done.stdout}{done.stderr}"
    return done.stdout
