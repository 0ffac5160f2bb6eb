"""A raw picows server: its Cython WebSocket protocol on uvloop, a set of
connections, and every text message sent to each of them, as picows'
examples write a server. No framework, no ASGI, no outbox: the floor of a
Python process that sends one frame per recipient.

`python -m benchmarks.baselines.picows_broadcast PORT`
"""

import sys

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

CONNECTIONS: set[WSTransport] = set()


class Member(WSListener):
    def on_ws_connected(self, transport: WSTransport) -> None:
        CONNECTIONS.add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            message = frame.get_payload_as_bytes()
            for peer in CONNECTIONS:
                peer.send(WSMsgType.TEXT, message)
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CONNECTIONS.discard(transport)


async def main(port: int) -> None:
    server = await ws_create_server(lambda request: Member(), "127.0.0.1", port)
    print(f"serving on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
