"""The client's requests in flight: each waits for the answer that echoes its `ref`,
and is sent again, in order, on every new connection until it has one."""

from __future__ import annotations

import asyncio
import uuid

from ..protocol.envelopes import ClientEnvelope, Error, ServerEnvelope
from .events import ClientError, error_of


class Requests:
    def __init__(self) -> None:
        self._inflight: dict[str, ClientEnvelope] = {}  # not answered yet, in order
        self._futures: dict[str, asyncio.Future[ServerEnvelope]] = {}
        self._sent_on: dict[str, int] = {}  # ref -> connection generation it was sent on
        self.resent = 0  # requests sent again on a new connection (same `ref`)

    def open(self, message: ClientEnvelope) -> tuple[str, asyncio.Future[ServerEnvelope]]:
        """Give `message` a fresh `ref`; the future resolves with its answer."""
        ref = message.ref = uuid.uuid4().hex
        future: asyncio.Future[ServerEnvelope] = asyncio.get_running_loop().create_future()
        self._futures[ref] = future
        self._inflight[ref] = message
        return ref, future

    def close(self, ref: str) -> None:
        """Forget the request `ref` (answered, failed or given up)."""
        self._futures.pop(ref, None)
        self._inflight.pop(ref, None)
        self._sent_on.pop(ref, None)

    def sent(self, message: ClientEnvelope, generation: int) -> None:
        if message.ref is not None:
            self._sent_on[message.ref] = generation

    def unsent(self, generation: int) -> list[ClientEnvelope]:
        """What is in flight and not yet sent on connection `generation`, in order."""
        return [m for r, m in self._inflight.items() if self._sent_on.get(r) != generation]

    @property
    def unanswered(self) -> int:
        """Requests sent on some connection that still wait for their answer."""
        return sum(1 for ref in self._inflight if ref in self._sent_on)

    def pending(self, message: ClientEnvelope) -> bool:
        """Whether `message` still waits for an answer (counting it as re-sent if it was
        sent before)."""
        ref = message.ref
        if ref not in self._inflight:
            return False
        self.resent += ref in self._sent_on
        return True

    def answer(self, ref: str | None, envelope: ServerEnvelope) -> bool:
        """Resolve the request `ref` answers; False when none waits for it."""
        future = self._futures.get(ref) if ref is not None else None
        if future is None or ref is None:
            return False
        if not future.done():
            if isinstance(envelope, Error):
                future.set_exception(error_of(envelope))
            else:
                future.set_result(envelope)
        self._inflight.pop(ref, None)
        return True

    def fail(self, error: ClientError) -> None:
        """End every request with `error`."""
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
        self._inflight.clear()
