"""Logging for `roomcast serve`: uvicorn's loggers and ours, as text or JSON lines.

No log line carries a token or an anonymous client's secret id (`?token=` and
`?client=` are redacted from every record), an API key, or what users wrote:
roomcast's own records name rooms, users and connections, never message text.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import unquote_plus

FORMATS: Final = ("text", "json")

# A query parameter of a logged path: `?token=…` and `?client=…` (whoever knows an
# anonymous user's `client` id connects as that user) must never reach a log.
_QUERY_PARAM = re.compile(r"([?&;])([^=&;\s\"#]+)=([^&;\s\"#]*)")
_SECRET_PARAMS: Final = frozenset({"token", "client"})
REDACTED = "[redacted]"

# Attributes every LogRecord has; anything else came in `extra=` and is logged as a field.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


def redact_tokens(text: str) -> str:
    """`text` with the value of every `token` and `client` query parameter replaced by
    [redacted]."""
    if "=" not in text:
        return text

    def hide(match: re.Match[str]) -> str:
        if unquote_plus(match.group(2)).lower() not in _SECRET_PARAMS:
            return match.group(0)
        return f"{match.group(1)}{match.group(2)}={REDACTED}"

    return _QUERY_PARAM.sub(hide, text)


class RedactTokens(logging.Filter):
    """Redacts `token=…` and `client=…` from a record's message and arguments.

    uvicorn logs the path with its query string: HTTP requests on
    `uvicorn.access`, WebSocket handshakes on `uvicorn.error`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {
                k: redact_tokens(v) if isinstance(v, str) else v for k, v in args.items()
            }
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's fields.

    uvicorn's access records become `client`, `method`, `path`, `status` too,
    so a log pipeline can filter on them without parsing the message.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            client, method, path, _, status = args
            entry.update(client=client, method=method, path=path, status=status)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def log_config(log_format: str = "text") -> dict[str, object]:
    """uvicorn's logging config, plus the roomcast logger, the token filter and,
    with `json`, one JSON object per line on every handler."""
    import uvicorn.config

    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    loggers: dict[str, Any] = config["loggers"]
    handlers: dict[str, Any] = config["handlers"]
    formatters: dict[str, Any] = config["formatters"]
    config["filters"] = {"redact_tokens": {"()": "roomcast.observe.logs.RedactTokens"}}
    # Not propagated: `main`'s basicConfig on the root logger would print each line twice.
    loggers["roomcast"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # On the loggers that print paths, and on the handlers for any other record.
    for name in ("uvicorn.access", "uvicorn.error"):
        loggers[name] = {**loggers.get(name, {}), "filters": ["redact_tokens"]}
    for handler in handlers.values():
        handler["filters"] = ["redact_tokens"]
    if log_format == "json":
        formatters["json"] = {"()": "roomcast.observe.logs.JsonFormatter"}
        for handler in handlers.values():
            handler["formatter"] = "json"
    return config
