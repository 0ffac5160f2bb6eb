"""A support desk: log in (Starlette's SessionMiddleware), then chat in ticket rooms.

    uvicorn examples.support_desk.app:app      # then open http://127.0.0.1:8000/

roomcast's hooks do the authorization: `on_connect` maps the session to a user,
`on_join` lets customers into their own tickets only (agents into any), and `on_chat`
strips links from customers' messages and tells every agent about a customer's first
message in a ticket with `rc.notify_user`.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from roomcast import ProtocolError, Refuse, Roomcast, RoomSocket, Settings, User

from .desk import Account, Desk, strip_links

HERE = Path(__file__).resolve().parent
log = logging.getLogger("examples.support_desk")


def page_headers(request: Request) -> dict[str, str]:
    host = request.headers.get("host", "")
    policy = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        f"connect-src 'self' ws://{host} wss://{host}; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'; object-src 'none'"
    )
    return {"Content-Security-Policy": policy, "Cache-Control": "no-store"}


def add_hooks(rc: Roomcast, desk: Desk) -> None:
    @rc.on_connect
    async def identify(socket: RoomSocket) -> None:
        account = desk.account(socket.scope.get("session", {}).get("user"))
        if account is None:
            raise Refuse(4401, "Log in first.")
        socket.user = User(id=account.username, name=account.name)

    @rc.on_join
    async def may_join(socket: RoomSocket, room: str) -> None:
        account = desk.account(socket.user.id)
        if account is None or not desk.may_join(account, room):
            raise ProtocolError("forbidden", f"You may not join {room}.")

    @rc.on_chat
    async def moderate(socket: RoomSocket | None, room: str, text: str) -> str:
        account = desk.account(socket.user.id) if socket is not None else None
        if account is None or account.role != "customer":
            return text  # agents, and the backend's own messages, as they are
        text = strip_links(text)
        if desk.first_message(account, room):
            for agent in desk.agents():
                await rc.notify_user(
                    agent.username,
                    title=f"{account.name} wrote in {room}",
                    body=text[:200],
                    data={"room": room},
                )
        return text


def create_app(settings: Settings | None = None, session_secret: str | None = None) -> Starlette:
    desk = Desk()
    rc = Roomcast(settings)
    add_hooks(rc, desk)
    templates = Jinja2Templates(directory=HERE / "templates")

    def current(request: Request) -> Account | None:
        return desk.account(request.session.get("user"))

    async def home(request: Request) -> Response:
        account = current(request)
        if account is None:
            return templates.TemplateResponse(
                request, "login.html", {"error": None}, headers=page_headers(request)
            )
        tickets = desk.tickets_of(account)
        chosen = request.query_params.get("ticket")
        room = chosen if chosen in tickets else None
        context = {"account": account, "tickets": tickets, "room": room}
        return templates.TemplateResponse(
            request, "desk.html", context, headers=page_headers(request)
        )

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode(errors="replace"))
        username = form.get("username", [""])[0]
        account = desk.login(username, form.get("password", [""])[0])
        if account is None:
            return templates.TemplateResponse(
                request,
                "login.html",
                {"error": "Unknown user or wrong password."},
                status_code=401,
                headers=page_headers(request),
            )
        request.session["user"] = account.username
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/", status_code=303)

    async def open_ticket(request: Request) -> Response:
        account = current(request)
        if account is None or account.role != "customer":
            return RedirectResponse("/", status_code=303)
        return RedirectResponse(f"/?ticket={desk.open_ticket(account)}", status_code=303)

    secret = session_secret or os.environ.get("SESSION_SECRET")
    if not secret:
        log.warning("SESSION_SECRET is not set: sessions end when the process restarts")
        secret = secrets.token_urlsafe(32)
    app = Starlette(
        routes=[
            Route("/", home),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/tickets", open_ticket, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static")),
            Mount("/rt", app=rc),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=secret, same_site="lax")],
        lifespan=rc.lifespan,
    )
    app.state.roomcast, app.state.desk = rc, desk
    return app


app = create_app()
