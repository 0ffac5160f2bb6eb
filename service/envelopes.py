"""The envelopes, for application code: `from roomcast.envelopes import Chat, Notification`.

The same Structs as `roomcast.protocol.envelopes`, which the rest of roomcast imports.
"""

from .protocol.envelopes import (
    Ack,
    Chat,
    ClientEnvelope,
    Envelope,
    Error,
    GetPresence,
    Join,
    Joined,
    Leave,
    Left,
    Notification,
    Ping,
    Pong,
    Presence,
    Refresh,
    SendChat,
    ServerEnvelope,
    Since,
    System,
    User,
    Welcome,
)

__all__ = [
    "Ack",
    "Chat",
    "ClientEnvelope",
    "Envelope",
    "Error",
    "GetPresence",
    "Join",
    "Joined",
    "Leave",
    "Left",
    "Notification",
    "Ping",
    "Pong",
    "Presence",
    "Refresh",
    "SendChat",
    "ServerEnvelope",
    "Since",
    "System",
    "User",
    "Welcome",
]
