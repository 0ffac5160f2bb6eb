"""roomcast: real-time WebSocket rooms for Starlette."""

from .app import Roomcast, create_app
from .envelopes import ClientEnvelope, Close, Envelope, ServerEnvelope
from .hub import Hub, HubError
from .settings import Settings, SettingsError
from .sockets import RoomSocket

__all__ = [
    "ClientEnvelope",
    "Close",
    "Envelope",
    "Hub",
    "HubError",
    "RoomSocket",
    "Roomcast",
    "ServerEnvelope",
    "Settings",
    "SettingsError",
    "create_app",
]
