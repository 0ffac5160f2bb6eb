"""The AsyncAPI 3 document of the protocol, generated from the JSON Schema of the Structs.

Built from the same document as /schema.json (so the envelope types an app
registers through `Roomcast.handler` / `server_envelope` appear in both),
from the server's point of view: it *receives* client requests and *sends*
server envelopes on `/ws` and `/ws/{room}`.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from .codes import Close
from .envelopes import CLIENT_ID_PATTERN, PROTOCOL_VERSION, ROOM_PATTERN, SUBPROTOCOL
from .schema import tags

ASYNCAPI_VERSION: Final = "3.0.0"
_DEFS: Final = "#/$defs/"
_SCHEMAS: Final = "#/components/schemas/"


def close_codes() -> list[dict[str, object]]:
    """Every `Close` code, described."""
    return [
        {"code": int(code), "name": code.name, "when": code.when, "client": code.client}
        for code in sorted(Close)
    ]


def _to_asyncapi_schema(node: Any) -> Any:
    """A schema of /schema.json as an AsyncAPI Schema Object: refs into components."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_DEFS):
                out[key] = _SCHEMAS + value[len(_DEFS) :]
            else:
                out[key] = _to_asyncapi_schema(value)
        return out
    if isinstance(node, list):
        return [_to_asyncapi_schema(item) for item in node]
    return node


def _message(name: str, tag: str, schema: dict[str, Any], direction: str) -> dict[str, Any]:
    message: dict[str, Any] = {
        "name": tag,
        "title": f"{tag} ({direction})",
        "contentType": "application/json",
        "payload": {"$ref": _SCHEMAS + name},
    }
    if isinstance(schema.get("description"), str):
        message["summary"] = schema["description"]
    return message


def _query(room_path: bool) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "username": {"type": "string", "description": "display name in anonymous mode"},
        "client": {
            "type": "string",
            "pattern": CLIENT_ID_PATTERN,
            "description": "a stable id the client keeps across reconnects",
        },
        "token": {
            "type": "string",
            "description": "JWT; prefer the subprotocol roomcast.token.<JWT> (not logged)",
        },
    }
    if room_path:
        properties["since"] = {
            "type": "string",
            "pattern": r"^.+:\d+$",
            "description": "EPOCH:OFFSET of the last message seen: replay what followed",
        }
        properties["history"] = {
            "type": "string",
            "pattern": r"^\d+$",
            "description": "replay the last N messages",
        }
    query = {"type": "object", "properties": properties}
    return {"ws": {"query": query, "bindingVersion": "0.1.0"}}


def document(schema: dict[str, Any], version: str = "0.1.0") -> dict[str, Any]:
    """The AsyncAPI 3 document of a /schema.json document (`envelopes.schema()`)."""
    defs: dict[str, Any] = copy.deepcopy(schema["$defs"])
    client = tags(schema, "ClientMessage")
    server = tags(schema, "ServerMessage")
    messages = {
        **{n: _message(n, tag, defs[n], "client to server") for tag, n in client.items()},
        **{n: _message(n, tag, defs[n], "server to client") for tag, n in server.items()},
    }
    if len(messages) != len(client) + len(server):
        raise TypeError("an envelope type is declared in both directions")
    closes = close_codes()
    closing = "; ".join(f"{c['code']} {c['name']}: {c['when']} ({c['client']})" for c in closes)
    common = (
        "Every frame is one WebSocket text frame holding one JSON envelope tagged by `type`. "
        f"Offer the subprotocol {SUBPROTOCOL} (and roomcast.token.<JWT> to pass a token). "
        f"The first frame is `welcome`. Close codes: {closing}."
    )
    channel_messages = {n: {"$ref": f"#/components/messages/{n}"} for n in messages}
    channels = {
        "multiplexed": {
            "address": "/ws",
            "title": "multiplexed",
            "description": "One connection joins and leaves rooms with `join` and `leave`. "
            + common,
            "messages": channel_messages,
            "bindings": _query(room_path=False),
            "x-close-codes": closes,
        },
        "room": {
            "address": "/ws/{room}",
            "title": "one room",
            "description": "As /ws, plus an automatic `join` of `room` at connect; a `chat` "
            "without `room` goes to it, and a text frame not starting with `{` is the text of "
            "a chat in it. " + common,
            "parameters": {"room": {"description": f"the room to join: {ROOM_PATTERN}"}},
            "messages": channel_messages,
            "bindings": _query(room_path=True),
            "x-close-codes": closes,
        },
    }
    operations: dict[str, Any] = {}
    for channel in channels:
        for action, names, what in (
            ("receive", client.values(), "requests from clients"),
            ("send", server.values(), "envelopes to clients"),
        ):
            operations[f"{action}_{channel}"] = {
                "action": action,
                "channel": {"$ref": f"#/channels/{channel}"},
                "summary": f"{what} on {channels[channel]['address']}",
                "messages": [{"$ref": f"#/channels/{channel}/messages/{n}"} for n in names],
            }
    schemas = {
        name: _to_asyncapi_schema(value)
        for name, value in defs.items()
        if name not in ("ClientMessage", "ServerMessage")
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "roomcast",
            "version": version,
            "description": f"Real-time rooms over WebSockets, protocol version {PROTOCOL_VERSION}. "
            "Generated from the msgspec Structs, like /schema.json (JSON Schema of the same "
            "envelopes).",
            "x-close-codes": closes,
        },
        "servers": {
            "roomcast": {
                "host": "{host}",
                "protocol": "ws",
                "description": "a roomcast server (wss behind TLS)",
                "variables": {"host": {"default": "127.0.0.1:8000"}},
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
