"""HANDSHAKE_TIMEOUT for `roomcast serve`: the only module that relies on uvicorn's
HTTP protocol internals.

uvicorn times out neither a request that never completes (`timeout_keep_alive`
starts only after a response) nor counts a socket before its request is in
(`limit_concurrency` is checked once the headers are). A client that sends half
a request holds a file descriptor for as long as it likes, and a thousand such
sockets exhaust a worker's descriptors. So every socket is *handshaking* until
its request (or WebSocket upgrade request) is in, and while it is:

- it is closed HANDSHAKE_TIMEOUT seconds after it began (`408` when nothing
  was answered yet);
- it counts towards the worker's cap on handshaking sockets, a quarter of its
  file descriptors (RLIMIT_NOFILE, read as each socket arrives) and at most
  MAX_CONNECTIONS. A socket past the cap closes the oldest handshaking one, so
  an attacker's idle half-requests make room for fresh clients and never take
  the descriptors that established connections and new ones need.

`GuardedHttp` is uvicorn's `HttpToolsProtocol` with these hooks, each calling
the original first:

- `connection_made`: the socket starts handshaking;
- `on_message_begin` (a parser callback): a further request on a kept-alive
  connection starts handshaking again;
- `on_message_complete` (a parser callback): the request is in;
- `handle_websocket_upgrade`: the upgrade request is in; uvicorn's WebSocket
  protocol takes the socket over (our `connection_lost` is not called then);
- `connection_lost`: the socket is gone.

`tests/e2e/test_handshakes.py` checks them against the installed uvicorn.
"""

from __future__ import annotations

import asyncio
import functools
import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..observe import metrics

MIN_CAP: Final = 16
_TIMEOUT_RESPONSE: Final = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


def _descriptors() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class Handshakes:
    """One worker's handshaking sockets, oldest first, each with its timer."""

    def __init__(
        self, timeout: float, max_connections: int, descriptors: Callable[[], int] = _descriptors
    ) -> None:
        self.timeout = timeout
        self.max_connections = max_connections
        self.descriptors = descriptors
        self._open: OrderedDict[GuardedHttp, asyncio.TimerHandle] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def __reduce__(self) -> tuple[type[Handshakes], tuple[float, int]]:
        # Pickled into each worker process: a fresh, empty copy with the settings.
        return (Handshakes, (self.timeout, self.max_connections))

    @property
    def cap(self) -> int:
        return max(MIN_CAP, min(self.max_connections, self.descriptors() // 4))

    def begin(self, protocol: GuardedHttp) -> None:
        if protocol in self._open:
            return
        cap = self.cap
        while len(self._open) >= cap:
            oldest, timer = self._open.popitem(last=False)
            timer.cancel()
            metrics.refused("handshake_cap")
            oldest.cut()
        self._open[protocol] = protocol.loop.call_later(self.timeout, self._expired, protocol)

    def end(self, protocol: GuardedHttp) -> None:
        timer = self._open.pop(protocol, None)
        if timer is not None:
            timer.cancel()

    def _expired(self, protocol: GuardedHttp) -> None:
        if self._open.pop(protocol, None) is not None:
            metrics.refused("handshake_timeout")
            protocol.cut()


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, handshaking under `Handshakes`' rules."""

    def __init__(self, *args: Any, handshakes: Handshakes, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handshakes = handshakes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.handshakes.begin(self)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.handshakes.begin(self)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.handshakes.end(self)

    def handle_websocket_upgrade(self) -> None:
        self.handshakes.end(self)
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Exception | None) -> None:
        self.handshakes.end(self)
        super().connection_lost(exc)

    def cut(self) -> None:
        """Close a socket that did not finish its request in time (or made room)."""
        transport = self.transport
        if transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            transport.write(_TIMEOUT_RESPONSE)  # nothing else is answering it
            transport.close()
        else:
            transport.abort()  # the app is reading its body: it sees a disconnect


def http_protocol(timeout: float, max_connections: int) -> Callable[..., GuardedHttp]:
    """What `uvicorn.run(http=...)` takes: a factory of `GuardedHttp` sharing one
    worker's `Handshakes` (pickled into each worker process with the config)."""
    return functools.partial(GuardedHttp, handshakes=Handshakes(timeout, max_connections))
