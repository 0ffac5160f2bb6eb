"""roomcast: real-time WebSocket rooms for Starlette.

The source folder is `service/`; the package is installed and imported as `roomcast`.
"""

if __name__ != "roomcast":  # loaded twice under two names, the metrics would register twice
    raise ImportError(f"import roomcast, not {__name__}: service/ is roomcast's source folder")

from .app import Roomcast, create_app
from .errors import ProtocolError, Refuse, RoomcastError, SettingsError
from .protocol.codes import Close, ErrorCode
from .protocol.envelopes import ClientEnvelope, Envelope, ServerEnvelope, User
from .settings import Settings
from .web.sockets import RoomSocket

__all__ = [
    "ClientEnvelope",
    "Close",
    "Envelope",
    "ErrorCode",
    "ProtocolError",
    "Refuse",
    "RoomSocket",
    "Roomcast",
    "RoomcastError",
    "ServerEnvelope",
    "Settings",
    "SettingsError",
    "User",
    "create_app",
]
