"""Encoding and decoding envelopes: encoders and decoders built once, used per frame."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, Union

import msgspec

from .envelopes import (
    CLIENT_TYPES,
    ClientEnvelope,
    Envelope,
    FrameView,
    RequestView,
    ServerMessage,
    SystemView,
)

_encoder = msgspec.json.Encoder()
frame_decoder: Final = msgspec.json.Decoder(FrameView)
system_decoder: Final = msgspec.json.Decoder(SystemView)
_request_decoder = msgspec.json.Decoder(RequestView)
server_decoder: Final = msgspec.json.Decoder(ServerMessage)


def encode(envelope: Envelope) -> str:
    """Encode once; the same text goes to every receiver."""
    return _encoder.encode(envelope).decode()


def salvage(frame: str) -> RequestView:
    """The `ref` and `room` of a frame that did not validate, where they can be read."""
    try:
        view = _request_decoder.decode(frame)
    except (msgspec.DecodeError, RecursionError):
        return RequestView()
    ref = view.ref if isinstance(view.ref, str) and len(view.ref) <= 64 else None
    return RequestView(ref=ref, room=view.room)


def ref_of(frame: str) -> str | None:
    """Best-effort `ref` of a frame that did not validate."""
    ref: str | None = salvage(frame).ref
    return ref


TOO_DEEP: Final = "The JSON nests too deeply (msgspec stops at Python's recursion limit)"


class DuplicateTag(TypeError):
    """Two client envelope types share a `type` tag."""


class Codec:
    """The decoder for client requests, built once per app with its extra types."""

    def __init__(self, extra: Iterable[type[ClientEnvelope]] = ()) -> None:
        types = (*CLIENT_TYPES, *extra)
        tags = [t.__struct_config__.tag for t in types]
        duplicates = {tag for tag in tags if tags.count(tag) > 1}
        if duplicates:
            raise DuplicateTag(f"envelope types registered twice: {sorted(map(str, duplicates))}")
        self.decoder: msgspec.json.Decoder[ClientEnvelope] = msgspec.json.Decoder(
            Union[types]  # noqa: UP007
        )

    def decode(self, frame: str) -> ClientEnvelope:
        return self.decoder.decode(frame)
