"""The README's "Build your own app" example runs as written."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from starlette.testclient import TestClient

README = Path(__file__).resolve().parent.parent.parent / "README.md"


def example_namespace() -> dict[str, Any]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    app_block = next(b for b in blocks if "Starlette(" in b)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(app_block, str(README), "exec"), namespace)
    return namespace


def next_of(ws: Any, kind: str) -> dict[str, Any]:
    for _ in range(50):
        frame: dict[str, Any] = json.loads(ws.receive_text())
        if frame["type"] == kind:
            return frame
    raise AssertionError(f"no {kind}")


def test_readme_example_app_serves_custom_envelopes() -> None:
    namespace = example_namespace()
    rc = namespace["rc"]
    with TestClient(namespace["app"]) as client:
        with client.websocket_connect("/rt/ws/lobby?username=ann") as ann:
            next_of(ann, "joined")
            with client.websocket_connect("/rt/ws/lobby?username=bob&client=bob") as bob:
                bob_id = next_of(bob, "welcome")["user"]["id"]  # public, derived from `client`
                next_of(bob, "joined")
                bob.send_text(json.dumps({"type": "typing", "room": "lobby"}))
                assert next_of(ann, "typing_notice") == {
                    "type": "typing_notice",
                    "room": "lobby",
                    "user": "bob",
                }
                # The README's calls from the user's own code.
                portal = client.portal
                assert portal is not None
                portal.call(
                    lambda: rc.publish("lobby", title="Deploy", body="v2 is live", level="success")
                )
                note = next_of(ann, "notification")
                assert (note["title"], note["level"], note["offset"]) == ("Deploy", "success", 1)
                assert next_of(bob, "notification")["offset"] == 1
                portal.call(lambda: rc.notify_user(bob_id, title="Mention", body="hi"))
                personal = next_of(bob, "notification")
                assert personal["title"] == "Mention"
                assert (personal["room"], personal["epoch"], personal["offset"]) == (
                    None,
                    None,
                    None,
                )
                # ann was not the target: her next frame is bob's chat, not the notification.
                bob.send_text("after")
                frame = json.loads(ann.receive_text())
                assert (frame["type"], frame["text"]) == ("chat", "after")
        assert client.get("/rt/schema.json").json()["$defs"]["TypingNotice"]
