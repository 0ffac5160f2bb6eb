"""examples/support_desk: sessions map to users, tickets are guarded by on_join, customers'
links are stripped and their first message alerts every agent. In process with
`roomcast.testing`, then once in Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from examples.support_desk.app import create_app
from examples.support_desk.desk import strip_links
from roomcast import Settings, User
from roomcast.client import Forbidden, Unauthorized
from roomcast.protocol.envelopes import Chat, Notification
from roomcast.testing import InProcessClient, RoomcastTest

from ..servers import Server, start_app

WAIT = 15_000  # ms


def desk_app() -> Any:
    return create_app(Settings(), session_secret="desk-test-secret-" + "x" * 20)


async def log_in(t: RoomcastTest, username: str, path: str = "/rt/ws") -> InProcessClient:
    """Log in through the form (a fresh cookie jar per user), then connect with its cookie."""
    t.http.cookies.clear()
    form = {"username": username, "password": f"{username}-demo"}
    answer = await t.http.post("/login", data=form)
    assert answer.status_code == 303, answer.text
    return await t.connect(path, cookies=dict(t.http.cookies))


async def test_the_session_is_the_user() -> None:
    async with RoomcastTest(desk_app()) as t:
        with pytest.raises(Unauthorized) as refused:
            await t.connect("/rt/ws")
        assert (refused.value.close_code, refused.value.detail) == (4401, "Log in first.")
        bad = await t.http.post("/login", data={"username": "alice", "password": "guess"})
        assert bad.status_code == 401 and "wrong password" in bad.text
        alice = await log_in(t, "alice")
        assert alice.welcome is not None and alice.welcome.user == User("alice", "Alice")


async def test_customers_join_only_their_own_tickets_agents_any() -> None:
    async with RoomcastTest(desk_app()) as t:
        alice = await log_in(t, "alice")
        await alice.join("ticket-1")
        with pytest.raises(Forbidden, match="You may not join ticket-2"):
            await alice.join("ticket-2")
        with pytest.raises(Forbidden) as at_connect:
            await log_in(t, "bob", "/rt/ws/ticket-1")
        assert at_connect.value.close_code == 4403
        carol = await log_in(t, "carol")
        await carol.join("ticket-1")
        await carol.join("ticket-2")
        with pytest.raises(Forbidden):
            await carol.join("not-a-ticket")


async def test_a_customers_first_message_alerts_every_agent_and_links_are_stripped() -> None:
    async with RoomcastTest(desk_app()) as t:
        carol = await log_in(t, "carol")
        dave = await log_in(t, "dave")
        await carol.join("ticket-1")
        alice = await log_in(t, "alice", "/rt/ws/ticket-1")
        await alice.send("ticket-1", "Help! See https://evil.example/x and www.spam.example now")
        # The hook alerts the agents before the chat is stored: the alert comes first.
        alerts = {
            name: await agent.expect(Notification) for name, agent in (("c", carol), ("d", dave))
        }
        chat = await carol.expect(Chat)
        assert chat.text == "Help! See [link removed] and [link removed] now"
        assert chat.user == User("alice", "Alice")
        for alert in alerts.values():
            assert (alert.room, alert.title) == (None, "Alice wrote in ticket-1")
            assert alert.data == {"room": "ticket-1"}
        await alice.send("ticket-1", "still there?")
        await carol.send("ticket-1", "Yes: https://docs.example/fix")
        texts = [(await alice.expect(Chat)).text for _ in range(3)]
        assert texts[1:] == ["still there?", "Yes: https://docs.example/fix"]  # agents keep links
        with pytest.raises(AssertionError, match="no Notification"):
            await dave.expect(Notification, timeout=0.3)  # one alert per ticket and customer


async def test_pages_and_new_tickets() -> None:
    async with RoomcastTest(desk_app()) as t:
        login_page = await t.http.get("/")
        assert 'action="/login"' in login_page.text
        policy = login_page.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "unsafe-inline" not in policy
        alice = await log_in(t, "alice")
        page = await t.http.get("/")
        assert "ticket-1" in page.text and "ticket-2" not in page.text
        assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "no inline script"
        opened = await t.http.post("/tickets")
        assert (opened.status_code, opened.headers["location"]) == (303, "/?ticket=ticket-3")
        await alice.join("ticket-3")
        assert strip_links("http://a.b/c x https://d") == "[link removed] x [link removed]"


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def desk() -> Iterator[Server]:
    server = start_app(
        "examples.support_desk.app:app", "/rt", env={"SESSION_SECRET": "e2e-" + "s" * 32}
    )
    yield server
    server.terminate()


def open_desk(browser: Browser, server: Server, username: str) -> Any:
    page = browser.new_context().new_page()
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.fill("#username", username)
    page.fill("#password", f"{username}-demo")
    page.click("#login")
    page.click("text=ticket-1")
    expect(page.locator("#room")).to_have_text("ticket-1", timeout=WAIT)
    expect(page.locator("#status")).to_have_text("online", timeout=WAIT)
    return page


@pytest.mark.slow
def test_a_customer_and_an_agent_in_chromium(browser: Browser, desk: Server) -> None:
    agent = open_desk(browser, desk, "carol")
    customer = open_desk(browser, desk, "alice")
    errors: list[str] = []
    for page in (agent, customer):
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        customer.fill("#text", "Broken again, see https://evil.example/pay")
        customer.press("#text", "Enter")
        expected = "Broken again, see [link removed]"
        expect(agent.locator("#messages .text")).to_have_text([expected], timeout=WAIT)
        expect(customer.locator("#messages .text")).to_have_text([expected], timeout=WAIT)
        expect(agent.locator("#alerts li")).to_have_text(
            [f"Alice wrote in ticket-1: {expected}"], timeout=WAIT
        )
        expect(customer.locator("#alerts li")).to_have_count(0)
        assert errors == []
    finally:
        agent.context.close()
        customer.context.close()
