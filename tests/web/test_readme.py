"""The README's "Build your own app" example runs as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from roomcast import User
from roomcast.client import Forbidden, Unauthorized
from roomcast.protocol.envelopes import Chat
from roomcast.testing import RoomcastTest

README = Path(__file__).resolve().parent.parent.parent / "README.md"


def python_block(marker: str) -> str:
    """The README's first python block that contains `marker`."""
    blocks: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if marker in b)


def example_namespace(marker: str = "Starlette(") -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(python_block(marker), str(README), "exec"), namespace)
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


async def test_readme_hooks_example_guards_connects_joins_and_chats(
    capsys: pytest.CaptureFixture[str],
) -> None:
    namespace = example_namespace("@rc.on_connect")
    async with RoomcastTest(namespace["rc"]) as t:
        with pytest.raises(Unauthorized, match="Log in first"):
            await t.connect("/ws")
        ann = await t.connect("/ws/lobby", cookies={"session": "s-ann"})
        assert ann.welcome is not None and ann.welcome.user == User("ann", "Ann")
        with pytest.raises(Forbidden, match="You may not join staff"):
            await ann.join("staff")
        await ann.join("team-ann")
        ack = await ann.send("lobby", "darn")
        chat = await ann.expect(Chat)
        assert (chat.text, chat.offset) == ("d**n", ack.offset)
        await ann.leave("team-ann")
        await ann.close()
    assert capsys.readouterr().out.splitlines() == [
        "Ann left team-ann",
        "Ann left lobby",
        "Ann is gone",
    ]


@pytest.mark.slow
def test_readme_test_file_passes_under_pytest(tmp_path: Path) -> None:
    """The "Testing your app" file, as a user would save and run it."""
    test_file = tmp_path / "test_chat.py"
    test_file.write_text(python_block("# test_chat.py"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 passed" in run.stdout
