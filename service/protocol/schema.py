"""JSON Schema (2020-12) of every envelope, generated from the Structs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Union

import msgspec

from .envelopes import CLIENT_TYPES, SERVER_TYPES, ClientEnvelope, ServerEnvelope


def schema(
    extra_client: Iterable[type[ClientEnvelope]] = (),
    extra_server: Iterable[type[ServerEnvelope]] = (),
) -> dict[str, Any]:
    """JSON Schema (2020-12) of every envelope, generated from the Structs."""
    client = Union[(*CLIENT_TYPES, *extra_client)]  # type: ignore[valid-type]
    server = Union[(*SERVER_TYPES, *extra_server)]  # type: ignore[valid-type]
    (client_schema, server_schema), components = msgspec.json.schema_components(
        (client, server), ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "roomcast.v1",
        "title": "roomcast protocol v1",
        "description": "Every WebSocket frame is one JSON object of one of these envelopes.",
        "$defs": {
            **components,
            "ClientMessage": client_schema,
            "ServerMessage": server_schema,
        },
        "anyOf": [{"$ref": "#/$defs/ClientMessage"}, {"$ref": "#/$defs/ServerMessage"}],
    }
