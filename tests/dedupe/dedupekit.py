"""A real :class:`dedupe.tx.Tx` for engine tests: the SQLite store's Tx on a migrated in-memory database."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime

from core.events import Event
from core.model import CanonicalMessage, Identity
from dedupe.policy import PlacementPolicy
from gateway.store.sqlite import MIGRATIONS, SQLiteTx

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
POLICY = PlacementPolicy(window=3600, ticket_ref_pattern=r"\[#TG-(?P<number>\d+)\]")


def memory_tx() -> Iterator[tuple[SQLiteTx, sqlite3.Connection]]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for migration in MIGRATIONS:
        conn.executescript(migration)
    conn.execute("BEGIN")
    try:
        yield SQLiteTx(conn), conn
    finally:
        conn.close()


def msg(
    external_id: str,
    *identities: Identity,
    name: str | None = None,
    inbox: str = "support",
    channel: str = "email",
    tenant: str = "acme",
    subject: str | None = None,
    text: str | None = None,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    thread_ref: str | None = None,
    auto_generated: str | None = None,
    received_at: datetime = T0,
) -> CanonicalMessage:
    return CanonicalMessage(
        channel=channel,
        tenant=tenant,
        inbox=inbox,
        external_id=external_id,
        received_at=received_at,
        identities=identities,
        display_name=name,
        subject=subject if subject is not None else f"subject of {external_id}",
        text=text,
        in_reply_to=in_reply_to,
        references=references,
        thread_ref=thread_ref,
        auto_generated=auto_generated,
    )


def types(events: tuple[Event, ...] | list[Event]) -> list[str]:
    return [e.type for e in events]
