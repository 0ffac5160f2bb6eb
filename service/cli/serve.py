"""`roomcast serve`: uvicorn configured from the settings, after checking them and the
backends they name."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from typing import Any, cast

from ..backends.broker.factory import open_broker
from ..backends.history.factory import open_store
from ..backends.urls import safe_url
from ..engine.wire import uvicorn_options
from ..errors import SettingsError
from ..observe.logs import FORMATS, log_config
from ..observe.metrics import MULTIPROC_ENV, clear_stale_files
from ..settings import Settings

log = logging.getLogger("roomcast")

# Heroku sends SIGKILL 30 s after SIGTERM; open sockets are closed with 1012
# at once, this bounds the wait for the rest.
GRACEFUL_SHUTDOWN_SECONDS = 10
PROBE_TIMEOUT = 10


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run the service under uvicorn")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 on Heroku)")
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: $WEB_CONCURRENCY; always 1 with memory://)",
    )
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--log-format",
        default=None,
        help="text or json (one JSON object per line; default: $LOG_FORMAT, else text)",
    )
    for field in fields(Settings):
        option = "--" + field.name.replace("_", "-")
        var = field.name.upper()
        kind = int if field.type == "int" else str
        serve.add_argument(option, type=kind, default=None, help=f"sets {var}")


def _settings_from(args: argparse.Namespace) -> Settings:
    """Options map 1:1 to the environment variables; the app reads those."""
    for field in fields(Settings):
        value = getattr(args, field.name, None)
        if value is not None:
            os.environ[field.name.upper()] = str(value)
    return Settings.from_environ()


def _workers(args: argparse.Namespace, settings: Settings) -> int:
    asked_env = os.environ.get("WEB_CONCURRENCY")
    source = "--workers" if args.workers is not None else "WEB_CONCURRENCY"
    raw = str(args.workers) if args.workers is not None else asked_env or "1"
    try:
        workers = int(raw)
    except ValueError:
        raise SettingsError(f"{source}={raw!r} is invalid: expected an integer.") from None
    if workers < 1:
        raise SettingsError(f"{source}={workers} is invalid: it must be at least 1.")
    if workers == 1:
        return 1
    if not settings.shares_rooms_across_processes:
        reason = (
            "BROADCAST_URL=memory:// keeps rooms inside one process: several workers "
            "would split every room"
        )
    elif not settings.shares_history_across_processes:
        reason = (
            f"HISTORY_URL={safe_url(settings.history_url)!r} is local to one process: "
            "several workers would hand out the same offsets"
        )
    else:
        return workers
    if args.workers is not None:
        raise SettingsError(f"--workers {workers} is refused: {reason}. Use one worker.")
    log.warning(
        "WEB_CONCURRENCY=%s asks for %d workers, but %s: running 1 worker.", raw, workers, reason
    )
    return 1


def _check_backends(settings: Settings) -> None:
    """Connect once here, in the parent: a bad URL or an unreachable broker stops
    start-up with the variable's name, instead of workers that die one by one
    behind a bound port."""
    store = open_store(
        settings.history_url,
        settings.history_size,
        settings.history_ttl,
        settings.history_memory_mb,
    )
    try:
        backend = open_broker(settings.broadcast_url)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None

    async def probe() -> None:
        for var, url, part in (
            ("HISTORY_URL", settings.history_url, store),
            ("BROADCAST_URL", settings.broadcast_url, backend),
        ):
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await part.connect()
                await part.disconnect()
            except Exception as exc:  # whatever the driver raises: say which setting
                raise SettingsError(
                    f"{var}={safe_url(url)!r} cannot be reached: {exc!r}."
                ) from None

    asyncio.run(probe())


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """prometheus-client's multiprocess mode for several workers: a fresh
    PROMETHEUS_MULTIPROC_DIR, set before uvicorn spawns them (they inherit it)
    and removed when they are done. A directory the operator chose is kept,
    less what earlier runs left in it."""
    given = os.environ.get(MULTIPROC_ENV)
    if given or workers == 1:  # one process: its own registry is the whole truth
        if given:
            clear_stale_files(given)
        yield
        return
    with tempfile.TemporaryDirectory(prefix="roomcast-metrics-") as fresh:
        os.environ[MULTIPROC_ENV] = fresh
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]


def _log_format(args: argparse.Namespace) -> str:
    source = "--log-format" if args.log_format is not None else "LOG_FORMAT"
    value = args.log_format or os.environ.get("LOG_FORMAT") or "text"
    if value not in FORMATS:
        raise SettingsError(f"{source}={value!r} is invalid: use one of {', '.join(FORMATS)}.")
    return value


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .handshakes import http_protocol

    settings = _settings_from(args)
    log_format = _log_format(args)
    workers = _workers(args, settings)
    _check_backends(settings)
    with _metrics_dir(workers):
        uvicorn.run(
            "roomcast.app:create_app",
            factory=True,
            # uvicorn applies its log config in every worker process; ours rides along.
            log_config=log_config(log_format),
            host=args.host,
            port=settings.port,
            workers=workers,
            log_level=args.log_level,
            ws_max_size=settings.max_message_bytes,
            **uvicorn_options(settings.ws_compression),
            ws_ping_interval=settings.heartbeat_seconds,
            ws_ping_timeout=settings.heartbeat_seconds,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
            # Not finishing a request in time, or handshaking past the worker's cap, closes
            # the socket: HANDSHAKE_TIMEOUT (see handshakes.py).
            http=cast(Any, http_protocol(settings.handshake_timeout, settings.max_connections)),
            proxy_headers=True,
            forwarded_allow_ips=settings.forwarded_allow_ips,
            server_header=False,
        )
    return 0
