"""The `websockets` library's own server with `websockets.broadcast()`, as in
its broadcast guide: a set of connections, and every message broadcast to it.

Runs on uvloop like the uvicorn-based servers: `python -m
benchmarks.baselines.websockets_broadcast PORT`.
"""

import sys

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

CONNECTIONS: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    CONNECTIONS.add(websocket)
    try:
        async for message in websocket:
            broadcast(CONNECTIONS, message)
    finally:
        CONNECTIONS.remove(websocket)


async def main(port: int) -> None:
    async with serve(handler, "127.0.0.1", port, ping_interval=25, ping_timeout=25) as server:
        print(f"serving on 127.0.0.1:{port}", flush=True)
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
