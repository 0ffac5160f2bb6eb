"""GET /asyncapi.json: an AsyncAPI 3 document generated from the Structs.

The served document validates against the official AsyncAPI 3.0.0 JSON Schema
(from the npm package @asyncapi/specs, in tests/data: no PyPI package ships
it). On top of that: every `$ref` resolves, every envelope of both directions
is a message of both channels, operations point at channel messages, the
close codes are described, and the message payloads validate real frames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
from jsonschema import Draft7Validator
from starlette.testclient import TestClient

from roomcast import ClientEnvelope, Roomcast, RoomSocket, ServerEnvelope
from roomcast.protocol.asyncapi import close_codes, document
from roomcast.protocol.codec import encode
from roomcast.protocol.codes import Close
from roomcast.protocol.envelopes import (
    CLIENT_TYPES,
    SERVER_TYPES,
    GetPresence,
    Join,
    Leave,
    Ping,
    Refresh,
    SendChat,
    Since,
    now,
)
from roomcast.protocol.envelopes import Notification as NotificationEnvelope
from roomcast.protocol.schema import schema

from ..servers import Server
from ..support import client, http_get

SPEC = Path(__file__).parent.parent / "data" / "asyncapi-3.0.0.schema.json"


def spec_errors(doc: dict[str, Any]) -> list[str]:
    validator = Draft7Validator(json.loads(SPEC.read_text()))
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve at {part!r}"
        node = node[part]
    return node


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


def payload_validator(doc: dict[str, Any], message: str) -> Draft7Validator:
    """The validator of a message's payload (AsyncAPI's schema format is JSON Schema draft 7)."""
    payload = doc["components"]["messages"][message]["payload"]
    return Draft7Validator({"$ref": payload["$ref"], "components": doc["components"]})


def messages_by(doc: dict[str, Any], direction: str) -> dict[str, str]:
    """tag -> message name, for one direction ("send": server to client)."""
    names = {
        ref.rsplit("/", 1)[1]
        for ref in (m["$ref"] for m in doc["operations"][f"{direction}_multiplexed"]["messages"])
    }
    return {doc["components"]["messages"][n]["name"]: n for n in names}


def test_document_structure() -> None:
    doc = document(schema())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] and doc["info"]["version"]
    assert doc["defaultContentType"] == "application/json"
    for ref in refs(doc):
        resolve(doc, ref)
    assert {c["address"] for c in doc["channels"].values()} == {"/ws", "/ws/{room}"}
    assert doc["channels"]["room"]["parameters"]["room"]["description"]
    client_tags = {t.__struct_config__.tag for t in CLIENT_TYPES}
    server_tags = {t.__struct_config__.tag for t in SERVER_TYPES}
    assert set(messages_by(doc, "receive")) == client_tags
    assert set(messages_by(doc, "send")) == server_tags
    for name, channel in doc["channels"].items():
        assert set(channel["messages"]) == set(doc["components"]["messages"])
        actions = {
            op["action"]
            for op in doc["operations"].values()
            if op["channel"]["$ref"] == f"#/channels/{name}"
        }
        assert actions == {"send", "receive"}
        for op in doc["operations"].values():
            for message in op["messages"]:
                assert message["$ref"].startswith(op["channel"]["$ref"] + "/messages/")
    # Each message's payload is a schema whose `type` is the message's tag.
    for message in doc["components"]["messages"].values():
        payload = resolve(doc, message["payload"]["$ref"])
        assert payload["properties"]["type"] == {"enum": [message["name"]]}
    # Schemas use AsyncAPI's forms: no JSON Schema 2020-12 `$defs`, string discriminators.
    text = json.dumps(doc)
    assert "#/$defs/" not in text and '"propertyName"' not in text


def test_every_close_code_is_described() -> None:
    doc = document(schema())
    codes = {getattr(Close, n) for n in vars(Close) if n.isupper()}
    for where in (doc["info"], *doc["channels"].values()):
        described = where["x-close-codes"]
        assert {c["code"] for c in described} == codes
        assert all(c["when"] and c["client"] for c in described)
    for channel in doc["channels"].values():
        assert all(str(code) in channel["description"] for code in codes)
    assert close_codes() == doc["info"]["x-close-codes"]


async def test_served_document_validates_real_frames(server: Server) -> None:
    status, doc = http_get(server, "/asyncapi.json")
    assert status == 200
    assert not spec_errors(doc)
    status, published = http_get(server, "/schema.json")
    assert doc == json.loads(json.dumps(document(published)))
    outgoing = messages_by(doc, "send")
    validators = {tag: payload_validator(doc, name) for tag, name in outgoing.items()}
    frames: list[dict[str, Any]] = []
    async with client(server) as ann, client(server) as bob:
        frames.append(ann.welcome)
        frames.append(await ann.join("asyncapi"))
        frames.append(await bob.join("asyncapi"))
        frames.append(await ann.recv_type("system"))
        frames.extend(await ann.chat("hello", room="asyncapi", ref="c1"))
        await ann.send({"type": "presence", "room": "asyncapi", "ref": "p1"})
        frames.append(await ann.recv_type("presence"))
        await ann.send({"type": "join", "room": "not valid!", "ref": "j1"})
        frames.append(await ann.recv_type("error", code="invalid_room"))
        await ann.send({"type": "ping", "ref": "p2"})
        frames.append(await ann.recv_type("pong"))
        await ann.send({"type": "leave", "room": "asyncapi", "ref": "l1"})
        frames.append(await ann.recv_type("left"))
    note = NotificationEnvelope(room=None, epoch=None, offset=None, title="t", body="b", ts=now())
    frames.append(json.loads(encode(note)))
    seen = {f["type"] for f in frames}
    assert seen == set(outgoing), f"no sample for {set(outgoing) - seen}"
    for frame in frames:
        errors = [e.message for e in validators[frame["type"]].iter_errors(frame)]
        assert not errors, (frame, errors)
    # A broken frame does not validate.
    broken = {k: v for k, v in frames[4].items() if k != "offset"}
    assert list(validators[broken["type"]].iter_errors(broken)), broken

    incoming = messages_by(doc, "receive")
    requests = [
        Join(room="r", since=Since("e", 3), ref="1"),
        Join(room="r", history=5),
        Leave(room="r"),
        SendChat(text="hi", room="r", ref="2"),
        GetPresence(room="r"),
        Refresh(token="t"),
        Ping(),
    ]
    assert {r.__struct_config__.tag for r in requests} == set(incoming)
    for request in requests:
        frame = json.loads(encode(request))
        validator = payload_validator(doc, incoming[frame["type"]])
        assert not list(validator.iter_errors(frame)), frame
    bad_room = {"type": "join", "room": "not valid!"}
    assert list(payload_validator(doc, incoming["join"]).iter_errors(bad_room))


class Typing(ClientEnvelope, tag="typing", kw_only=True):
    room: str


class TypingNotice(ServerEnvelope, tag="typing_notice", kw_only=True):
    room: str
    user: str


def test_custom_envelope_types_are_in_the_document() -> None:
    rc = Roomcast()
    rc.server_envelope(TypingNotice)

    @rc.handler(Typing)
    async def typing(socket: RoomSocket, message: Typing) -> None:
        pass

    with TestClient(rc) as http:
        doc = http.get("/asyncapi.json").json()
    assert not spec_errors(doc)
    assert messages_by(doc, "receive")["typing"] == "Typing"
    assert messages_by(doc, "send")["typing_notice"] == "TypingNotice"
    frame = msgspec.json.decode(encode(TypingNotice(room="lobby", user="ann")))
    assert not list(payload_validator(doc, "TypingNotice").iter_errors(frame))


def test_the_spec_check_rejects_a_broken_document() -> None:
    """The official schema is strict enough to catch what a generator gets wrong."""
    doc = json.loads(json.dumps(document(schema())))
    assert not spec_errors(doc)
    broken = json.loads(json.dumps(doc))
    broken["operations"]["send_multiplexed"]["action"] = "publish"  # AsyncAPI 2's word
    assert spec_errors(broken)
    broken = json.loads(json.dumps(doc))
    del broken["info"]["version"]
    assert spec_errors(broken)
