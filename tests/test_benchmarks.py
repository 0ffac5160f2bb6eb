"""The benchmark harness (`python -m benchmarks`) does what its tables claim, and cleans up.

Behaviour only, never speed: the load generator's browser-like clients really
negotiate permessage-deflate and count bytes on the wire, its helper
processes deliver every frame, no load generator or server outlives a run
that is interrupted, and a missing py-spy skips the profile with a note.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from benchmarks import procs
from benchmarks.browser import API_KEY
from benchmarks.clients import Run, Subscriber
from benchmarks.harness import measure
from benchmarks.profiling import find_py_spy, profile
from benchmarks.profiling import table as profile_table
from benchmarks.servers import ROOMCAST

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_browser_like_clients_negotiate_deflate_and_get_shared_compressed_frames() -> None:
    report = measure(
        ROOMCAST,
        {
            "subscribers": 20,
            "settle": 0.1,
            "deflate": True,
            "api": {"room": "bench", "key": API_KEY},
            "phases": [
                {"mode": "burst", "messages": 5, "window": 4},
                {"mode": "burst", "messages": 5, "window": 4, "kind": "notification"},
            ],
        },
        {"WS_COMPRESSION": "shared", "API_KEY": API_KEY},
        timeout=120,
    )
    assert report["deflated"] == 20
    chats, notes = report["phases"]
    assert chats["lost"] == notes["lost"] == 0
    assert notes["deliveries"] == 100
    # The clients inflated every notification back to its text (the latency marker is
    # read from it), and the kernel counted fewer bytes on the wire than that text.
    assert notes["frame_bytes"] > 900
    assert 0 < notes["wire_bytes"] < notes["frame_bytes"]
    assert report["writes"]["fast"] > 0


def _deflated(compressor: zlib._Compress, text: bytes) -> bytes:
    return (compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def test_a_message_without_context_is_inflated_once_and_must_stand_alone() -> None:
    run = Run(2)
    first, second = Subscriber(run, 0, False), Subscriber(run, 1, False)
    first.standalone = second.standalone = True
    text = b"the same broadcast for every member " * 4
    alone = _deflated(zlib.compressobj(wbits=-15), text)
    assert first.inflate(alone) == second.inflate(alone) == text
    assert run.inflated == {alone: text}
    # Bytes that lean on an earlier message cannot be read on their own: the shared
    # inflation would catch a server that kept its context after promising not to.
    kept = zlib.compressobj(wbits=-15)
    _deflated(kept, text)
    with pytest.raises(zlib.error):
        first.inflate(_deflated(kept, text))


async def test_a_message_with_context_is_inflated_by_its_own_connection() -> None:
    run = Run(1)
    member = Subscriber(run, 0, False)
    text = b"a message compressed with the connection's context " * 4
    kept = zlib.compressobj(wbits=-15)
    assert [member.inflate(_deflated(kept, text)) for _ in range(3)] == [text] * 3
    assert run.inflated == {}


@pytest.mark.slow
def test_plain_clients_are_refused_nothing_and_get_plain_frames() -> None:
    report = measure(
        ROOMCAST,
        {
            "subscribers": 10,
            "settle": 0.1,
            "api": {"room": "bench", "key": API_KEY},
            "phases": [{"mode": "burst", "messages": 3, "window": 2, "kind": "notification"}],
        },
        {"WS_COMPRESSION": "shared", "API_KEY": API_KEY},
        timeout=120,
    )
    assert report["deflated"] == 0
    (notes,) = report["phases"]
    assert notes["lost"] == 0
    # A plain frame: the text and a 4-byte header (126 <= length < 65536).
    assert notes["wire_bytes"] == notes["frame_bytes"] + 4


@pytest.mark.slow
def test_helper_processes_from_several_source_addresses_deliver_every_frame() -> None:
    report = measure(
        ROOMCAST,
        {
            "subscribers": 60,
            "settle": 0.1,
            "helpers": 2,
            "bind": ["127.0.0.2", "127.0.0.3"],
            "phases": [{"mode": "paced", "messages": 4, "rate": 20}],
        },
        timeout=120,
    )
    (paced,) = report["phases"]
    assert paced["deliveries"] == 240
    assert paced["lost"] == 0
    assert paced["p50_ms"] <= paced["p99_ms"] <= paced["max_ms"]


# A scenario as every benchmark runs one (`harness.measure`), whose load generator then
# waits for a go that never comes: only the harness can end it, not a server that went away.
DRIVER = """
import sys
from benchmarks import harness, procs
from benchmarks.servers import ROOMCAST

procs.end_on_sigterm()
plan = {"subscribers": 6, "settle": 0.1, "helpers": 1, "gate": sys.argv[1],
        "phases": [{"mode": "paced", "messages": 1, "rate": 1}]}
harness.measure(ROOMCAST, plan)
"""


def _benchmark_processes(root: int) -> dict[int, str]:
    """The driver's descendants: servers, load generators and their helpers."""
    found = {}
    for pid in procs.descendants(root)[1:]:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        found[pid] = command
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum",
    [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
    ids=["ctrl-c", "sigterm", "sigkill"],
)
def test_no_load_generator_outlives_an_interrupted_run(signum: int, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(gate)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # a signal of ours reaches this run only
    )
    try:
        deadline = time.monotonic() + 60
        # Polled: the load generator says it is ready through a file.
        while not Path(f"{gate}.ready").exists():
            assert run.poll() is None, run.stderr.read().decode() if run.stderr else ""
            assert time.monotonic() < deadline, "the load generator did not get ready"
            time.sleep(0.05)
        seen = _benchmark_processes(run.pid)
        kinds = " ".join(seen.values())
        assert "uvicorn" in kinds and "benchmarks.loadgen" in kinds and "benchmarks.crowd" in kinds
        os.kill(run.pid, signum)
        assert run.wait(60) != 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
    if signum == signal.SIGKILL:
        # No `finally` ran: the kernel kills the children when their parent dies
        # (PR_SET_PDEATHSIG), as it gets to it. Polled under a deadline.
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in seen) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = {pid: command for pid, command in seen.items() if _running(pid)}
    assert not left, f"outlived the run: {left}"


def test_a_missing_py_spy_skips_the_profile_with_a_note(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PY_SPY", str(tmp_path / "py-spy"))
    assert find_py_spy() is None
    skipped = profile(1000, 32, 8.0)
    assert skipped.samples == 0
    assert "py-spy was not found" in skipped.note
    assert skipped.note in profile_table(skipped, 1000)


@pytest.mark.slow
def test_a_subscriber_that_stops_reading_leaves_the_second_window_to_the_others() -> None:
    report = measure(
        ROOMCAST,
        {
            "subscribers": 10,
            "settle": 0.1,
            "stall_before": 2,
            "stall_wait": 0.5,
            "phases": [{"mode": "paced", "messages": 3, "rate": 20}] * 2,
        },
        timeout=120,
    )
    calm, stalled = report["phases"]
    assert (calm["expected"], calm["deliveries"]) == (30, 30)
    assert (stalled["expected"], stalled["deliveries"]) == (27, 27)
    assert report["stalled"]["frames"] >= 3  # what it read before it stopped
