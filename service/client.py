"""A typed asyncio client on the server's own Structs: requests, events, reconnects.

async with Client("ws://127.0.0.1:8000", username="ann") as c:
    await c.join("lobby", history=10)
    await c.send("lobby", "hello")
    async for envelope in c:
        match envelope:
            case Chat(room=room, user=user, text=text):
                print(room, user.name, text)

Requests (`join`, `send`, `leave`, `presence`, `ping`) carry a uuid4 `ref`;
their answer (`joined`, `ack`, `left`, `presence`, `pong`, or an `error` with
that `ref`, raised as a `ClientError`) resolves the request and is not
yielded by iteration. Everything else the server sends is yielded, in order,
with the client's own events (`Disconnected`, `Reconnected`,
`RecoveryFailed`) among them.

After a 1012, 4408, 4429 or a lost network the client reconnects with
exponential backoff and full jitter, under the same `client` id, rejoins
every room with `since` = the last offset it queued for that room, never
yields an offset twice, and re-sends unacknowledged chats with their
original `ref` (the server acknowledges a repeated `ref` with the original
offset and stores it once). 4401 is retried only with a new token from
`token_refresh`; 4403, 1008 and 1009 are final: pending requests and the
iterator raise them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, TypeVar, Union, cast
from urllib.parse import urlencode, urlsplit, urlunsplit

import jwt
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from .client_events import (
    ClientError,
    ClientEvent,
    Closed,
    ConnectionFailed,
    Disconnected,
    Event,
    Forbidden,
    InvalidRequest,
    InvalidRoom,
    NotJoined,
    RateLimited,
    Reconnected,
    RecoveryFailed,
    RequestTimeout,
    ServerFailed,
    TextTooLong,
    TooManyRooms,
    Unauthorized,
    close_error,
    error_of,
)
from .envelopes import (
    SERVER_TYPES,
    SUBPROTOCOL,
    TOKEN_SUBPROTOCOL_PREFIX,
    Ack,
    Chat,
    ClientEnvelope,
    Close,
    Error,
    GetPresence,
    Join,
    Joined,
    Leave,
    Left,
    Notification,
    Ping,
    Pong,
    Presence,
    Refresh,
    SendChat,
    ServerEnvelope,
    Since,
    Welcome,
    encode,
    server_decoder,
)

__all__ = [
    "Client",
    "ClientError",
    "ClientEvent",
    "Closed",
    "ConnectionFailed",
    "Disconnected",
    "Event",
    "Forbidden",
    "InvalidRequest",
    "InvalidRoom",
    "NotJoined",
    "RateLimited",
    "Reconnected",
    "RecoveryFailed",
    "RequestTimeout",
    "ServerFailed",
    "TextTooLong",
    "TooManyRooms",
    "Unauthorized",
]

log = logging.getLogger("roomcast.client")

TIMEOUT: Final = 15.0
R = TypeVar("R", bound=ServerEnvelope)
TokenRefresh = Callable[[], Awaitable[str]]

# Closes after which reconnecting cannot help: the client must change first.
FINAL_CLOSES: Final = frozenset({Close.FORBIDDEN, Close.POLICY_VIOLATION, Close.TOO_BIG})


# --- helpers (no I/O) ------------------------------------------------------------


def ws_endpoint(url: str, query: dict[str, str]) -> str:
    """`url` (ws://host:port, .../ws, or http(s)://) as the multiplexed `/ws` endpoint."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws"):
        path += "/ws"
    params = "&".join(p for p in (parts.query, urlencode(query)) if p)
    return urlunsplit((scheme, parts.netloc, path, params, ""))


def token_expiry(token: str) -> float | None:
    """The token's `exp` (read without verifying: the server does that)."""
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def refresh_margin(seconds_left: float) -> float:
    """How long before `exp` to refresh: a quarter of what is left, within 1-60 s."""
    return min(60.0, max(1.0, seconds_left / 4))


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter (attempt 0, 1, 2 …)."""
    return random.uniform(0, min(cap, base * 2**attempt))


class _Closed(Exception):
    """The current connection ended: its close code, reason and last refless `error`."""

    def __init__(self, code: int | None, reason: str, last: Error | None) -> None:
        super().__init__(code, reason)
        self.code, self.reason, self.last = code, reason, last


_END: Final = object()


class Client:
    """One logical connection to a roomcast server that survives reconnects."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        username: str | None = None,
        client_id: str | None = None,
        token_refresh: TokenRefresh | None = None,
        *,
        timeout: float = TIMEOUT,
        backoff: tuple[float, float] = (0.25, 8.0),
        envelopes: Iterable[type[ServerEnvelope]] = (),
        max_queue: int = 4096,
    ) -> None:
        self.client_id = client_id or uuid.uuid4().hex
        query = {"client": self.client_id}
        if username is not None:
            query["username"] = username
        self.url = ws_endpoint(url, query)
        self.token = token
        self.token_refresh = token_refresh
        self.timeout = timeout
        self.backoff = backoff
        extra = tuple(envelopes)
        self._decoder: msgspec.json.Decoder[ServerEnvelope] = (
            msgspec.json.Decoder(Union[(*SERVER_TYPES, *extra)])
            if extra
            else cast("msgspec.json.Decoder[ServerEnvelope]", server_decoder)
        )
        self.welcome: Welcome | None = None
        self.positions: dict[str, Since] = {}  # joined rooms: the last offset queued
        self.pings_sent = 0  # heartbeat pings, and the pongs that answered them
        self.pongs_received = 0
        self.resent = 0  # requests sent again on a new connection (same `ref`)
        # Backpressure: a caller that does not iterate stops the reading, the
        # server closes with 4408, and the client recovers once it reads again.
        self._events: asyncio.Queue[object] = asyncio.Queue(max_queue)
        self._inflight: dict[str, ClientEnvelope] = {}  # sent, not answered, in order
        self._futures: dict[str, asyncio.Future[ServerEnvelope]] = {}
        self._sent_on: dict[str, int] = {}  # ref -> connection generation it was sent on
        self._rejoins: set[str] = set()
        self._heartbeat_refs: set[str] = set()
        self._ws: ClientConnection | None = None
        self._generation = 0
        self._ready = False
        self._last_heard = 0.0
        self._runner: asyncio.Task[None] | None = None
        self._fatal: ClientError | None = None
        self._ended = False
        self._closing = False

    # --- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the first connection; raises ConnectionFailed, Unauthorized, Forbidden …"""
        assert self._runner is None, "connect() once per Client"
        if self._token_due():
            await self._refresh_token()
        try:
            try:
                ws = await self._open()
            except Unauthorized:
                if self.token_refresh is None:
                    raise
                await self._refresh_token()  # once: the token may just have expired
                ws = await self._open()
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            raise ConnectionFailed(
                "connection_failed", f"cannot connect to {self._safe_url()}: {exc}"
            ) from None
        self._runner = asyncio.create_task(self._run(ws), name="roomcast-client")

    async def close(self) -> None:
        """Leave every room implicitly (normal close 1000) and end iteration."""
        self._closing = True
        ws, runner = self._ws, self._runner
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout):
                    await ws.close()
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        self._finish(Closed("client_closed", "The client was closed."))

    # --- requests ------------------------------------------------------------

    async def join(self, room: str, history: int | None = None) -> Joined:
        """Join `room`, replaying its last `history` messages (yielded before later ones)."""
        return await self._request(Join(room=room, history=history), Joined)

    async def send(self, room: str, text: str) -> Ack:
        """Send a chat; returns its `ack` (with the offset), across reconnects."""
        return await self._request(SendChat(room=room, text=text), Ack)

    async def leave(self, room: str) -> Left:
        return await self._request(Leave(room=room), Left)

    async def presence(self, room: str) -> Presence:
        return await self._request(GetPresence(room=room), Presence)

    async def ping(self) -> Pong:
        return await self._request(Ping(), Pong)

    async def _request(self, message: ClientEnvelope, answer: type[R]) -> R:
        if self._fatal is not None:
            raise self._fatal
        ref = message.ref = uuid.uuid4().hex
        future: asyncio.Future[ServerEnvelope] = asyncio.get_running_loop().create_future()
        self._futures[ref] = future
        self._inflight[ref] = message
        try:
            if self._ready:  # else the reconnect sends it, in order
                await self._transmit(message)
            async with asyncio.timeout(self.timeout):
                reply = await future
        except TimeoutError:
            raise RequestTimeout(
                "timeout", f"no answer to {type(message).__name__} within the timeout", ref
            ) from None
        finally:
            self._futures.pop(ref, None)
            self._inflight.pop(ref, None)
            self._sent_on.pop(ref, None)
        if not isinstance(reply, answer):
            raise InvalidRequest("unexpected", f"expected {answer.__name__}, got {reply!r}", ref)
        return reply

    async def _transmit(self, message: ClientEnvelope) -> None:
        ws = self._ws
        if ws is None:
            return
        if message.ref is not None:
            self._sent_on[message.ref] = self._generation
        with contextlib.suppress(ConnectionClosed):  # re-sent after the reconnect
            await ws.send(encode(message))

    # --- iteration -----------------------------------------------------------

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Event:
        item = _END if self._ended and self._events.empty() else await self._events.get()
        if item is _END:
            fatal = self._fatal
            if fatal is not None and not (
                isinstance(fatal, Closed) and fatal.close_code in (None, Close.NORMAL)
            ):
                raise fatal
            raise StopAsyncIteration
        return cast(Event, item)

    async def receive(self) -> Event:
        """The next envelope or event, within the client's `timeout`."""
        async with asyncio.timeout(self.timeout):
            return await self.__anext__()

    # --- connections ---------------------------------------------------------

    def _safe_url(self) -> str:
        return self.url.split("?", 1)[0]

    async def _open(self) -> ClientConnection:
        """A connection that said `welcome`; a refusal raises its typed error."""
        offered = [Subprotocol(SUBPROTOCOL)]
        if self.token:
            offered.append(Subprotocol(TOKEN_SUBPROTOCOL_PREFIX + self.token))
        # No library keepalive: the protocol's heartbeat (below) covers it.
        ws = await connect(
            self.url,
            subprotocols=offered,
            open_timeout=self.timeout,
            close_timeout=5,
            ping_interval=None,
        )
        try:
            async with asyncio.timeout(self.timeout):
                first = self._decoder.decode(await ws.recv())
            if isinstance(first, Error):  # refused: one error, then the close
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    async with asyncio.timeout(5):
                        await ws.recv()
                raise error_of(first, ws.close_code)
            if not isinstance(first, Welcome):
                raise InvalidRequest("unexpected", f"expected welcome first, got {first!r}")
        except BaseException:
            ws.transport.abort()
            raise
        self.welcome = first
        self._last_heard = asyncio.get_running_loop().time()
        return ws

    async def _run(self, ws: ClientConnection) -> None:
        attempts = 0
        try:
            while True:
                if attempts:
                    assert self.welcome is not None
                    await self._put(Reconnected(attempts=attempts, welcome=self.welcome))
                try:
                    await self._session(ws)
                except _Closed as closed:
                    if self._closing:
                        return
                    if closed.code in FINAL_CLOSES or closed.code == Close.NORMAL:
                        raise close_error(closed.code, closed.reason, closed.last) from None
                    if closed.code == Close.UNAUTHORIZED and self.token_refresh is None:
                        raise close_error(closed.code, closed.reason, closed.last) from None
                    log.info("connection lost (%s %s): reconnecting", closed.code, closed.reason)
                    await self._put(Disconnected(code=closed.code, reason=closed.reason))
                    ws, attempts = await self._reconnect(closed.code)
        except ClientError as exc:
            self._finish(exc)
        except Exception as exc:  # a bug: say it, do not hang the caller
            log.exception("roomcast client failed")
            self._finish(ClientError("internal", f"the client failed: {exc!r}"))

    async def _reconnect(self, code: int | None) -> tuple[ClientConnection, int]:
        base, cap = self.backoff
        attempt = 0
        must_refresh = code == Close.UNAUTHORIZED
        while True:
            await asyncio.sleep(backoff_delay(attempt, base, cap))
            attempt += 1
            if must_refresh or self._token_due():
                await self._refresh_token()
                must_refresh = False
            try:
                return await self._open(), attempt
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                log.info("reconnect attempt %d failed: %r", attempt, exc)
            except Unauthorized:
                if self.token_refresh is None:
                    raise
                must_refresh = True
            except RateLimited:
                pass  # 4429: later, with backoff

    async def _session(self, ws: ClientConnection) -> None:
        """Rejoin, re-send, then read until the connection ends (raises _Closed)."""
        self._ws = ws
        self._generation += 1
        self._ready = False
        tasks = [
            asyncio.create_task(self._heartbeat(ws)),
            asyncio.create_task(self._refresher(ws)),
        ]
        reader = asyncio.create_task(self._read(ws))
        try:
            await self._resume(ws)
            await reader
        except ConnectionClosed:
            await asyncio.wait([reader], timeout=self.timeout)
            if not reader.done():
                raise _Closed(None, "closed while resuming", None) from None
            reader.result()
        finally:
            self._ready = False
            for task in (*tasks, reader):
                task.cancel()
            await asyncio.gather(*tasks, reader, return_exceptions=True)

    async def _resume(self, ws: ClientConnection) -> None:
        """Rejoin every room from its last offset, then (re-)send every request in order."""
        self._rejoins.clear()
        for room, since in list(self.positions.items()):
            ref = uuid.uuid4().hex
            self._rejoins.add(ref)
            await ws.send(encode(Join(room=room, since=since, ref=ref)))
        while todo := [
            m for r, m in self._inflight.items() if self._sent_on.get(r) != self._generation
        ]:
            for message in todo:
                if message.ref in self._inflight:
                    self.resent += message.ref in self._sent_on
                    await self._transmit(message)
        self._ready = True  # no await since the last check: nothing is left unsent

    async def _read(self, ws: ClientConnection) -> None:
        last_error: Error | None = None
        loop = asyncio.get_running_loop()
        try:
            async for frame in ws:
                self._last_heard = loop.time()
                try:
                    envelope = self._decoder.decode(frame)
                except msgspec.DecodeError as exc:
                    log.warning("ignored a frame that does not decode: %s", exc)
                    continue
                if isinstance(envelope, Error) and envelope.ref is None:
                    last_error = envelope
                await self._dispatch(envelope)
        except ConnectionClosed:
            pass
        raise _Closed(ws.close_code, ws.close_reason or "", last_error)

    async def _dispatch(self, envelope: ServerEnvelope) -> None:
        ref: str | None = getattr(envelope, "ref", None)
        if isinstance(envelope, Chat | Notification) and envelope.offset is not None:
            if self._seen(envelope.room, envelope.epoch, envelope.offset):
                return  # already delivered (replayed again after a reconnect)
            # Queued first, recorded after: cancelled while waiting, it is replayed again.
            await self._put(envelope)
            self._record(envelope.room, envelope.epoch, envelope.offset)
            return
        if isinstance(envelope, Joined):
            self._joined(envelope)
            if ref in self._rejoins:
                self._rejoins.discard(ref)
                if not envelope.recovered:
                    await self._put(RecoveryFailed(room=envelope.room, joined=envelope))
                return
        elif isinstance(envelope, Left):
            self.positions.pop(envelope.room, None)
        elif isinstance(envelope, Pong) and ref in self._heartbeat_refs:
            self._heartbeat_refs.discard(ref)
            self.pongs_received += 1
            return
        elif isinstance(envelope, Error) and ref in self._rejoins:
            self._rejoins.discard(ref)
            if envelope.room is not None:
                self.positions.pop(envelope.room, None)
        future = self._futures.get(ref) if ref is not None else None
        if future is not None:
            if not future.done():
                if isinstance(envelope, Error):
                    future.set_exception(error_of(envelope))
                else:
                    future.set_result(envelope)
            self._inflight.pop(ref, None)  # type: ignore[arg-type]
            return
        if isinstance(envelope, Ack):
            return  # a repeated ack of a chat whose request already ended
        await self._put(envelope)

    def _seen(self, room: str | None, epoch: str | None, offset: int) -> bool:
        """Whether a stored envelope was queued before (never yield an offset twice)."""
        last = self.positions.get(room) if room is not None else None
        return last is not None and last.epoch == epoch and offset <= last.offset

    def _record(self, room: str | None, epoch: str | None, offset: int) -> None:
        if room is not None and epoch is not None:
            self.positions[room] = Since(epoch, offset)

    def _joined(self, joined: Joined) -> None:
        last = self.positions.get(joined.room)
        if last is None or last.epoch != joined.epoch or last.offset < joined.offset:
            self.positions[joined.room] = Since(joined.epoch, joined.offset)

    async def _put(self, item: object) -> None:
        await self._events.put(item)

    def _finish(self, error: ClientError) -> None:
        """End for good: fail what is pending, end iteration (raising `error` if final)."""
        if self._fatal is None:
            self._fatal = error
        for future in self._futures.values():
            if not future.done():
                future.set_exception(self._fatal)
        self._futures.clear()
        self._inflight.clear()
        self._ended = True
        with contextlib.suppress(asyncio.QueueFull):  # full: __anext__ sees _ended when drained
            self._events.put_nowait(_END)  # wakes an __anext__ waiting on an empty queue

    # --- heartbeat and token refresh -----------------------------------------

    async def _heartbeat(self, ws: ClientConnection) -> None:
        """After `heartbeat` seconds of silence send `ping`; without an answer within
        another `heartbeat`, the connection is lost: drop it and reconnect."""
        assert self.welcome is not None
        interval = float(self.welcome.heartbeat)
        loop = asyncio.get_running_loop()
        while True:
            if self._events.full():  # the reader waits for the caller, not the server
                self._last_heard = loop.time()
            silent = loop.time() - self._last_heard
            if silent < interval:
                await asyncio.sleep(interval - silent)
                continue
            ref = "hb-" + uuid.uuid4().hex
            self._heartbeat_refs.add(ref)
            asked = loop.time()
            self.pings_sent += 1
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(Ping(ref=ref)))
            await asyncio.sleep(interval)
            if self._last_heard < asked:
                log.info("no answer within %ss of a ping: the connection is lost", interval)
                ws.transport.abort()
                return

    def _token_due(self) -> bool:
        if self.token is None or self.token_refresh is None:
            return False
        exp = token_expiry(self.token)
        return exp is not None and exp - time.time() < refresh_margin(exp - time.time())

    async def _refresh_token(self) -> None:
        assert self.token_refresh is not None
        try:
            async with asyncio.timeout(self.timeout):
                self.token = await self.token_refresh()
        except Exception as exc:
            raise Unauthorized("unauthorized", f"token_refresh failed: {exc!r}") from None

    async def _refresher(self, ws: ClientConnection) -> None:
        """Before the token's `exp`, get a new one and send `refresh` on this connection."""
        while self.token is not None and self.token_refresh is not None:
            exp = token_expiry(self.token)
            if exp is None:
                return
            left = exp - time.time()
            await asyncio.sleep(max(0.0, left - refresh_margin(left)))
            try:
                await self._refresh_token()
            except Unauthorized as exc:
                log.warning("%s: the connection ends at the token's exp", exc.detail)
                return
            new_exp = token_expiry(self.token)
            if new_exp is None or new_exp <= exp:
                log.warning("token_refresh gave no later `exp`: not refreshing again")
                return
            with contextlib.suppress(ConnectionClosed):
                await ws.send(encode(Refresh(token=self.token, ref=uuid.uuid4().hex)))
