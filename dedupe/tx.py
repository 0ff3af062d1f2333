"""The small synchronous transaction the placement engine runs against.

A store implements :class:`Tx` on top of one open database transaction (SQLite savepoint,
PostgreSQL transaction); the engine never commits, so a failure anywhere leaves nothing behind.
Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from gateway.model import Identity, Placement


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredIdentity:
    kind: str
    value: str
    customer_id: str
    verified: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerRecord:
    id: str
    tenant: str
    display_name: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadRecord:
    id: str
    tenant: str
    inbox: str
    customer_id: str
    subject: str | None
    number: int
    last_activity: datetime
    open: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageRecord:
    message_id: str
    thread_id: str
    customer_id: str
    sequence: int
    channel: str
    external_id: str | None
    # The RFC 5322 Message-ID of an email, so later replies can be threaded by In-Reply-To.
    rfc822_message_id: str | None
    received_at: datetime


class Tx(Protocol):
    """Reads and writes inside one open transaction."""

    def claim_key(self, key: str, message_id: str, now: datetime) -> Placement | None:
        """Atomically claim an idempotency key (insert-if-absent).

        ``None`` when this call claimed it; otherwise the first placement, with ``duplicate=True``.
        """
        ...

    def complete_claim(self, key: str, placement: Placement) -> None:
        """Record where the message of a key claimed in this transaction went."""
        ...

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        """The stored identities among ``identities``, in the order given."""
        ...

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None: ...

    def get_customer(self, customer_id: str) -> CustomerRecord: ...

    def set_display_name(self, customer_id: str, display_name: str) -> None: ...

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None: ...

    def mark_verified(self, tenant: str, identity: Identity) -> None: ...

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]: ...

    def find_open_thread(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> ThreadRecord | None:
        """The most recently active open thread of the customer in tenant+inbox, if any is recent."""
        ...

    def next_thread_number(self, tenant: str) -> int:
        """The next per-tenant thread number (1, 2, 3, ... without reuse)."""
        ...

    def create_thread(self, thread: ThreadRecord) -> None:
        """Insert an open thread whose first sequence number will be 1."""
        ...

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        """Take the thread's next sequence number (no gaps) and set its last activity to ``now``."""
        ...

    def add_message(self, message: MessageRecord) -> None: ...
