"""`roomcast` commands: serve, schema and token here; the HTTP API's publish, notify and
disconnect (`api`); the client's listen, send and chat (`client`)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import SettingsError
from ..settings import check_jwt_secret
from . import api, client, serve
from .exit_codes import BROKEN_PIPE


def print_schema(args: argparse.Namespace) -> int:
    from ..protocol.schema import schema

    json.dump(schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _token_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser(
        "token",
        help="mint an HS256 token for JWT_SECRET (for testing, or as a backend would)",
        description="Print an HS256 token that this server accepts when JWT_SECRET is set.",
    )
    token.add_argument("--sub", required=True, help="the user's id (`sub`)")
    token.add_argument("--name", default=None, help="the user's display name (`name`)")
    token.add_argument(
        "--rooms",
        default=None,
        help="comma-separated room names or * patterns the token permits, e.g. 'lobby,team-*' "
        "(default: every room)",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until `exp` (default 3600)")
    token.add_argument("--secret", default=None, help="the HS256 secret (default: $JWT_SECRET)")
    token.set_defaults(run=print_token)


def print_token(args: argparse.Namespace) -> int:
    from ..web.auth import PATTERN_RULE, is_room_pattern, mint_token

    secret = args.secret
    if secret is None:
        from starlette.config import Config

        env_file = ".env" if Path(".env").is_file() else None
        secret = Config(env_file)("JWT_SECRET", default=None)
    if not secret:
        raise SettingsError("no secret: set JWT_SECRET or pass --secret.")
    check_jwt_secret(secret, "--secret" if args.secret is not None else "JWT_SECRET")
    if not args.sub.strip():
        raise SettingsError("--sub must not be blank.")
    if args.ttl < 1:
        raise SettingsError(f"--ttl {args.ttl} is invalid: it must be at least 1 second.")
    rooms: list[str] | None = None
    if args.rooms is not None:
        rooms = [r.strip() for r in args.rooms.split(",") if r.strip()]
        bad = [r for r in rooms if not is_room_pattern(r)]
        if bad:
            raise SettingsError(f"--rooms {bad[0]!r} is invalid: give {PATTERN_RULE}.")
    print(mint_token(secret, args.sub, name=args.name, rooms=rooms, ttl=args.ttl))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="roomcast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    sub.add_parser("schema", help="print the JSON Schema of every envelope").set_defaults(
        run=print_schema
    )
    sub.choices["serve"].set_defaults(run=serve.serve)
    _token_parser(sub)
    api.register(sub)
    client.register(sub)
    try:
        args = parser.parse_args(argv)  # --help writes too
        code = int(args.run(args))
        sys.stdout.flush()  # a closed reader shows here, while we can still catch it
    except SettingsError as exc:
        print(f"roomcast: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """The reader of our output went away (`roomcast schema | head`): exit quietly,
    as a command killed by SIGPIPE would, without a traceback."""
    # Python flushes stdout again at exit, which would fail and complain the same way.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
