"""The desk's data and rules, without I/O: accounts, tickets, who may join what, links.

A real app keeps accounts and tickets in its database; this one keeps a small table.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Final, Literal

Role = Literal["customer", "agent"]
ITERATIONS: Final = 100_000
LINK: Final = re.compile(r"(?i)\b(?:https?://|www\.)\S+")


@dataclass(frozen=True)
class Account:
    username: str
    name: str
    role: Role
    password_hash: str  # PBKDF2-SHA256 of the password, salted with "salt-<username>"

    def check(self, password: str) -> bool:
        salt = f"salt-{self.username}".encode()
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, ITERATIONS).hex()
        return hmac.compare_digest(digest, self.password_hash)


# The demo's accounts: the password of each is "<username>-demo".
ACCOUNTS: Final = {
    a.username: a
    for a in (
        Account(
            "alice",
            "Alice",
            "customer",
            "ba3fd89d70571aeb6ade96ed794e46abc5593723d9f74409cabd4523d7ed94bc",
        ),
        Account(
            "bob",
            "Bob",
            "customer",
            "60b088b17605566b2d99cfdc4fa731c310ef39c0ee3a10de69c1c1758dabdf0d",
        ),
        Account(
            "carol",
            "Carol",
            "agent",
            "3d655748a9e1b702e927d40a93de3c68845461b9d03dad99fb7d5890bd59b82f",
        ),
        Account(
            "dave",
            "Dave",
            "agent",
            "42bf556390433cdc1eb70ac9aeebc42958c32335e45f946819ff173aade815e4",
        ),
    )
}


def strip_links(text: str) -> str:
    """Customers' messages lose their links (phishing, spam): each becomes a marker."""
    return LINK.sub("[link removed]", text)


@dataclass
class Desk:
    """The tickets (room name -> the customer who opened it) and who has written where."""

    tickets: dict[str, str] = field(
        default_factory=lambda: {"ticket-1": "alice", "ticket-2": "bob"}
    )
    _written: set[tuple[str, str]] = field(default_factory=set)

    def login(self, username: str, password: str) -> Account | None:
        account = ACCOUNTS.get(username)
        return account if account is not None and account.check(password) else None

    def account(self, username: object) -> Account | None:
        return ACCOUNTS.get(username) if isinstance(username, str) else None

    def agents(self) -> list[Account]:
        return [a for a in ACCOUNTS.values() if a.role == "agent"]

    def tickets_of(self, account: Account) -> list[str]:
        """The tickets an account sees: its own, or every one for an agent."""
        return sorted(
            room
            for room, owner in self.tickets.items()
            if account.role == "agent" or owner == account.username
        )

    def may_join(self, account: Account, room: str) -> bool:
        """Agents may join any ticket; customers only their own."""
        if account.role == "agent":
            return room in self.tickets
        return self.tickets.get(room) == account.username

    def open_ticket(self, account: Account) -> str:
        room = f"ticket-{len(self.tickets) + 1}"
        self.tickets[room] = account.username
        return room

    def first_message(self, account: Account, room: str) -> bool:
        """True the first time this customer writes in this ticket."""
        key = (account.username, room)
        if key in self._written:
            return False
        self._written.add(key)
        return True
