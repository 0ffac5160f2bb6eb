"""Prometheus metrics (prometheus-client): what the hub and the sockets count, and `/metrics`.

Every metric is defined once, at import, in prometheus-client's default
registry. Label values come from fixed sets (the protocol's request types,
its error codes), never from what a client sends.

Several workers (`roomcast serve --workers N`): each is its own process with
its own counters, so `serve` points `PROMETHEUS_MULTIPROC_DIR` at a fresh
directory before the workers start, and prometheus-client's multiprocess mode
has every worker write its values to files there. Whichever worker answers
`/metrics` merges the files of all of them: counters and the histogram are
summed, the gauges are summed over the workers still running (`livesum`).
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Final, get_args

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from ..protocol.codes import ErrorCode
from ..protocol.envelopes import ClientMessage

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# Decided by prometheus-client when it was imported: do this process's values
# live in files of the multiprocess directory?
MULTIPROCESS: Final[bool] = bool(getattr(values.ValueClass, "_multiprocess", False))
if MULTIPROCESS:
    # prometheus-client still accepts the old lower-case name.
    os.environ.setdefault(MULTIPROC_ENV, os.environ.get(MULTIPROC_ENV.lower(), ""))
    if os.environ[MULTIPROC_ENV]:  # the values' files are created below, with the metrics
        os.makedirs(os.environ[MULTIPROC_ENV], exist_ok=True)

# One local fan-out is a loop of non-blocking pushes: microseconds for a small
# room, milliseconds for thousands of members.
FANOUT_BUCKETS: Final = (
    1e-5,
    2.5e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
)


def _registered(name: str) -> object:
    """The collector already registered as `name`: the module was imported again
    (e.g. reloaded), and the default registry refuses a duplicate."""
    return getattr(REGISTRY, "_names_to_collectors", {}).get(name)


def _counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
    found = _registered(name)
    return found if isinstance(found, Counter) else Counter(name, doc, labels)


def _gauge(name: str, doc: str) -> Gauge:
    found = _registered(name)
    # livesum: with several workers, the sum over the workers still running.
    return found if isinstance(found, Gauge) else Gauge(name, doc, multiprocess_mode="livesum")


def _histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
    found = _registered(name)
    return found if isinstance(found, Histogram) else Histogram(name, doc, buckets=buckets)


CONNECTIONS = _gauge("roomcast_connections", "Open WebSocket connections.")
ROOMS = _gauge(
    "roomcast_rooms",
    "Rooms with local members (or a join in progress), once per worker that has some.",
)
USERS = _gauge("roomcast_users", "Distinct users with local connections, once per worker.")
SUBSCRIPTIONS = _gauge(
    "roomcast_subscriptions", "Rooms' broker channels this worker is subscribed to."
)
TASKS = _gauge(
    "roomcast_tasks",
    "Background tasks of the hub (gap fills, slow-consumer closes, cross-worker requests).",
)
HISTORY_BYTES = _gauge(
    "roomcast_history_memory_bytes",
    "Bytes the in-process history store (memory://) holds, estimated; at most HISTORY_MEMORY_MB.",
)
JOINS = _counter("roomcast_joins", "Joins that made a connection a member of a room.")
MESSAGES_IN = _counter(
    "roomcast_messages_in",
    "Frames received from clients and not refused by the rate limit, by request type "
    "(other: custom types, binary, oversized and undecodable frames).",
    ("type",),
)
PUBLISHED = _counter(
    "roomcast_messages_published",
    "Stored envelopes (chats, notifications) this server published to the broker.",
)
DELIVERIES = _counter("roomcast_deliveries", "Frames the fan-out handed to members' outboxes.")
SLOW_CONSUMERS = _counter(
    "roomcast_slow_consumers", "Connections closed with 4408: their outbox overflowed."
)
RATE_LIMITED = _counter("roomcast_rate_limited", "Frames refused by the rate limit (RATE_LIMIT).")
ERRORS = _counter("roomcast_errors", "Error envelopes sent, by error code.", ("code",))
FANOUT_SECONDS = _histogram(
    "roomcast_fanout_seconds",
    "Time of one local fan-out of a room's frame into its members' outboxes.",
    FANOUT_BUCKETS,
)
API_REQUESTS = _counter(
    "roomcast_api_requests",
    "HTTP API requests, by route (publish, notify, disconnect, history, presence, stats, "
    "rooms, other) and status.",
    ("route", "status"),
)
REFUSED = _counter(
    "roomcast_refused_connections",
    "Sockets refused or cut before they became a connection, by reason (see REFUSALS).",
    ("reason",),
)
BROKER_RECONNECTS = _counter(
    "roomcast_broker_reconnects", "Reconnections to the broadcast backend after losing it."
)
WRITES = _counter(
    "roomcast_writes",
    "Writes to clients, by path: fast (prepared frames, one write per connection per turn, "
    "straight to the server's transport) or asgi (one ASGI send per frame).",
    ("path",),
)
WRITES_FAST: Final = WRITES.labels("fast")
WRITES_ASGI: Final = WRITES.labels("asgi")

# Children bound once: a frame or an error costs one dict lookup and one inc.
# Every label value exists from the start, at zero.
_IN_BY_TYPE = {
    kind: MESSAGES_IN.labels(str(kind.__struct_config__.tag)) for kind in get_args(ClientMessage)
}
IN_OTHER: Final = MESSAGES_IN.labels("other")
_ERROR_BY_CODE: dict[str, Counter] = {code: ERRORS.labels(code.value) for code in ErrorCode}


# Why a socket did not become a connection: the WebSocket checks at connect time
# (MAX_CONNECTIONS, CONNECT_RATE, ALLOWED_ORIGINS, the token, the room), then what
# `roomcast serve` cuts before the app sees it (HANDSHAKE_TIMEOUT, the cap on sockets
# still handshaking).
REFUSALS: Final = (
    "max_connections",
    "connect_rate",
    "origin",
    "unauthorized",
    "forbidden",
    "invalid_room",
    "other",
    "handshake_timeout",
    "handshake_cap",
)
_REFUSED = {reason: REFUSED.labels(reason) for reason in REFUSALS}


def refused(reason: str) -> None:
    """Count one refused socket (`other` for a reason outside REFUSALS)."""
    _REFUSED.get(reason, _REFUSED["other"]).inc()


API_ROUTES: Final = ("publish", "notify", "disconnect", "history", "presence", "stats", "rooms")
API_STATUSES: Final = (200, 400, 401, 404, 405, 413, 422, 503)
_API = {
    (route, status): API_REQUESTS.labels(route, status)
    for route in (*API_ROUTES, "other")
    for status in (*map(str, API_STATUSES), "other")
}


def api_request(path: str, status: int) -> None:
    """Count one API answer (label values from fixed sets only)."""
    route = path.rsplit("/", 1)[-1]
    label = str(status) if status in API_STATUSES else "other"
    _API[route if route in API_ROUTES else "other", label].inc()


def received(kind: type) -> None:
    """Count one decoded frame: its protocol type, or `other`."""
    _IN_BY_TYPE.get(kind, IN_OTHER).inc()


def error_sent(code: ErrorCode | str) -> None:
    _ERROR_BY_CODE[code].inc()


# --- exposition ------------------------------------------------------------


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The body and content type of `/metrics` (Prometheus text, or OpenMetrics when asked)."""
    encoder, content_type = choose_encoder(accept or "")
    if not MULTIPROCESS:
        return encoder(REGISTRY), content_type
    path = os.environ[MULTIPROC_ENV]
    forget_dead_workers(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)  # type: ignore[no-untyped-call]
    return encoder(registry), content_type


def _pid_of(file: str) -> int | None:
    """The process of a multiprocess file, named like `counter_1234.db`."""
    pid = os.path.basename(file).rsplit("_", 1)[-1].removesuffix(".db")
    return int(pid) if pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, as another user
    return True


def forget_dead_workers(path: str) -> None:
    """Drop the live gauges of workers that are gone (crashed, or restarted by
    the server), so their connections are not counted forever; their counters
    stay in the totals."""
    for file in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        pid = _pid_of(file)
        if pid is not None and not _running(pid):
            with contextlib.suppress(FileNotFoundError):  # another scrape was first
                os.remove(file)


def clear_stale_files(path: str) -> None:
    """Remove what earlier runs left in a multiprocess directory; keep this process's files."""
    mine = os.getpid()
    for file in glob.glob(os.path.join(path, "*.db")):
        if _pid_of(file) != mine:
            with contextlib.suppress(FileNotFoundError):
                os.remove(file)
