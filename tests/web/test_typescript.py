"""What other languages and TypeScript see: /schema.json under ajv's strict mode, the
README's TypeScript recipe, /roomcast.d.ts under `tsc --strict`, and roomcast.js's size.

The README's example app (custom envelope types, mounted at /rt) serves the documents, so
the app's own types are checked too. The node tools are real (npm registry, cached).
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

from roomcast import ClientEnvelope
from roomcast.protocol.schema import GLOBALS, schema
from roomcast.protocol.typescript import declarations

from ..node import TSC_OPTIONS, run_node, run_node_tool
from .test_readme import README, example_namespace

BUDGET = 8 * 1024  # bytes of roomcast.js gzipped at level 9

pytestmark = pytest.mark.slow  # npm install once, then tsc runs of a few seconds


def served(path: str) -> tuple[dict[str, str], bytes]:
    namespace = example_namespace()
    with TestClient(namespace["app"]) as client:
        response = client.get("/rt" + path)
        assert response.status_code == 200, response.text
        return dict(response.headers), response.content


def test_roomcast_js_fits_the_size_budget_and_is_revalidated_by_etag() -> None:
    headers, body = served("/roomcast.js")
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["etag"] and headers["cache-control"] == "no-cache"
    code = re.sub(rb"//[^\n]*", b"", body)  # the comments show an import, as an example
    assert not re.search(rb"\bimport\b|\brequire\(", code)  # no dependencies
    size = len(gzip.compress(body, compresslevel=9))
    assert size <= BUDGET, f"roomcast.js is {size} bytes gzipped, over {BUDGET}"


AJV_CHECK = """
const Ajv2020 = require("ajv/dist/2020").default;
const fs = require("fs");
const schema = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
const ajv = new Ajv2020({ strict: true, allErrors: true });
ajv.addSchema(schema);
const verdicts = {};
for (const [name, frames] of Object.entries(JSON.parse(fs.readFileSync(process.argv[2], "utf8")))) {
  const validate = ajv.getSchema(`roomcast.v1#/$defs/${name}`);
  verdicts[name] = frames.map((f) => validate(f));
}
console.log(JSON.stringify(verdicts));
"""

FRAMES: dict[str, list[Any]] = {
    "ServerMessage": [
        {
            "type": "notification",
            "room": None,
            "epoch": None,
            "offset": None,
            "title": "t",
            "body": "b",
            "level": "info",
            "data": None,
            "ts": "2026-01-01T00:00:00Z",
        },
        {"type": "pong", "ref": None},
        {"type": "error", "code": "not_joined", "detail": "x", "ref": "1", "room": "a"},
        {"type": "typing_notice", "room": "lobby", "user": "bob"},
        {"type": "pong"},  # `ref` is always sent
        {"type": "error", "code": "no_such_code", "detail": "x", "ref": None, "room": None},
    ],
    "ClientMessage": [
        {"type": "join", "room": "lobby", "since": {"epoch": "e", "offset": 3}, "ref": "j"},
        {"type": "typing", "room": "lobby"},
        {"type": "ping", "pad": "ignored by the server"},
        {"type": "join", "room": "not a room!"},
        {"type": "typing"},
    ],
}


def test_schema_passes_ajv_strict_mode_and_validates_frames(tmp_path: Path) -> None:
    _, body = served("/schema.json")
    (tmp_path / "schema.json").write_bytes(body)
    (tmp_path / "frames.json").write_text(json.dumps(FRAMES))
    verdicts = json.loads(run_node(AJV_CHECK, "schema.json", "frames.json", cwd=tmp_path))
    assert verdicts == {
        "ServerMessage": [True, True, True, True, False, False],
        "ClientMessage": [True, True, True, False, False],
    }
    # The command line of the README too (ajv-cli, strict by default).
    run_node_tool("ajv", "compile", "--spec=draft2020", "-s", "schema.json", cwd=tmp_path)


def test_schema_types_nullable_fields_and_shadows_no_global() -> None:
    document = schema()
    defs = document["$defs"]
    assert not GLOBALS & set(defs)
    assert {"ErrorEnvelope", "NotificationEnvelope"} <= set(defs)
    assert "discriminator" not in json.dumps(document)
    data = defs["NotificationEnvelope"]["properties"]["data"]
    assert {"type": "null"} in data["anyOf"] and {"type": "object"} in data["anyOf"]
    # What the server always sends is required; what the client may leave out is not.
    assert "ref" in defs["Pong"]["required"] and "data" in defs["NotificationEnvelope"]["required"]
    assert defs["Join"]["required"] == ["type", "room"]


class Strict(ClientEnvelope, tag="strict", kw_only=True, forbid_unknown_fields=True):
    room: str


def test_client_envelopes_refuse_extra_fields_where_the_server_does() -> None:
    defs = schema([Strict])["$defs"]
    assert defs["Strict"]["additionalProperties"] is False
    assert "additionalProperties" not in defs["Join"]  # the server ignores unknown fields
    with pytest.raises(msgspec.ValidationError, match="unknown field `pad`"):
        msgspec.json.decode(b'{"type": "strict", "room": "a", "pad": 1}', type=Strict)


def _readme_block(language: str, containing: str) -> str:
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if containing in b)


def test_readme_typescript_recipe(tmp_path: Path) -> None:
    """The README's commands, run as written (npx replaced by the cached tools): the types
    json-schema-to-typescript makes compile under `tsc --strict` with the README's usage."""
    _, body = served("/schema.json")
    (tmp_path / "roomcast.schema.json").write_bytes(body)
    (tmp_path / "describe.ts").write_text(_readme_block("ts", "ServerMessage"))
    tools = {"ajv-cli": "ajv", "json-schema-to-typescript": "json2ts", "typescript": "tsc"}
    for line in _readme_block("sh", "json-schema-to-typescript").splitlines():
        words = shlex.split(line)
        if words[0] == "curl":
            continue  # fetched above, from the README's own app
        assert words[:2] == ["npx", "-y"], line
        words = words[2:]
        if words[0] == "-p":
            words = words[2:]
        run_node_tool(tools.get(words[0], words[0]), *words[1:], cwd=tmp_path)
    generated = (tmp_path / "roomcast.schema.d.ts").read_text()
    assert "data: {" in generated and "| null;" in generated
    assert "interface Error " not in generated and "interface Notification " not in generated
    assert "[k: string]: unknown;\n}" not in generated.split("export interface Join")[1][:400]


USAGE = """
import { Client, ClientError } from "./roomcast.js";
import type { Chat, NotificationEnvelope, TypingNotice } from "./roomcast.js";

const c = new Client("ws://127.0.0.1:8000", { username: "ann", tokenRefresh: async () => "jwt" });
const off: () => void = c.on("chat", (m: Chat) => console.log(m.offset.toFixed(), m.user.name));
off();
c.on("typing_notice", (t: TypingNotice) => console.log(t.user));
c.on("notification", (n: NotificationEnvelope) => {
  const data: typeof n.data = null;
  console.log(n.room ?? "to me", data);
});
c.on("state", (state, info) => state === "closed" && console.log(info.error?.closeCode));
c.on("recoveryFailed", ({ room, joined }) => console.log(room, joined.epoch));

async function main(): Promise<void> {
  const welcome = await c.connect();
  const joined = await c.join("lobby", { history: 20 });
  const ack: { room: string; offset: number } = await c.send("lobby", "hello");
  const presence = await c.presence("lobby");
  const left = await c.leave("lobby");
  console.log(welcome.user.name, joined.recovered, ack.offset, presence.users, left.room);
  c.push({ type: "typing", room: "lobby" });
  // @ts-expect-error: no such server type
  c.on("typo", () => {});
  // @ts-expect-error: `room` is missing
  c.push({ type: "typing" });
  // @ts-expect-error: not a field of `join`
  c.push({ type: "join", room: "lobby", histroy: 20 });
  const global: Error = new Error("the global Error is not shadowed");
  if (global instanceof ClientError) console.log(global.code, global.detail);
  c.close();
}
void main();
"""


def test_roomcast_d_ts_compiles_under_tsc_strict(tmp_path: Path) -> None:
    headers, body = served("/roomcast.d.ts")
    assert headers["etag"]
    assert body.decode() == declarations(example_namespace()["rc"].schema())
    (tmp_path / "roomcast.d.ts").write_bytes(body)
    (tmp_path / "usage.ts").write_text(USAGE)
    run_node_tool("tsc", *TSC_OPTIONS, "usage.ts", cwd=tmp_path)
    # And a misuse fails: the types are not `any`.
    (tmp_path / "wrong.ts").write_text(
        'import { Client } from "./roomcast.js";\n'
        'new Client("ws://x").on("chat", (m) => m.offset.toUpperCase());\n'
    )
    with pytest.raises(AssertionError, match="toUpperCase"):
        run_node_tool("tsc", *TSC_OPTIONS, "wrong.ts", cwd=tmp_path)
