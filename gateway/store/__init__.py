"""Durable stores behind one protocol: embedded SQLite (default) and PostgreSQL (several instances)."""

from gateway.store.base import (
    OutboxRow,
    OutboxStatus,
    PlacementPolicy,
    QuarantineRecord,
    Store,
)

__all__ = ["OutboxRow", "OutboxStatus", "PlacementPolicy", "QuarantineRecord", "Store"]
