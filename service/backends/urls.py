"""URL helpers shared by every backend: schemes, `?prefix=`, passwords, missing drivers."""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlparse, urlsplit, urlunsplit

from ..errors import SettingsError

REDIS: Final = ("redis", "rediss")
POSTGRES: Final = ("postgres", "postgresql")

_PREFIX = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def scheme_of(url: str) -> str:
    return urlparse(url).scheme


def split_prefix(url: str, var: str, max_chars: int = 64) -> tuple[str, str]:
    """(the URL for the driver, the key or table prefix from `?prefix=`, default `roomcast`)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "roomcast")
    if not _PREFIX.fullmatch(prefix) or len(prefix) > max_chars:
        raise SettingsError(
            f"{var}={safe_url(url)!r} is invalid: prefix must be 1-{max_chars} of "
            "A-Z a-z 0-9 _ - . :"
        )
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix


def safe_url(url: str) -> str:
    """The URL for messages and logs: its password (Heroku's broker URLs carry one) hidden."""
    parts = urlparse(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def missing_driver(
    var: str, url: str, driver: str, extra: str, exc: ImportError
) -> SettingsError | ImportError:
    """What to raise when importing a backend failed: a SettingsError naming the extra to
    install when its driver is missing, else the ImportError itself (a bug to see as it is)."""
    if (exc.name or "").partition(".")[0] != driver:
        return exc
    return SettingsError(
        f"{var}={safe_url(url)!r} needs a driver that is not installed ({exc}): "
        f"pip install 'roomcast[{extra}]'."
    )
