"""The presence store for a deployment: shared when the rooms are."""

from __future__ import annotations

from ..urls import POSTGRES, REDIS, scheme_of
from .base import PresenceStore


def open_presence(broadcast_url: str, history_url: str, ttl: float) -> PresenceStore:
    """Presence in Redis when several processes share rooms and a Redis is at hand
    (the broadcast backend or the history store), else in PostgreSQL when one is,
    else this process's."""
    if scheme_of(broadcast_url) != "memory":
        urls = (broadcast_url, history_url)
        for url in urls:
            if scheme_of(url) in REDIS:
                from .redis import RedisPresence

                return RedisPresence(url, ttl)
        for url in urls:
            if scheme_of(url) in POSTGRES:
                from .postgres import PostgresPresence

                return PostgresPresence(url, ttl)
    from .local import LocalPresence

    return LocalPresence()
