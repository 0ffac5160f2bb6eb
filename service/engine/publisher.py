"""Stored publishing: a chat or a room notification gets the room's next offset from the
history store, is encoded once, and is published once on the room's channel. Ephemeral
envelopes skip the store; what goes to one user's connections takes the control channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from ..backends.history.base import Appended, HistoryStore
from ..errors import ProtocolError
from ..observe import metrics
from ..protocol.codec import encode
from ..protocol.codes import Close, ErrorCode
from ..protocol.envelopes import Chat, Envelope, Error, Level, Notification, User, now
from .control import Control, UserDelivery
from .transport import Transport, room_channel

# Bytes an envelope may grow by once its real epoch (<= 32) and offset (<= 16 digits) are in.
POSITION_SLACK: Final = 48
_DISCONNECTED: Final = (
    "The application ended this user's connections: get a new token before reconnecting."
)


class Publisher:
    def __init__(self, store: HistoryStore, transport: Transport, control: Control) -> None:
        self.store = store
        self.transport = transport
        self.control = control

    async def _store_and_publish(
        self, room: str, build: Callable[[str, int], Envelope], dedupe: str | None
    ) -> Appended:
        limit = self.transport.max_payload

        def encoded(epoch: str, offset: int) -> str:
            text = encode(build(epoch, offset))
            # Refused before it is stored: the broker could not carry it (Postgres
            # NOTIFY). Every store builds before taking the offset, so none is lost.
            # The slack covers any epoch and offset (the Redis store builds with
            # short placeholders for them).
            size = len(text.encode()) + POSITION_SLACK
            if limit is not None and size > limit:
                raise ProtocolError(
                    "text_too_long",
                    f"This message would be an envelope of up to {size} bytes; "
                    f"BROADCAST_URL's broker carries at most {limit} bytes.",
                )
            return text

        appended = await self.store.append(room, encoded, dedupe)
        if not appended.duplicate:
            await self.transport.publish(room_channel(room), appended.data)
            metrics.PUBLISHED.inc()
        return appended

    async def chat(self, user: User, room: str, text: str, ref: str | None = None) -> Appended:
        """Store and deliver a chat; a repeated `ref` of the same user returns the first."""
        return await self._store_and_publish(
            room,
            lambda epoch, offset: Chat(room, epoch, offset, user, text, now()),
            None if ref is None else f"{user.id}\x00{ref}",
        )

    async def publish(
        self,
        room: str,
        *,
        title: str,
        body: str,
        level: Level = "info",
        data: Any = None,
        ref: str | None = None,
    ) -> Appended:
        """Store a notification in `room` and deliver it to every member, on every worker."""
        return await self._store_and_publish(
            room,
            lambda epoch, offset: _notification(room, epoch, offset, title, body, level, data),
            None if ref is None else f"\x00api\x00{ref}",
        )

    async def broadcast(self, room: str, envelope: Envelope) -> None:
        """Deliver an ephemeral envelope (not stored, no offset) to the room's members."""
        await self.transport.publish(room_channel(room), encode(envelope))

    async def notify_user(
        self,
        user_id: str,
        *,
        title: str,
        body: str,
        level: Level = "info",
        data: Any = None,
    ) -> int:
        """Send a notification to every connection of one user, on every worker;
        how many connections it reached."""
        frame = encode(_notification(None, None, None, title, body, level, data))
        return await self.control.count(UserDelivery(user_id, frame=frame))

    async def disconnect_user(self, user_id: str, code: int = Close.UNAUTHORIZED) -> int:
        """Close every connection of one user, on every worker; how many there were.
        Each gets an `error` saying why first (a browser sees no close reason)."""
        frame = (
            encode(Error(ErrorCode.UNAUTHORIZED, _DISCONNECTED))
            if code == Close.UNAUTHORIZED
            else None
        )
        return await self.control.count(UserDelivery(user_id, frame=frame, close=code))


def _notification(
    room: str | None,
    epoch: str | None,
    offset: int | None,
    title: str,
    body: str,
    level: Level,
    data: Any,
) -> Notification:
    """A notification for a room (stored, with its position) or for one user (not stored)."""
    return Notification(
        room=room,
        epoch=epoch,
        offset=offset,
        title=title,
        body=body,
        level=level,
        data=data,
        ts=now(),
    )
