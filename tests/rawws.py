"""A WebSocket client on a bare TCP socket: answers nothing unless told (`send`), reads only
when told, and parses the server's byte stream strictly, frame by frame."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time


class RawWebSocket:
    """A WebSocket client on a bare TCP socket that never answers anything (no pongs)."""

    def __init__(self, port: int, path: str, rcvbuf: int | None = None, prefix: str = "") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the advertised window stays small
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {prefix}{path} HTTP/1.1\r\n"
                f"Host: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            assert chunk, f"connection closed during the handshake: {self.buffer!r}"
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n", 1)[0].decode()

    def _read_exactly(self, n: int, deadline: float) -> bytes | None:
        """n bytes, or None at EOF; raises TimeoutError at the deadline."""
        while len(self.buffer) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)  # TimeoutError propagates
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read_frame(self, deadline: float) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame, or None when the server closed the TCP stream."""
        header = self._read_exactly(2, deadline)
        if header is None:
            return None
        opcode = header[0] & 0x0F
        # FIN, and no RSV bit: this client negotiates no extension, and the server
        # sends no fragments, so any other first byte is a frame split or garbled.
        assert header[0] & 0xF0 == 0x80, f"not the start of a whole frame: {header!r}"
        masked = header[1] & 0x80
        length = header[1] & 0x7F
        if length == 126:
            raw = self._read_exactly(2, deadline)
            if raw is None:
                return None
            (length,) = struct.unpack("!H", raw)
        elif length == 127:
            raw = self._read_exactly(8, deadline)
            if raw is None:
                return None
            (length,) = struct.unpack("!Q", raw)
        assert not masked, "server frames must not be masked"
        payload = self._read_exactly(length, deadline) if length else b""
        if payload is None:
            return None
        return opcode, payload

    def send(self, opcode: int, payload: bytes) -> None:
        """One masked client frame (payloads under 126 bytes: pongs, short texts)."""
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    def close(self) -> None:
        self.sock.close()
