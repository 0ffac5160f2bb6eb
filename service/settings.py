"""Settings: the one place that reads the environment.

Every variable of PROTOCOL.md's configuration table is a field here; a bad
value raises `SettingsError` naming the variable and why, before anything
starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse, urlsplit

from starlette.config import Config, EnvironError
from starlette.datastructures import CommaSeparatedStrings, Secret

from .backends.urls import POSTGRES, REDIS, safe_url
from .errors import SettingsError

BROADCAST_SCHEMES = ("memory", *REDIS, *POSTGRES, "kafka")
HISTORY_SCHEMES = ("memory", "sqlite", *REDIS, *POSTGRES)


@dataclass(frozen=True, slots=True)
class Settings:
    port: int = 8000
    broadcast_url: str = "memory://"
    history_url: str = ""  # resolved in __post_init__
    history_size: int = 1000
    history_ttl: int = 86400
    jwt_secret: Secret | None = None
    api_key: Secret | None = None
    allowed_origins: tuple[str, ...] = ()
    max_message_bytes: int = 65536
    max_text_chars: int = 4000
    max_name_chars: int = 32
    outbox_size: int = 256
    rate_limit: int = 20
    max_connections: int = 10000
    max_rooms: int = 64
    heartbeat_seconds: int = 25
    presence_events_max: int = 100
    presence_list_max: int = 100
    presence_ttl: int = 30
    ws_compression: str = "off"
    fast_writes: str = "auto"
    handshake_timeout: int = 10
    connect_rate: int = 20
    forwarded_allow_ips: str = "127.0.0.1"  # "*" when DYNO is set (from_environ)
    history_memory_mb: int = 64
    connect_hook_url: str = ""
    join_hook_url: str = ""
    chat_hook_url: str = ""
    hook_secret: Secret | None = None
    hook_timeout: int = 5

    def __post_init__(self) -> None:
        for name, low in _MINIMUMS.items():
            value = getattr(self, name)
            if value < low:
                raise SettingsError(
                    f"{name.upper()}={value} is invalid: it must be at least {low}."
                )
        if self.port > 65535:
            raise SettingsError(f"PORT={self.port} is invalid: it must be at most 65535.")
        _check_url("BROADCAST_URL", self.broadcast_url, BROADCAST_SCHEMES)
        if not self.history_url:
            scheme = urlparse(self.broadcast_url).scheme
            shared = scheme in (*REDIS, *POSTGRES)
            object.__setattr__(self, "history_url", self.broadcast_url if shared else "memory://")
        _check_url("HISTORY_URL", self.history_url, HISTORY_SCHEMES)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(
                    f"{name.upper()}={getattr(self, name)!r} is invalid: use one of "
                    f"{', '.join(allowed)}."
                )
        _check_secrets(self.jwt_secret, self.api_key)
        for origin in self.allowed_origins:
            _check_origin(origin)
        _check_forwarded(self.forwarded_allow_ips)
        if self.outbox_size >= self.history_size:
            raise SettingsError(
                f"OUTBOX_SIZE={self.outbox_size} is invalid: it must be below "
                f"HISTORY_SIZE={self.history_size}, so that a slow consumer closed with 4408 "
                "can recover what it missed."
            )
        _check_hooks(self)

    @property
    def shares_rooms_across_processes(self) -> bool:
        return urlparse(self.broadcast_url).scheme != "memory"

    @property
    def shares_history_across_processes(self) -> bool:
        return urlparse(self.history_url).scheme not in ("memory", "sqlite")

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Read every setting from `environ` (default: os.environ) and an optional .env."""
        env_path = env_file if env_file is not None and Path(env_file).is_file() else None
        config = Config(env_path, environ=dict(os.environ if environ is None else environ))
        values: dict[str, Any] = {}
        for field in fields(cls):
            var = field.name.upper()
            try:
                if field.name in _SECRETS:
                    raw = config(var, default=None)
                    values[field.name] = Secret(raw) if raw else None
                elif field.name == "allowed_origins":
                    raw = config(var, default="")
                    values[field.name] = tuple(o for o in CommaSeparatedStrings(raw) if o)
                elif field.name == "forwarded_allow_ips":
                    # On Heroku the router is the only way in: trust what it forwards.
                    default = "*" if config("DYNO", default="") else field.default
                    values[field.name] = config(var, cast=str, default=default)
                elif field.type == "int":
                    values[field.name] = config(var, cast=int, default=field.default)
                else:
                    values[field.name] = config(var, cast=str, default=field.default)
            except (ValueError, EnvironError) as exc:
                raw = config(var, default="")
                raise SettingsError(
                    f"{var}={raw!r} is invalid: expected {_describe(field.type)} ({exc})."
                ) from None
        return cls(**values)


_SECRETS = ("jwt_secret", "api_key", "hook_secret")
_CHOICES = {
    "ws_compression": ("off", "shared", "per-connection"),
    "fast_writes": ("auto", "off"),
}
_MINIMUMS = {
    "port": 0,
    "history_size": 1,
    "history_ttl": 1,
    "max_message_bytes": 256,
    "max_text_chars": 1,
    "max_name_chars": 1,
    "outbox_size": 1,
    "rate_limit": 1,
    "max_connections": 1,
    "max_rooms": 1,
    "heartbeat_seconds": 1,
    "presence_events_max": 0,
    "presence_list_max": 0,
    "presence_ttl": 1,
    "handshake_timeout": 1,
    "connect_rate": 0,
    "history_memory_mb": 1,
    "hook_timeout": 1,
}


MIN_JWT_SECRET_BYTES: Final = 32  # HS256: a key as long as the hash
MIN_API_KEY_CHARS: Final = 16
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def check_jwt_secret(secret: str, var: str = "JWT_SECRET") -> None:
    """Refuse an HS256 secret short enough to brute-force (never quoting it)."""
    size = len(secret.encode())
    if size < MIN_JWT_SECRET_BYTES:
        raise SettingsError(
            f"{var} is too short: {size} bytes, and HS256 needs at least "
            f"{MIN_JWT_SECRET_BYTES} (e.g. the output of `openssl rand -hex 32`)."
        )


def _check_secrets(jwt_secret: Secret | None, api_key: Secret | None) -> None:
    """Refuse keys short enough to guess or brute-force (never quoting them)."""
    if jwt_secret is not None:
        check_jwt_secret(str(jwt_secret))
    if api_key is not None and len(str(api_key)) < MIN_API_KEY_CHARS:
        raise SettingsError(
            f"API_KEY is too short: {len(str(api_key))} characters; use at least "
            f"{MIN_API_KEY_CHARS} random ones (e.g. the output of `openssl rand -hex 32`)."
        )


def _check_origin(origin: str) -> None:
    """An ALLOWED_ORIGINS entry is `*` or a bare origin, as browsers send it in `Origin`."""
    if origin == "*":
        return
    problem = bare_origin_problem(origin)
    if problem is not None:
        raise SettingsError(
            f"ALLOWED_ORIGINS entry {origin!r} is invalid: {problem}; give scheme://host[:port], "
            "e.g. https://chat.example.com."
        )


def bare_origin_problem(origin: str) -> str | None:
    """Why `origin` is not a bare `scheme://host[:port]`, or None when it is one."""
    scheme, sep, rest = origin.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return "it has no scheme"
    if not rest:
        return "it has no host"
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return "its port is not a number from 0 to 65535"
    if "@" in parts.netloc:
        return "it has user information (`user@`)"
    if parts.path == "/" and not (parts.query or parts.fragment):
        return "it ends in `/`, which makes it a path"
    if parts.path or parts.query or parts.fragment or origin.endswith(("?", "#")):
        return "it has a path, query or fragment"
    if not parts.hostname or (port is None and parts.netloc.endswith(":")):
        return "it has no host" if not parts.hostname else "its port is empty"
    return None


def _check_forwarded(value: str) -> None:
    """FORWARDED_ALLOW_IPS: `*`, or comma-separated IP addresses and networks (uvicorn's
    meaning; uvicorn would take anything else as a Unix socket's name)."""
    for entry in (e.strip() for e in value.split(",")):
        if entry == "*":
            continue
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise SettingsError(
                f"FORWARDED_ALLOW_IPS={value!r} is invalid: {entry!r} is not an IP address or "
                "network; give `*` or a comma-separated list such as 127.0.0.1,10.0.0.0/8."
            ) from None


def _describe(annotation: object) -> str:
    return "an integer" if annotation == "int" else "a string"


MIN_HOOK_SECRET_CHARS = 16


def _check_hooks(settings: Settings) -> None:
    """Each hook URL is http(s) with a host, and HOOK_SECRET signs their requests."""
    for var in ("CONNECT_HOOK_URL", "JOIN_HOOK_URL", "CHAT_HOOK_URL"):
        url = getattr(settings, var.lower())
        if not url:
            continue
        try:
            parts = urlparse(url)
            parts.port  # noqa: B018 - raises ValueError when the port is not a number
        except ValueError as exc:
            raise SettingsError(f"{var}={safe_url(url)!r} is invalid: {exc}.") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"{var}={safe_url(url)!r} is invalid: give an http:// or https:// URL with a "
                "host, e.g. https://app.example.com/roomcast/join."
            )
        if settings.hook_secret is None:
            raise SettingsError(
                f"HOOK_SECRET is required when {var} is set: every hook request is signed "
                "with it (HMAC-SHA256)."
            )
    secret = settings.hook_secret
    if secret is not None and len(str(secret)) < MIN_HOOK_SECRET_CHARS:
        raise SettingsError(
            f"HOOK_SECRET is too short: use at least {MIN_HOOK_SECRET_CHARS} random characters."
        )


def _check_url(var: str, url: str, schemes: tuple[str, ...]) -> None:
    scheme = urlparse(url).scheme
    if scheme not in schemes:
        raise SettingsError(
            f"{var}={safe_url(url)!r} is invalid: the scheme must be one of "
            f"{', '.join(s + '://' for s in schemes)}."
        )
    if scheme == "sqlite" and not urlparse(url).path.strip("/"):
        raise SettingsError(
            f"{var}={safe_url(url)!r} is invalid: give a file, e.g. sqlite:///roomcast.db."
        )
