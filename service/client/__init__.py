"""The typed asyncio client: `from roomcast.client import Client`."""

from .client import Client
from .events import (
    ClientError,
    ClientEvent,
    Closed,
    ConnectionFailed,
    Disconnected,
    Event,
    Forbidden,
    InvalidRequest,
    InvalidRoom,
    NotJoined,
    RateLimited,
    Reconnected,
    RecoveryFailed,
    RequestTimeout,
    ServerFailed,
    TextTooLong,
    TooManyRooms,
    Unauthorized,
)
from .keepalive import TokenRefresh

__all__ = [
    "Client",
    "ClientError",
    "ClientEvent",
    "Closed",
    "ConnectionFailed",
    "Disconnected",
    "Event",
    "Forbidden",
    "InvalidRequest",
    "InvalidRoom",
    "NotJoined",
    "RateLimited",
    "Reconnected",
    "RecoveryFailed",
    "RequestTimeout",
    "ServerFailed",
    "TextTooLong",
    "TokenRefresh",
    "TooManyRooms",
    "Unauthorized",
]
