"""The HTTP API for the application's own backend: publish into rooms, notify
and disconnect users, read history and presence; and for the admin page, the
cluster's stats and rooms.

Every route needs `Authorization: Bearer <API_KEY>`. Status precedence: 404
while `API_KEY` is unset, then 401, then 400 (room name or query), then 422
(body). Errors are `{"error": code, "detail": sentence}`; nothing a client
sends yields a 500.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta, Struct
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.hub import Hub
from ..errors import ProtocolError
from ..observe import metrics
from ..protocol.codec import TOO_DEEP
from ..protocol.envelopes import Level, Ref, User, is_room_name
from ..settings import Settings
from .auth import MAX_SUBJECT_CHARS, sanitize_name
from .hooks import Hooks

log = logging.getLogger("roomcast.api")

DEFAULT_HISTORY_LIMIT: Final = 100
DEFAULT_ROOMS_LIMIT: Final = 100
MAX_ROOMS_LIMIT: Final = 1000


class NotificationBody(Struct, tag="notification", tag_field="type", forbid_unknown_fields=True):
    title: str
    body: str
    level: Level = "info"
    data: Any = None
    ref: Ref | None = None


class UserBody(Struct, forbid_unknown_fields=True):
    id: Annotated[str, Meta(min_length=1, max_length=MAX_SUBJECT_CHARS)]
    name: str


class ChatBody(Struct, tag="chat", tag_field="type", forbid_unknown_fields=True):
    text: str
    user: UserBody
    ref: Ref | None = None


_publish_decoder = msgspec.json.Decoder(NotificationBody | ChatBody)
_notify_decoder = msgspec.json.Decoder(NotificationBody)
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def _json(body: object, status: int = 200) -> Response:
    return Response(_encoder.encode(body), status, media_type="application/json")


def _error(
    status: int, code: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        _encoder.encode({"error": code, "detail": detail}),
        status,
        headers=headers,
        media_type="application/json",
    )


def _digest(key: str) -> bytes:
    # Both sides hashed first: the comparison then takes as long whatever the
    # length of the key a client tries (compare_digest alone reveals it).
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyCheck:
    """The bearer key, compared in constant time."""

    def __init__(self, key: str) -> None:
        self._digest = _digest(key)

    def __call__(self, authorization: str | None) -> bool:
        scheme, _, given = (authorization or "").partition(" ")
        # Always hash and compare, also for a missing or malformed header.
        match = hmac.compare_digest(_digest(given.strip()), self._digest)
        return match and scheme.lower() == "bearer"


class _Guard:
    """404 while the API is off, 401 without the key: before routing, so that no
    route, method or body is revealed to a caller without the key."""

    def __init__(self, app: ASGIApp, check: KeyCheck | None) -> None:
        self.app, self.check = app, check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, counted)
        finally:
            metrics.api_request(scope["path"], status)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.check is None:
            response = _error(404, "not_found", "The HTTP API is off: set API_KEY to enable it.")
        elif not self.check(Headers(scope=scope).get("authorization")):
            response = _error(
                401,
                "unauthorized",
                "Send the API key as `Authorization: Bearer <API_KEY>`.",
                {"WWW-Authenticate": 'Bearer realm="roomcast"'},
            )
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


def _room(request: Request) -> str:
    room = str(request.path_params["room"])
    if not is_room_name(room):
        raise ApiError(
            400,
            "invalid_room",
            f"Room name {room[:80]!r} is invalid: use 1 to 64 of A-Z a-z 0-9 _ - . :",
        )
    return room


def _user_id(request: Request) -> str:
    user_id = str(request.path_params["user_id"])
    if not 1 <= len(user_id) <= MAX_SUBJECT_CHARS:
        raise ApiError(400, "invalid_user", f"A user id has 1 to {MAX_SUBJECT_CHARS} characters.")
    return user_id


def _int_query(request: Request, name: str, default: int, low: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        value = low - 1
    if value < low or len(raw) > 19:
        raise ApiError(
            400, "invalid_query", f"Query parameter `{name}` must be an integer of at least {low}."
        )
    return value


# A refusal by the application's chat hook: its HTTP status by error code (else 422).
_HOOK_STATUS: Final = {"forbidden": 403, "unauthorized": 403, "internal": 503}


class Api:
    def __init__(self, hub: Hub, settings: Settings, hooks: Hooks[Any] | None = None) -> None:
        self.hub, self.settings = hub, settings
        self.hooks: Hooks[Any] = hooks or Hooks(settings.hook_timeout)

    def app(self) -> ASGIApp:
        routes = [
            Route("/rooms/{room}/publish", self._wrap(self.publish), methods=["POST"]),
            Route("/rooms/{room}/history", self._wrap(self.history), methods=["GET"]),
            Route("/rooms/{room}/presence", self._wrap(self.presence), methods=["GET"]),
            Route("/rooms", self._wrap(self.rooms), methods=["GET"]),
            Route("/stats", self._wrap(self.stats), methods=["GET"]),
            Route("/users/{user_id:path}/notify", self._wrap(self.notify), methods=["POST"]),
            Route(
                "/users/{user_id:path}/disconnect", self._wrap(self.disconnect), methods=["POST"]
            ),
        ]
        inner = Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_exception},  # type: ignore[dict-item]
        )
        key = self.settings.api_key
        return _Guard(inner, None if key is None else KeyCheck(str(key)))

    def _wrap(self, endpoint: Any) -> Any:
        async def handle(request: Request) -> Response:
            try:
                result: Response = await endpoint(request)
                return result
            except ApiError as exc:
                return _error(exc.status, exc.code, exc.detail)
            except ProtocolError as exc:
                return _error(_HOOK_STATUS.get(exc.code, 422), exc.code, exc.detail)
            except Exception:
                # The broker or a store failed (their drivers raise their own types).
                log.exception("API %s %s failed", request.method, request.url.path)
                return _error(
                    503, "unavailable", "The broker or store did not answer; retry shortly."
                )

        return handle

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "too_large", f"The body is over MAX_MESSAGE_BYTES={limit}.")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, "too_large", f"The body is over MAX_MESSAGE_BYTES={limit}.")
        return body

    def _decode(self, decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
        try:
            return decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise ApiError(422, "invalid_body", f"The body does not validate: {exc}.") from None
        except RecursionError:
            raise ApiError(422, "invalid_body", f"{TOO_DEEP}.") from None

    def _check_text(self, field: str, value: str) -> None:
        if len(value) > self.settings.max_text_chars:
            raise ApiError(
                422,
                "text_too_long",
                f"`{field}` has {len(value)} characters; MAX_TEXT_CHARS is "
                f"{self.settings.max_text_chars}.",
            )

    async def publish(self, request: Request) -> Response:
        room = _room(request)
        message = self._decode(_publish_decoder, await self._body(request))
        if isinstance(message, ChatBody):
            self._check_text("text", message.text)
            if not message.text.strip():
                raise ApiError(422, "invalid_body", "`text` is blank.")
            name = sanitize_name(message.user.name, self.settings.max_name_chars)
            user = User(message.user.id, name or message.user.id[: self.settings.max_name_chars])
            text = message.text
            if self.hooks.chat:  # the application's moderation, without a socket
                text = await self.hooks.moderate(None, room, text, self.settings.max_text_chars)
            appended = await self.hub.publisher.chat(user, room, text, message.ref)
        else:
            self._check_text("title", message.title)
            self._check_text("body", message.body)
            appended = await self.hub.publisher.publish(
                room,
                title=message.title,
                body=message.body,
                level=message.level,
                data=message.data,
                ref=message.ref,
            )
        return _json({"room": room, "epoch": appended.epoch, "offset": appended.offset})

    async def notify(self, request: Request) -> Response:
        user_id = _user_id(request)
        message = self._decode(_notify_decoder, await self._body(request))
        self._check_text("title", message.title)
        self._check_text("body", message.body)
        delivered = await self.hub.publisher.notify_user(
            user_id, title=message.title, body=message.body, level=message.level, data=message.data
        )
        return _json({"delivered": delivered})

    async def disconnect(self, request: Request) -> Response:
        user_id = _user_id(request)
        return _json({"disconnected": await self.hub.publisher.disconnect_user(user_id)})

    async def history(self, request: Request) -> Response:
        room = _room(request)
        since = _int_query(request, "since", 0, 0)
        limit = min(
            _int_query(request, "limit", DEFAULT_HISTORY_LIMIT, 1), self.settings.history_size
        )
        page = await self.hub.store.since(room, since)
        messages = [msgspec.Raw(frame.encode()) for frame in page.entries[:limit]]
        return _json({"room": room, "epoch": page.epoch, "offset": page.top, "messages": messages})

    async def presence(self, request: Request) -> Response:
        room = _room(request)
        online, users = await self.hub.presence.snapshot(room, self.settings.presence_list_max)
        return _json({"room": room, "online": online, "users": users})

    async def stats(self, request: Request) -> Response:
        series = _int_query(request, "series", 0, 0)
        if series > 1:
            raise ApiError(400, "invalid_query", "Query parameter `series` must be 0 or 1.")
        return _json(await self.hub.cluster.stats(series=bool(series)))

    async def rooms(self, request: Request) -> Response:
        prefix = request.query_params.get("prefix", "")
        if prefix and not is_room_name(prefix):
            raise ApiError(
                400,
                "invalid_query",
                "Query parameter `prefix` must be empty or 1 to 64 of A-Z a-z 0-9 _ - . :",
            )
        limit = min(_int_query(request, "limit", DEFAULT_ROOMS_LIMIT, 1), MAX_ROOMS_LIMIT)
        return _json({"rooms": await self.hub.cluster.room_list(prefix, limit)})


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    codes = {404: "not_found", 405: "method_not_allowed"}
    detail = {
        404: f"No API route {request.url.path!r}.",
        405: f"{request.method} is not allowed here.",
    }.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), detail, exc.headers)


async def not_found(request: Request, exc: HTTPException) -> Response:
    """The app's 404: JSON under /api/ (also for paths no route pattern takes,
    such as one with a newline), plain text elsewhere."""
    if request.url.path.startswith("/api/"):
        return await _http_exception(request, exc)
    return PlainTextResponse("Not Found", 404)
