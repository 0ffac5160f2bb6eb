"""examples/live_dashboard: samples published every interval, drawn by the page, no gap
after a reconnect. In process with `roomcast.testing`, then once in Chromium."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from examples.live_dashboard.app import ROOM, create_app
from roomcast import Settings
from roomcast.protocol.envelopes import Joined, Notification
from roomcast.testing import InProcessClient, RoomcastTest

from ..servers import Server, start_app

WAIT = 15_000  # ms, for a loaded machine


def counting_sampler() -> Any:
    ticks = itertools.count(1)
    return lambda rc: {"load": next(ticks), "memory_mb": 1.0, "viewers": 0}


async def next_samples(viewer: InProcessClient, count: int) -> list[Notification]:
    return [await viewer.expect(Notification, timeout=5) for _ in range(count)]


def offset(sample: Notification) -> int:
    """A sample is a room's notification: it has an offset (a user's would not)."""
    assert sample.offset is not None, sample
    return sample.offset


async def test_viewers_get_every_sample_in_order() -> None:
    app = create_app(Settings(), interval=0.02, sampler=counting_sampler())
    async with RoomcastTest(app) as t:
        viewer = await t.connect(f"/rt/ws/{ROOM}?history=60")
        samples = await next_samples(viewer, 5)
        offsets = [offset(s) for s in samples]
        assert offsets == list(range(offsets[0], offsets[0] + 5))
        assert [s.data["load"] for s in samples] == offsets  # the n-th sample has offset n
        assert {s.room for s in samples} == {ROOM}


async def test_a_viewer_that_reconnects_sees_no_gap() -> None:
    app = create_app(Settings(), interval=0.02, sampler=counting_sampler())
    async with RoomcastTest(app) as t:
        viewer = await t.connect(f"/rt/ws/{ROOM}")
        seen = await next_samples(viewer, 3)
        last = seen[-1]
        last_offset = offset(last)
        await viewer.close()
        # Samples go on while it is away: another viewer sees some.
        witness = await t.connect(f"/rt/ws/{ROOM}")
        later = await next_samples(witness, 4)
        assert offset(later[-1]) > last_offset + 2
        back = await t.connect(f"/rt/ws/{ROOM}?since={last.epoch}:{last.offset}")
        missed = offset(later[-1]) - last_offset
        # In order: the replay of what it missed, `joined` (recovered), then the live ones.
        items: list[Any] = []
        async with asyncio.timeout(5):
            async for item in back:
                items.append(item)
                if isinstance(item, Joined):
                    break
        joined = [i for i in items if isinstance(i, Joined)]
        assert len(joined) == 1 and joined[0].recovered, items
        offsets = [offset(i) for i in items if isinstance(i, Notification)]
        assert offsets[:missed] == list(range(last_offset + 1, offset(later[-1]) + 1)), items
        assert offsets == list(range(last_offset + 1, last_offset + 1 + len(offsets)))
        live = await back.expect(Notification)
        assert live.offset == offsets[-1] + 1


async def test_the_page_is_served_under_a_strict_policy() -> None:
    app = create_app(Settings(), interval=60)
    async with RoomcastTest(app) as t:
        page = await t.http.get("/")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
        assert "style-src 'self';" in policy
        scripts = re.findall(r"<script[^>]*>(.*?)</script>", page.text, flags=re.S)
        assert scripts == [""], "no inline script: only <script src=...></script>"
        assert "style=" not in page.text
        script = await t.http.get("/static/dashboard.js")
        assert script.status_code == 200 and "since" in script.text
        assert "roomcast.js" not in page.text  # the protocol directly, not the browser client


async def test_the_publisher_stops_with_the_app() -> None:
    current = asyncio.current_task()
    before = {t for t in asyncio.all_tasks() if t is not current}
    async with RoomcastTest(create_app(Settings(), interval=0.01)) as t:
        viewer = await t.connect(f"/rt/ws/{ROOM}")
        await viewer.expect(Notification)
    assert {t for t in asyncio.all_tasks() if t is not current} - before == set()


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def dashboard() -> Iterator[Server]:
    server = start_app("examples.live_dashboard.app:app", "/rt", env={"DASHBOARD_INTERVAL": "0.2"})
    yield server
    server.terminate()


def last_above(page: Any, offset: int) -> None:
    """Wait until the page has drawn a sample past `offset` (the page's CSP forbids the
    string evaluation `wait_for_function` needs, so this polls under a deadline)."""
    deadline = time.monotonic() + WAIT / 1000
    while True:
        text = page.locator("#last").text_content() or ""
        if text.isdigit() and int(text) > offset:
            return
        assert time.monotonic() < deadline, f"no sample past {offset}: last is {text!r}"
        page.wait_for_timeout(50)  # polling interval, bounded by the deadline


def chart_offsets(page: Any) -> list[int]:
    raw = page.locator("#chart").get_attribute("data-offsets") or ""
    return [int(x) for x in raw.split(",") if x]


@pytest.mark.slow
def test_the_chart_in_chromium_has_no_gap_after_a_reconnect(
    browser: Browser, dashboard: Server
) -> None:
    context = browser.new_context()
    witness = browser.new_context().new_page()
    errors: list[str] = []
    sent: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("websocket", lambda ws: ws.on("framesent", lambda data: sent.append(str(data))))
        page.goto(f"http://127.0.0.1:{dashboard.port}/")
        expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
        expect(page.locator("#chart")).to_have_attribute(
            "data-count", re.compile(r"^([5-9]|\d\d+)$"), timeout=WAIT
        )
        before = chart_offsets(page)[-1]
        # The network goes away: the socket closes and new ones fail for a while.
        context.set_offline(True)
        page.evaluate("window.dashboard.socket.close(4408)")
        # Samples go on meanwhile: a second viewer sees some it misses.
        witness.goto(f"http://127.0.0.1:{dashboard.port}/")
        last_above(witness, before + 4)
        context.set_offline(False)
        expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
        expect(page.locator("#last")).not_to_have_text(str(before), timeout=WAIT)
        last_above(page, before + 8)
        offsets = chart_offsets(page)
        assert offsets == list(range(offsets[0], offsets[-1] + 1)), offsets
        assert page.evaluate("window.dashboard.gaps") == 0
        # The first join asked for recent history, the rejoin `since` what it had drawn.
        joins = [s for s in sent if '"join"' in s]
        assert len(joins) >= 2 and '"history":60' in joins[0], joins
        assert all('"since"' in j for j in joins[1:]), joins
        assert offsets[0] <= before, offsets  # the chart spans the outage without a hole
        assert errors == []
    finally:
        context.close()
        witness.context.close()
