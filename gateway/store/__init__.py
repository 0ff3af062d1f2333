"""Durable stores behind one protocol: embedded SQLite (default) and PostgreSQL (several instances)."""

from core.settings import Settings
from gateway.store.base import (
    OutboxRow,
    OutboxStatus,
    QuarantineRecord,
    Store,
)


def build_store(settings: Settings, *, reads_only: bool = False) -> Store:
    """The configured store. ``reads_only`` (SQLite): no writer thread and no checkpointer, for the
    relay process, whose marks go through the gateway's writer; PostgreSQL has every instance write."""
    if settings.store.backend == "postgresql":
        from gateway.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]

        return PostgresStore(settings.store, settings.outbox)  # type: ignore[no-any-return,unused-ignore]
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(settings.store, settings.outbox, reads_only=reads_only)


__all__ = ["OutboxRow", "OutboxStatus", "QuarantineRecord", "Store", "build_store"]
