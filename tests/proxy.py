"""A TCP proxy on loopback that a test controls: it cuts a client's network, or stops
reading from the server (a client too slow to read), without touching the server."""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass, field

from .brokers import free_port


@dataclass(eq=False)
class _Link:
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    silent: bool = False  # cut: nothing passes any more, and nobody is told


class Proxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target`, in a thread of its own."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.accepted = 0
        self._links: set[_Link] = set()
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coroutine: object, timeout: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._cut:
            writer.transport.abort()  # the network is down: the connection fails
            return
        upstream = socket.socket()
        # A small receive buffer, so that the server feels it when the proxy stops reading.
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        upstream.setblocking(False)
        await self._loop.sock_connect(upstream, ("127.0.0.1", self.target))
        up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        link = _Link([writer, up_writer])
        self._links.add(link)
        await asyncio.gather(
            self._pipe(reader, up_writer, link, downstream=False),
            self._pipe(up_reader, writer, link, downstream=True),
        )
        self._links.discard(link)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        downstream: bool,
    ) -> None:
        try:
            while True:
                if downstream:
                    await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                if not link.silent:
                    writer.write(data)
                    await writer.drain()
        except OSError:
            pass
        finally:
            if not link.silent:
                writer.transport.abort()

    def cut(self) -> None:
        """The network goes away silently: open connections hear nothing more (and their
        end is never told), new ones fail."""

        async def cut() -> None:
            self._cut = True
            for link in self._links:
                link.silent = True

        self._call(cut())

    def restore(self) -> None:
        """The network is back: new connections pass (the silent ones stay dead)."""

        async def restore() -> None:
            self._cut = False
            for link in list(self._links):
                for writer in link.writers:
                    writer.transport.abort()

        self._call(restore())

    def pause_reading(self) -> None:
        """Stop reading from the server: the client behind looks like one that stopped."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume_reading(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for link in list(self._links):
                for writer in link.writers:
                    writer.transport.abort()

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
