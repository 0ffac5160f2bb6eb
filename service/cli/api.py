"""`roomcast publish` and `roomcast notify`: the HTTP API from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from . import exit_codes

TIMEOUT = 10.0
LEVELS = ("info", "success", "warning", "error")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=None,
        help="the server (default: $ROOMCAST_URL, else http://127.0.0.1:$PORT or :8000); "
        "ws:// URLs are accepted",
    )
    parser.add_argument("--api-key", default=None, help="the API key (default: $API_KEY)")


def _notification(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--title", required=required, help="notification title")
    parser.add_argument("--body", required=required, help="notification body")
    parser.add_argument("--level", choices=LEVELS, default="info")
    parser.add_argument("--data", default=None, help="any JSON, delivered as `data`")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    publish = sub.add_parser(
        "publish",
        help="publish a notification (or, with --text, a chat) into a room via the HTTP API",
    )
    publish.add_argument("room")
    _notification(publish, required=False)
    publish.add_argument("--text", help="publish a chat with this text instead")
    publish.add_argument("--user-id", help="the chat's author id (with --text)")
    publish.add_argument("--user-name", help="the chat's author name (with --text)")
    publish.add_argument("--ref", help="idempotency key: publishing it again publishes nothing")
    _common(publish)
    publish.set_defaults(handler=run_publish, run=main)

    notify = sub.add_parser("notify", help="send a notification to every connection of a user")
    notify.add_argument("user")
    _notification(notify, required=True)
    _common(notify)
    notify.set_defaults(handler=run_notify, run=main)

    disconnect = sub.add_parser("disconnect", help="close every connection of a user (4401)")
    disconnect.add_argument("user")
    _common(disconnect)
    disconnect.set_defaults(handler=run_disconnect, run=main)


def base_url(given: str | None) -> str:
    """The server's HTTP root from --url, $ROOMCAST_URL or $PORT; ws:// becomes http://."""
    url = given or os.environ.get("ROOMCAST_URL") or ""
    if not url:
        return f"http://127.0.0.1:{os.environ.get('PORT') or 8000}"
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if path.endswith("/ws"):
        path = path[: -len("/ws")]
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


class CommandError(Exception):
    """A one-line message for stderr, and the exit code (those of `roomcast listen`/`send`)."""

    def __init__(self, message: str, code: int = exit_codes.OTHER_ERROR) -> None:
        super().__init__(message)
        self.code = code


_EXIT_BY_STATUS = {
    401: exit_codes.REFUSED,
    404: exit_codes.API_OFF,
    400: exit_codes.INVALID_ROOM,
}


def call(args: argparse.Namespace, path: str, body: dict[str, Any] | None) -> Any:
    key = args.api_key or os.environ.get("API_KEY")
    if not key:
        raise CommandError("no API key: pass --api-key or set API_KEY")
    url = base_url(args.url)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise CommandError(f"--url {url!r} is not an http(s):// or ws(s):// URL")
    request = urllib.request.Request(
        url + path,
        data=b"" if body is None else json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            raw = exc.read()
        try:
            error = json.loads(raw)
            reason = f"{error['error']}: {error['detail']}"
        except (ValueError, KeyError, TypeError):
            reason = raw.decode(errors="replace")[:200] or exc.reason
        raise CommandError(
            f"{exc.code} {reason}", _EXIT_BY_STATUS.get(exc.code, exit_codes.OTHER_ERROR)
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise CommandError(f"cannot reach {url}: {why}", exit_codes.UNREACHABLE) from None


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _notification_body(args: argparse.Namespace) -> dict[str, Any]:
    data = None
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except ValueError as exc:
            raise CommandError(f"--data is not JSON: {exc}") from None
    return {"title": args.title, "body": args.body, "level": args.level, "data": data}


def run_publish(args: argparse.Namespace) -> Any:
    if args.text is not None:
        if args.title is not None or args.body is not None:
            raise CommandError("give either --text (a chat) or --title/--body (a notification)")
        if not args.user_id:
            raise CommandError("a chat needs --user-id (and --user-name)")
        body: dict[str, Any] = {
            "type": "chat",
            "text": args.text,
            "user": {"id": args.user_id, "name": args.user_name or args.user_id},
        }
    else:
        if args.title is None or args.body is None:
            raise CommandError("a notification needs --title and --body (or give --text)")
        body = {"type": "notification", **_notification_body(args)}
    body["ref"] = args.ref
    return call(args, f"/api/rooms/{_quote(args.room)}/publish", body)


def run_notify(args: argparse.Namespace) -> Any:
    return call(args, f"/api/users/{_quote(args.user)}/notify", _notification_body(args))


def run_disconnect(args: argparse.Namespace) -> Any:
    return call(args, f"/api/users/{_quote(args.user)}/disconnect", None)


def main(args: argparse.Namespace) -> int:
    try:
        answer = args.handler(args)
    except CommandError as exc:
        print(f"roomcast {args.command}: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(answer))
    return 0
