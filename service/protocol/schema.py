"""JSON Schema (2020-12) of every envelope, generated from the Structs.

Written for other languages' tools, so it passes strict validators (ajv's
default strict mode refuses unknown keywords such as OpenAPI's
`discriminator`): each union is a `oneOf` whose members carry their tag as
the one-value `enum` of a required `type`, which is how tools
(json-schema-to-typescript, quicktype) find the tag. What the server always
sends is `required`, what may be null is nullable, and no type is named
after a JavaScript or DOM global (`Error` is `ErrorEnvelope` here), so
generated code shadows none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final, Union

import msgspec

from .envelopes import CLIENT_TYPES, SERVER_TYPES, ClientEnvelope, ServerEnvelope

DEFS: Final = "#/$defs/"

# Globals of JavaScript and of browsers that an envelope's name could shadow in generated
# code (a test checks every name served against Chromium's own `window`).
_GLOBAL_NAMES = """
AbortController Animation Array Audio Blob Boolean Comment Credential Date Document Element
Error Event EventTarget File Function Headers History Image Intl JSON Location Lock Map Math
Navigator Node Notification Number Object Option Performance Plugin Promise Proxy Range Reflect
Report Request Response Screen Selection Set Storage String Symbol Text Touch URL WeakMap
WeakSet WebSocket Window Worker
"""
GLOBALS: Final = frozenset(_GLOBAL_NAMES.split())
SUFFIX: Final = "Envelope"

# Any JSON value, null included (msgspec writes `Any` as `{}`, which code generators type
# as a non-null object). Listed as `anyOf` because strict validators refuse union `type`s.
ANY_JSON: Final = {
    "anyOf": [{"type": t} for t in ("object", "array", "string", "number", "boolean", "null")]
}


def schema(
    extra_client: Iterable[type[ClientEnvelope]] = (),
    extra_server: Iterable[type[ServerEnvelope]] = (),
) -> dict[str, Any]:
    """JSON Schema (2020-12) of every envelope, generated from the Structs."""
    client_types = (*CLIENT_TYPES, *extra_client)
    server_types = (*SERVER_TYPES, *extra_server)
    client = Union[client_types]  # type: ignore[valid-type]  # noqa: UP007
    server = Union[server_types]  # type: ignore[valid-type]  # noqa: UP007
    (client_schema, server_schema), components = msgspec.json.schema_components(
        (client, server), ref_template=DEFS + "{name}"
    )
    for struct in server_types:
        if not struct.__struct_config__.omit_defaults:  # then every field is always sent
            node = components[struct.__name__]
            node["required"] = list(node["properties"])
    for node in components.values():
        for name, prop in node.get("properties", {}).items():
            if not set(prop) - {"default", "description", "title"}:
                node["properties"][name] = {**prop, **ANY_JSON}
    defs = {
        **components,
        "ClientMessage": _one_of(client_schema),
        "ServerMessage": _one_of(server_schema),
    }
    renames = {name: name + SUFFIX for name in defs if name in GLOBALS}
    document: dict[str, Any] = _renamed(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "roomcast.v1",
            "title": "roomcast protocol v1",
            "description": "Every WebSocket frame is one JSON object of one of these envelopes.",
            "$defs": {renames.get(name, name): value for name, value in defs.items()},
            "anyOf": [{"$ref": DEFS + "ClientMessage"}, {"$ref": DEFS + "ServerMessage"}],
        },
        renames,
    )
    return document


def _one_of(union: dict[str, Any]) -> dict[str, Any]:
    """msgspec's tagged union (`anyOf` + OpenAPI `discriminator`) as a plain `oneOf`."""
    return {"oneOf": union["anyOf"]}


def _renamed(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {key: _renamed(value, renames) for key, value in node.items()}
        ref = out.get("$ref")
        if isinstance(ref, str) and ref.startswith(DEFS) and ref[len(DEFS) :] in renames:
            out["$ref"] = DEFS + renames[ref[len(DEFS) :]]
        title = out.get("title")
        if isinstance(title, str) and title in renames and "properties" in out:
            out["title"] = renames[title]
        return out
    if isinstance(node, list):
        return [_renamed(item, renames) for item in node]
    return node


def tags(document: dict[str, Any], union: str) -> dict[str, str]:
    """tag -> `$defs` name of every envelope in a union (`ClientMessage`, `ServerMessage`)."""
    defs: dict[str, Any] = document["$defs"]
    found: dict[str, str] = {}
    for member in defs[union]["oneOf"]:
        name = member["$ref"][len(DEFS) :]
        (tag,) = defs[name]["properties"]["type"]["enum"]
        found[tag] = name
    return found
