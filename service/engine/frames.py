"""Prepared frames: a text message framed once, compressed once, for every recipient.

A `Frame` holds an envelope's text and, built when first asked for, its
WebSocket frame as the server sends it (unmasked, FIN, opcode text): the
plain bytes, and the permessage-deflate bytes for each window size that
members negotiated with `server_no_context_takeover` (RFC 7692: with no
context carried between messages, a message compressed once is valid on
every such connection). No I/O: the wire writes these bytes.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any, Final

# Smaller payloads go out uncompressed even where deflate was negotiated (RFC 7692 lets
# a sender choose per message): below this, deflate saves nothing worth its CPU.
DEFLATE_MIN_BYTES: Final = 128
_EMPTY_BLOCK: Final = b"\x00\x00\xff\xff"
_TEXT: Final = 0x81  # FIN | opcode 1 (text)
_TEXT_RSV1: Final = 0xC1  # FIN | RSV1 (compressed) | opcode 1


def header(first: int, length: int) -> bytes:
    """A server frame's header: the first byte, then the payload length, unmasked."""
    if length < 126:
        return bytes((first, length))
    if length < 65536:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def deflate(payload: bytes, wbits: int, compress_settings: dict[str, Any]) -> bytes:
    """One message's permessage-deflate data with no context taken over (RFC 7692 7.2.1)."""
    encoder = zlib.compressobj(wbits=-wbits, **compress_settings)
    data = encoder.compress(payload) + encoder.flush(zlib.Z_SYNC_FLUSH)
    return data[:-4] if data.endswith(_EMPTY_BLOCK) else data


class Frame:
    """One text message for any number of connections."""

    __slots__ = ("_deflated", "_plain", "text")

    # zlib settings of the compressed frames; the shared-deflate extension uses the same.
    COMPRESS_SETTINGS: Final[dict[str, Any]] = {"memLevel": 8}

    def __init__(self, text: str) -> None:
        self.text = text
        self._plain: bytes | None = None
        self._deflated: tuple[int, bytes] | None = None

    def __repr__(self) -> str:
        return f"<Frame {self.text[:40]!r}>"

    @property
    def plain(self) -> bytes:
        data = self._plain
        if data is None:
            payload = self.text.encode()
            data = self._plain = header(_TEXT, len(payload)) + payload
        return data

    def deflated(self, wbits: int) -> bytes:
        """The frame compressed with a `wbits` window, or the plain frame when the text is
        too short to gain from it."""
        cached = self._deflated
        if cached is not None and cached[0] == wbits:
            return cached[1]
        payload = self.text.encode()
        if len(payload) < DEFLATE_MIN_BYTES:
            return self.plain
        data = deflate(payload, wbits, self.COMPRESS_SETTINGS)
        frame = header(_TEXT_RSV1, len(data)) + data
        self._deflated = (wbits, frame)
        return frame
