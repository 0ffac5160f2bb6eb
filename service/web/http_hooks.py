"""Hooks over HTTP, for the standalone service: CONNECT_HOOK_URL, JOIN_HOOK_URL and
CHAT_HOOK_URL, registered as the app's first hooks of their kind.

Each call is a `POST` of a JSON body to the hook's URL, signed with HOOK_SECRET as
Stripe and GitHub sign their webhooks:

    Roomcast-Timestamp: 1767225600                (Unix seconds, when it was sent)
    Roomcast-Signature: sha256=<hex>              HMAC-SHA256(HOOK_SECRET, f"{timestamp}.{body}")
    Roomcast-Hook: connect | join | chat

The signed string is the timestamp's digits, a dot, and the body's bytes exactly as
sent. Connections are pooled (one httpx client per app, opened and closed by its
lifespan). A hook that does not answer 2xx with the JSON it should, within
HOOK_TIMEOUT, fails closed (`HookFailed`): the request is refused, and the log
names the hook and why, never the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated, Any, Final, Literal, TypeVar

import httpx
import msgspec
from msgspec import Meta, Struct

from ..backends.urls import safe_url
from ..errors import ProtocolError, Refuse
from ..protocol.codes import ErrorCode
from ..protocol.envelopes import User
from ..settings import Settings
from .auth import MAX_SUBJECT_CHARS
from .hooks import HookFailed, Hooks
from .sockets import RoomSocket

MAX_ANSWER_BYTES: Final = 64 * 1024
MAX_DETAIL_CHARS: Final = 500
_encoder = msgspec.json.Encoder()
AnswerT = TypeVar("AnswerT")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The `Roomcast-Signature` header of a body sent at `timestamp`."""
    signed = timestamp.encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


# --- what a hook answers ------------------------------------------------------


class HookUser(Struct):
    id: Annotated[str, Meta(min_length=1, max_length=MAX_SUBJECT_CHARS)]
    name: str


class HookRefusal(Struct):
    code: Literal[4401, 4403]
    detail: str


class HookError(Struct):
    code: ErrorCode
    detail: str


class ConnectAnswer(Struct):
    user: HookUser | None = None
    refuse: HookRefusal | None = None


class JoinAnswer(Struct):
    error: HookError | None = None


class ChatAnswer(Struct):
    text: str | None = None
    error: HookError | None = None


def _refused(error: HookError) -> ProtocolError:
    return ProtocolError(error.code, error.detail[:MAX_DETAIL_CHARS])


# --- the hooks ------------------------------------------------------------------


class HttpHooks:
    """The hooks of the URLs that are set, and the pooled client that calls them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.secret = str(settings.hook_secret) if settings.hook_secret is not None else ""
        self.urls = {
            "connect": settings.connect_hook_url,
            "join": settings.join_hook_url,
            "chat": settings.chat_hook_url,
        }
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def register(cls, settings: Settings, hooks: Hooks[RoomSocket]) -> HttpHooks:
        http = cls(settings)
        if settings.connect_hook_url:
            hooks.connect.append(http.connect)
        if settings.join_hook_url:
            hooks.join.append(http.join)
        if settings.chat_hook_url:
            hooks.chat.append(http.chat)
        return http

    async def __aenter__(self) -> HttpHooks:
        if any(self.urls.values()):
            timeout = float(self.settings.hook_timeout)
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout),
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
                follow_redirects=False,
                headers={"user-agent": "roomcast-hooks"},
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def connect(self, socket: RoomSocket) -> None:
        raw = socket.headers.raw
        headers: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        body = {
            "headers": headers,
            "cookies": socket.cookies,
            "query": dict(socket.query_params),
            "client_address": socket.client_address,
        }
        answer = await self._post("connect", body, ConnectAnswer)
        if answer.refuse is not None and answer.user is None:
            raise Refuse(answer.refuse.code, answer.refuse.detail[:MAX_DETAIL_CHARS])
        if answer.user is None or answer.refuse is not None:
            raise self._failed("connect", "answered neither `user` nor `refuse` (or both)")
        socket.user = User(answer.user.id, answer.user.name)

    async def join(self, socket: RoomSocket, room: str) -> None:
        answer = await self._post("join", {"user": socket.user, "room": room}, JoinAnswer)
        if answer.error is not None:
            raise _refused(answer.error)

    async def chat(self, socket: RoomSocket | None, room: str, text: str) -> str:
        # A chat published through the HTTP API has no socket: the backend sent it.
        user = socket.user if socket is not None else None
        body = {"user": user, "room": room, "text": text}
        answer = await self._post("chat", body, ChatAnswer)
        if answer.error is not None:
            raise _refused(answer.error)
        if answer.text is None:
            raise self._failed("chat", "answered neither `text` nor `error`")
        return answer.text

    def _failed(self, kind: str, why: str) -> HookFailed:
        url = self.urls[kind]
        return HookFailed(f"{kind.upper()}_HOOK_URL ({safe_url(url)}) {why}")

    async def _post(self, kind: str, body: dict[str, Any], answer: type[AnswerT]) -> AnswerT:
        client = self._client
        if client is None:
            raise self._failed(kind, "was called outside the app's lifespan (no HTTP client)")
        payload = _encoder.encode(body)
        timestamp = str(int(time.time()))
        headers = {
            "content-type": "application/json",
            "roomcast-hook": kind,
            "roomcast-timestamp": timestamp,
            "roomcast-signature": signature(self.secret, timestamp, payload),
        }
        try:
            request = client.build_request(
                "POST", self.urls[kind], content=payload, headers=headers
            )
            response = await client.send(request, stream=True)
            try:
                if not 200 <= response.status_code < 300:
                    raise self._failed(kind, f"answered HTTP {response.status_code}")
                data = b""
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > MAX_ANSWER_BYTES:
                        raise self._failed(kind, f"answered over {MAX_ANSWER_BYTES} bytes")
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            raise self._failed(
                kind, f"did not answer within {self.settings.hook_timeout}s (HOOK_TIMEOUT)"
            ) from None
        except httpx.HTTPError as exc:
            raise self._failed(kind, f"could not be reached: {type(exc).__name__} {exc}") from None
        try:
            return msgspec.json.decode(data, type=answer)
        except msgspec.DecodeError as exc:
            raise self._failed(kind, f"answered what is not a {kind} answer: {exc}") from None
