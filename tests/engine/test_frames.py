"""Prepared frames are byte for byte what the `websockets` serializer writes, and a client
that negotiated deflate without context takeover reads the shared compressed bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory,
    PerMessageDeflate,
)
from websockets.frames import Frame as WsFrame
from websockets.frames import Opcode
from websockets.protocol import Protocol, Side, State

from roomcast.engine.frames import DEFLATE_MIN_BYTES, Frame

# Every length class of the header: 7-bit, 16-bit and 64-bit lengths, and their edges.
LENGTHS = st.one_of(
    st.integers(0, 125),
    st.sampled_from([126, 127, 65535, 65536]),
    st.integers(126, 70000),
)


def texts() -> st.SearchStrategy[str]:
    ascii_text = LENGTHS.map(lambda n: ("roomcast " * (n // 9 + 1))[:n])
    return st.one_of(st.text(max_size=300), ascii_text, st.text(min_size=200, max_size=2000))


def websockets_bytes(text: str, wbits: int | None) -> bytes:
    extensions = (
        [] if wbits is None else [PerMessageDeflate(True, True, 15, wbits, {"memLevel": 8})]
    )
    return WsFrame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=extensions)


@settings(max_examples=300, deadline=None)
@given(texts())
def test_plain_frames_are_the_websockets_serializers(text: str) -> None:
    assert Frame(text).plain == websockets_bytes(text, None)


@settings(max_examples=300, deadline=None)
@given(texts(), st.sampled_from([9, 12, 15]))
def test_compressed_frames_are_the_websockets_serializers(text: str, wbits: int) -> None:
    frame = Frame(text)
    if len(text.encode()) < DEFLATE_MIN_BYTES:
        assert frame.deflated(wbits) == frame.plain  # too short to gain: sent plain
    else:
        assert frame.deflated(wbits) == websockets_bytes(text, wbits)
        assert frame.deflated(wbits) is frame.deflated(wbits)  # compressed once


def client_with_deflate() -> Protocol:
    """A websockets client connection that negotiated deflate without context takeover
    (as the server's shared mode answers), fed the server's bytes directly."""
    factory = ClientPerMessageDeflateFactory(
        server_no_context_takeover=True, client_no_context_takeover=True
    )
    client = Protocol(Side.CLIENT, state=State.OPEN)
    answer = [("server_no_context_takeover", None), ("client_no_context_takeover", None)]
    client.extensions = [factory.process_response_params(answer, [])]
    return client


def texts_received(client: Protocol) -> list[str]:
    """The text of each message the (open) client received: only frames arrive once open."""
    found = []
    for event in client.events_received():
        assert isinstance(event, WsFrame), event
        found.append(bytes(event.data).decode())
    return found


def test_a_client_reads_shared_compressed_frames_in_any_order() -> None:
    """One compressed frame serves every member: each client decodes it whatever came
    before on its own connection (no context carried between messages)."""
    first, second = Frame("a" * 500 + "é" * 200), Frame('{"type":"chat","text":"' + "b" * 900)
    one, two = client_with_deflate(), client_with_deflate()
    one.receive_data(first.deflated(15) + second.deflated(15))
    two.receive_data(second.deflated(15) + first.plain + second.deflated(15))
    got_one = texts_received(one)
    got_two = texts_received(two)
    assert got_one == [first.text, second.text]
    assert got_two == [second.text, first.text, second.text]
    assert len(second.deflated(15)) < len(second.plain) * 0.6
