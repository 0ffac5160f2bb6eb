"""`roomcast listen`, `send` and `chat`: the typed client on the command line.

The URL comes from --url, else $ROOMCAST_URL, else ws://127.0.0.1:8000; the
token from --token, else $ROOMCAST_TOKEN. Errors are one line on stderr with
an exit code per kind (see EXIT_CODES).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime
from typing import Any, Final

import msgspec

from ..client import (
    Client,
    ClientError,
    ClientEvent,
    ConnectionFailed,
    Disconnected,
    Event,
    Forbidden,
    InvalidRoom,
    Reconnected,
    RecoveryFailed,
    Unauthorized,
)
from ..protocol.envelopes import Chat, Error, Left, Notification, System
from . import exit_codes

DEFAULT_URL: Final = "ws://127.0.0.1:8000"
EXIT_CODES: Final[dict[type[ClientError], int]] = {
    ConnectionFailed: exit_codes.UNREACHABLE,
    Unauthorized: exit_codes.REFUSED,
    Forbidden: exit_codes.FORBIDDEN,
    InvalidRoom: exit_codes.INVALID_ROOM,
}
# After stdin ends, how long `chat` waits for its own last lines to be printed.
ECHO_WAIT: Final = 5.0

_json = msgspec.json.Encoder()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    listen = sub.add_parser(
        "listen", help="join rooms and print what arrives, one line per envelope"
    )
    listen.add_argument("rooms", nargs="+", metavar="ROOM")
    _common(listen)
    listen.add_argument("--json", action="store_true", help="print JSON lines instead")
    listen.add_argument(
        "--history",
        type=int,
        default=None,
        metavar="N",
        help="first print the last N messages of each room",
    )
    listen.set_defaults(run=lambda args: _main(_listen, args))

    send = sub.add_parser("send", help="send one chat; prints its offset")
    send.add_argument("room", metavar="ROOM")
    send.add_argument("text", metavar="TEXT")
    _common(send)
    send.set_defaults(run=lambda args: _main(_send, args))

    chat = sub.add_parser(
        "chat", help="interactive: lines from stdin are sent, the room is printed; EOF leaves"
    )
    chat.add_argument("room", metavar="ROOM")
    _common(chat)
    chat.add_argument("--json", action="store_true", help="print JSON lines instead")
    chat.add_argument(
        "--history", type=int, default=None, metavar="N", help="first print the last N messages"
    )
    chat.set_defaults(run=lambda args: _main(_chat, args))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("ROOMCAST_URL", DEFAULT_URL),
        help=f"server URL (default: $ROOMCAST_URL or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token", default=os.environ.get("ROOMCAST_TOKEN"), help="JWT (default: $ROOMCAST_TOKEN)"
    )
    parser.add_argument("--username", default=None, help="display name (anonymous mode)")


def _main(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]], args: argparse.Namespace
) -> int:
    # The commands print their own lines about the connection.
    logging.getLogger("roomcast.client").setLevel(logging.WARNING)
    try:
        return asyncio.run(command(args))
    except ClientError as exc:
        print(f"roomcast: {exc.detail}", file=sys.stderr)
        return next(
            (code for kind, code in EXIT_CODES.items() if isinstance(exc, kind)),
            exit_codes.OTHER_ERROR,
        )
    except ValueError as exc:  # a URL that is not ws:// or wss://
        print(f"roomcast: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return exit_codes.INTERRUPTED


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, token=args.token, username=args.username)


def _time(ts: datetime) -> str:
    return ts.astimezone().strftime("%H:%M:%S")


def line(event: Event) -> str | None:
    """One readable line for an envelope or event (None: nothing worth a line)."""
    match event:
        case Chat(room=room, offset=offset, user=user, text=text, ts=ts):
            return f"[{room} #{offset} {_time(ts)}] {user.name}: {text}"
        case Notification(room=room, offset=offset, title=title, body=body, level=level, ts=ts):
            where = f"{room} #{offset}" if room is not None else "to you"
            return f"[{where} {_time(ts)}] ({level}) {title}: {body}"
        case System(room=room, event=kind, user=user, online=online, ts=ts):
            verb = "joined" if kind == "join" else "left"
            return f"[{room} {_time(ts)}] * {user.name} {verb} ({online} online)"
        case Left(room=room):
            return f"[{room}] * you left"
        case Error(code=code, detail=detail, room=room):
            return f"[{room or 'error'}] ! {code}: {detail}"
        case Disconnected(code=code, reason=reason):
            return f"* connection lost ({code or 'network'} {reason}), reconnecting".replace(
                "  ", " "
            )
        case Reconnected(attempts=attempts):
            return f"* reconnected after {attempts} attempt(s)"
        case RecoveryFailed(room=room, joined=joined):
            return f"[{room}] * history since the last message is lost; now at #{joined.offset}"
    return None


class Printer:
    """Prints what the client yields and remembers the last offset printed per room."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.printed: dict[str, int] = {}
        self.changed = asyncio.Event()

    def show(self, event: Event) -> None:
        if self.as_json:
            text: str | None = _json.encode(event).decode()
        else:
            text = line(event)
            if isinstance(event, ClientEvent):  # about the connection: not room content
                print(text, file=sys.stderr, flush=True)
                text = None
        if text is not None:
            print(text, flush=True)
        if isinstance(event, Chat):
            self.printed[event.room] = event.offset
            self.changed.set()

    async def run(self, client: Client) -> None:
        try:
            async for event in client:
                self.show(event)
        finally:
            self.changed.set()


async def _join(client: Client, room: str, history: int | None) -> None:
    joined = await client.join(room, history)
    print(
        f"roomcast: joined {room} at #{joined.offset} ({joined.online} online)",
        file=sys.stderr,
        flush=True,
    )


async def _listen(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        for room in args.rooms:
            await _join(client, room, args.history)
        await Printer(args.json).run(client)
    return 0


async def _send(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        await client.join(args.room)
        ack = await client.send(args.room, args.text)
        print(ack.offset)
        await client.leave(args.room)
    return 0


async def _stdin_lines() -> Callable[[], Awaitable[bytes]]:
    """`readline` of stdin on the event loop (pipes, terminals), else in a thread (files)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (ValueError, OSError):  # a regular file cannot be polled
        return lambda: asyncio.to_thread(sys.stdin.buffer.readline)
    return reader.readline


async def _chat(args: argparse.Namespace) -> int:
    room = args.room
    async with _client(args) as client:
        await _join(client, room, args.history)
        printer = Printer(args.json)
        printing = asyncio.create_task(printer.run(client))
        readline = await _stdin_lines()
        last = 0
        try:
            while True:
                reading = asyncio.ensure_future(readline())
                await asyncio.wait([reading, printing], return_when=asyncio.FIRST_COMPLETED)
                if printing.done():  # the connection ended for good
                    reading.cancel()
                    break
                typed = reading.result()
                if not typed:  # EOF, Ctrl-D
                    break
                text = typed.decode(errors="replace").rstrip("\r\n")
                if text.strip():
                    last = (await client.send(room, text)).offset
            # Show our own last line before leaving (its ack may come before the copy).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(ECHO_WAIT):
                    while printer.printed.get(room, 0) < last and not printing.done():
                        printer.changed.clear()
                        await printer.changed.wait()
            if not printing.done():
                await client.leave(room)
        finally:
            if printing.done():
                printing.result()  # a final error of the connection: raise it
            printing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printing
    return 0
