"""The broker `BROADCAST_URL` names, its driver imported only when used."""

from __future__ import annotations

from ..urls import POSTGRES, REDIS, missing_driver, safe_url, scheme_of
from .base import Broker


def open_broker(url: str) -> Broker:
    """The broker for `url`; nothing connects yet (`connect()` does, in the lifespan)."""
    scheme = scheme_of(url)
    try:
        if scheme == "memory":
            from .memory import MemoryBroker

            return MemoryBroker(url)
        if scheme in REDIS:
            from .redis import RedisBroker

            return RedisBroker(url)
        if scheme in POSTGRES:
            from .postgres import PostgresBroker

            return PostgresBroker(url)
        if scheme == "kafka":
            from .kafka import KafkaBroker

            return KafkaBroker(url)
    except ImportError as exc:
        driver, extra = {"redis": ("redis", "redis"), "kafka": ("aiokafka", "kafka")}.get(
            scheme, ("asyncpg", "postgres")
        )
        raise missing_driver("BROADCAST_URL", url, driver, extra, exc) from None
    raise ValueError(
        f"BROADCAST_URL={safe_url(url)!r}: this backend is not available in this version"
    )
