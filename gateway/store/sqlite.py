"""The embedded store: one SQLite database (WAL, ``synchronous=FULL``) plus a blob directory.

The event loop never touches the disk. One writer thread owns the write connection and runs
queued jobs; the jobs that queued up while the previous commit was syncing are committed together
(one transaction, one fsync), each inside its own SAVEPOINT so one failing job does not take its
batch siblings down. Results travel back to the awaiting coroutines through
``loop.call_soon_threadsafe``. Reads run on a separate connection in one reader thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson

from core.errors import BacklogFull, StoreError
from core.events import Event, message_quarantined
from core.media import MediaFetch
from core.model import CanonicalMessage, Identity, Placement, RawEnvelope
from core.settings import OutboxSettings, StoreSettings
from dedupe.engine import new_id, place
from dedupe.policy import PlacementPolicy
from dedupe.tx import (
    RECENT_TEXTS_KEPT,
    ClaimedLink,
    CustomerRecord,
    MergeRecord,
    MessageRecord,
    RecentText,
    StoredIdentity,
    ThreadRecord,
    TxWork,
)
from gateway.store.base import (
    EventBuilder,
    OutboxRow,
    OutboxStatus,
    QuarantineRecord,
)
from gateway.store.blobs import BlobDir, is_sha256, parse_raw_ref, raw_ref, sha256_hex

logger = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], datetime]
# A write job runs on the writer thread inside its own savepoint and returns its value plus the
# change it makes to the number of unpublished outbox rows.
WriteJob = Callable[[sqlite3.Connection], tuple[T, int]]

_DISK_CHECK_INTERVAL = 1.0  # seconds a free-space reading is trusted
# Seconds between passive WAL checkpoints. Each ends with an fsync of the database file, and on
# ext4 a commit's fsync of the WAL can wait behind it: the more the checkpoint copied, the longer.
# Every 1 s, under 1,000 messages/s, those waits (20-30 ms) were the ack latency's p99; every
# 0.25 s they stay under ~15 ms. An idle WAL makes a checkpoint a no-op.
_CHECKPOINT_INTERVAL = 0.25
_WAL_AUTOCHECKPOINT_PAGES = 16_384
# The writer's page cache: with SQLite's default (2 MiB) every placement re-reads index pages of
# idempotency keys, messages and the outbox once the database outgrows it. Readers keep the default.
_WRITER_CACHE_KIB = 32 * 1024
_GROUP_WAIT_LIMIT = 10.0  # seconds gather_next_batch waits at most, so a test bug cannot hang the writer

# Ordered migrations; ``PRAGMA user_version`` is the number applied. Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        message_id TEXT NOT NULL,
        thread_id TEXT,
        customer_id TEXT,
        sequence INTEGER,
        is_new_thread INTEGER,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

    CREATE TABLE customers (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        display_name TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE identities (
        tenant TEXT NOT NULL,
        kind TEXT NOT NULL,
        value TEXT NOT NULL,
        customer_id TEXT NOT NULL REFERENCES customers (id),
        verified INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, kind, value)
    );
    CREATE INDEX identities_customer ON identities (customer_id);

    CREATE TABLE tenant_counters (
        tenant TEXT PRIMARY KEY,
        next_thread_number INTEGER NOT NULL
    );
    CREATE TABLE threads (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        inbox TEXT NOT NULL,
        customer_id TEXT NOT NULL REFERENCES customers (id),
        subject TEXT,
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
        number INTEGER NOT NULL,
        last_activity INTEGER NOT NULL,
        next_sequence INTEGER NOT NULL DEFAULT 1,
        created_at INTEGER NOT NULL,
        UNIQUE (tenant, number)
    );
    CREATE INDEX threads_open_by_customer ON threads (customer_id, tenant, inbox, last_activity)
        WHERE status = 'open';

    CREATE TABLE messages (
        message_id TEXT PRIMARY KEY,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        customer_id TEXT NOT NULL REFERENCES customers (id),
        sequence INTEGER NOT NULL,
        channel TEXT NOT NULL,
        external_id TEXT,
        rfc822_message_id TEXT,
        received_at INTEGER NOT NULL,
        UNIQUE (thread_id, sequence)
    );
    CREATE INDEX messages_rfc822 ON messages (rfc822_message_id) WHERE rfc822_message_id IS NOT NULL;

    CREATE TABLE outbox (
        position INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL UNIQUE,
        type TEXT NOT NULL,
        routing_key TEXT NOT NULL,
        tenant TEXT NOT NULL,
        channel TEXT NOT NULL,
        thread_id TEXT,
        sequence INTEGER,
        body BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        published_at INTEGER
    );
    CREATE INDEX outbox_unpublished ON outbox (position) WHERE published_at IS NULL;

    CREATE TABLE raw_archive (
        sha256 TEXT PRIMARY KEY,
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE blob_files (
        sha256 TEXT PRIMARY KEY,
        size INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );

    CREATE TABLE quarantine (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        channel TEXT NOT NULL,
        inbox TEXT NOT NULL,
        reason TEXT NOT NULL,
        raw_ref TEXT NOT NULL,
        size INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        content_type TEXT,
        headers TEXT NOT NULL,
        meta TEXT NOT NULL,
        signature_verified INTEGER NOT NULL,
        retry INTEGER NOT NULL,
        remote TEXT,
        created_at INTEGER NOT NULL,
        replayed_at INTEGER,
        replay_result TEXT
    );
    CREATE INDEX quarantine_created ON quarantine (created_at);

    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    """,
    # 2: small durable connector state (IMAP watermarks, pull cursors).
    """
    CREATE TABLE state (
        key TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
    # 3: media announced by committed messages (WeChat media_id), fetched after the answer.
    """
    CREATE TABLE media (
        key TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        inbox TEXT NOT NULL,
        account TEXT NOT NULL,
        ref TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER,
        sha256 TEXT,
        size INTEGER,
        content_type TEXT,
        name TEXT,
        error TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX media_due ON media (channel, next_attempt_at) WHERE state = 'pending';
    """,
    # 4: identity graph (merges, claimed links), thread references and merges, duplicate touchpoints.
    """
    ALTER TABLE customers ADD COLUMN merged_into TEXT;
    ALTER TABLE threads ADD COLUMN merged_into TEXT;
    ALTER TABLE threads ADD COLUMN previous_id TEXT;
    CREATE INDEX threads_customer ON threads (customer_id);
    CREATE INDEX threads_previous ON threads (previous_id) WHERE previous_id IS NOT NULL;

    CREATE TABLE thread_keys (
        tenant TEXT NOT NULL,
        channel TEXT NOT NULL,
        inbox TEXT NOT NULL,
        key TEXT NOT NULL,
        thread_id TEXT NOT NULL REFERENCES threads (id),
        created_at INTEGER NOT NULL,
        PRIMARY KEY (tenant, channel, inbox, key)
    ) WITHOUT ROWID;

    CREATE TABLE merges (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        surviving_customer TEXT NOT NULL,
        merged_customers TEXT NOT NULL,
        identities TEXT NOT NULL,
        threads TEXT NOT NULL,
        evidence TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        undone_at INTEGER
    );
    CREATE TABLE merge_members (
        customer_id TEXT NOT NULL,
        merge_id TEXT NOT NULL REFERENCES merges (id),
        PRIMARY KEY (customer_id, merge_id)
    ) WITHOUT ROWID;

    CREATE TABLE claimed_links (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        other_customer_id TEXT NOT NULL,
        identities TEXT NOT NULL,
        message_id TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX claimed_links_customer ON claimed_links (customer_id);
    CREATE INDEX claimed_links_other ON claimed_links (other_customer_id);

    -- Normalised texts of each customer's last messages, only as far back as the duplicate window.
    CREATE TABLE recent_texts (
        customer_id TEXT NOT NULL,
        at INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (customer_id, at, message_id)
    ) WITHOUT ROWID;
    """,
    # 5: a provider's exact retry answers the whole first placement (as the PostgreSQL store does).
    """
    ALTER TABLE idempotency_keys ADD COLUMN duplicate_of TEXT;
    ALTER TABLE idempotency_keys ADD COLUMN previous_thread_id TEXT;
    """,
    # 6: recent texts are capped per customer and channel (Tx.add_recent_text); this finds the cap.
    """
    CREATE INDEX recent_texts_by_channel ON recent_texts (customer_id, channel, at);
    """,
    # 7: recent texts past the duplicate window are swept by age (Store.purge_recent_texts).
    """
    CREATE INDEX recent_texts_by_age ON recent_texts (at);
    """,
)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _us(moment: datetime) -> int:
    """Microseconds since the epoch; naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _MICROSECOND


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class StoreStats:
    """Counters of the writer thread, for metrics and to show group commit at work."""

    commits: int = 0
    jobs: int = 0
    failed_jobs: int = 0
    failed_commits: int = 0
    largest_batch: int = 0


@dataclass(slots=True)
class _Job:
    fn: WriteJob[Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_THREAD_COLUMNS = (
    "id, tenant, inbox, customer_id, subject, number, last_activity, status, merged_into, previous_id"
)


def _thread(row: Sequence[Any]) -> ThreadRecord:
    return ThreadRecord(
        id=row[0],
        tenant=row[1],
        inbox=row[2],
        customer_id=row[3],
        subject=row[4],
        number=row[5],
        last_activity=_dt(row[6]),
        open=row[7] == "open",
        merged_into=row[8],
        previous_id=row[9],
    )


def _identities_json(identities: Sequence[tuple[str, Identity]]) -> str:
    return orjson.dumps([[origin, i.kind, i.value, i.verified] for origin, i in identities]).decode()


def _merge(row: Sequence[Any]) -> MergeRecord:
    return MergeRecord(
        id=row[0],
        tenant=row[1],
        surviving_customer=row[2],
        merged_customers=tuple(orjson.loads(row[3])),
        identities=tuple(
            (origin, Identity(kind=kind, value=value, verified=bool(verified)))
            for origin, kind, value, verified in orjson.loads(row[4])
        ),
        threads=tuple((origin, thread) for origin, thread in orjson.loads(row[5])),
        evidence=orjson.loads(row[6]),
        created_at=_dt(row[7]),
        undone_at=_dt(row[8]) if row[8] is not None else None,
    )


_MERGE_COLUMNS = (
    "id, tenant, surviving_customer, merged_customers, identities, threads, evidence, created_at, undone_at"
)


class SQLiteTx:
    """:class:`dedupe.tx.Tx` over the writer connection, inside the current savepoint.

    The one writer thread serializes every transaction, so the lock methods have nothing to do.
    """

    serialized = True

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def claim_key(self, key: str, message_id: str, now: datetime) -> Placement | None:
        cur = self._conn.execute(
            "INSERT INTO idempotency_keys (key, message_id, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (key) DO NOTHING",
            (key, message_id, _us(now)),
        )
        if cur.rowcount == 1:
            return None
        row = self._conn.execute(
            "SELECT message_id, thread_id, customer_id, sequence, is_new_thread, duplicate_of,"
            " previous_thread_id FROM idempotency_keys WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None or row[1] is None:
            # Claimed but never completed: only possible if a caller broke the engine's order.
            raise StoreError(f"idempotency key claimed without a placement: {key!r}")
        return Placement(
            message_id=row[0],
            thread_id=row[1],
            customer_id=row[2],
            sequence=row[3],
            is_new_thread=bool(row[4]),
            duplicate=True,
            duplicate_of=row[5],
            previous_thread_id=row[6],
        )

    def complete_claim(self, key: str, placement: Placement) -> None:
        self._conn.execute(
            "UPDATE idempotency_keys SET thread_id = ?, customer_id = ?, sequence = ?, is_new_thread = ?,"
            " duplicate_of = ?, previous_thread_id = ? WHERE key = ?",
            (
                placement.thread_id,
                placement.customer_id,
                placement.sequence,
                placement.is_new_thread,
                placement.duplicate_of,
                placement.previous_thread_id,
                key,
            ),
        )

    def lock_identities(self, tenant: str, keys: Sequence[tuple[str, str]]) -> None:
        """Nothing to do: the writer thread runs one transaction at a time."""

    def lock_customers(self, customer_ids: Sequence[str]) -> None:
        """Nothing to do: the writer thread runs one transaction at a time."""

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        found: list[StoredIdentity] = []
        for identity in identities:
            row = self._conn.execute(
                "SELECT customer_id, verified FROM identities WHERE tenant = ? AND kind = ? AND value = ?",
                (tenant, identity.kind, identity.value),
            ).fetchone()
            if row is not None:
                found.append(
                    StoredIdentity(
                        kind=identity.kind, value=identity.value, customer_id=row[0], verified=bool(row[1])
                    )
                )
        return found

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None:
        self._conn.execute(
            "INSERT INTO customers (id, tenant, display_name, created_at) VALUES (?, ?, ?, ?)",
            (customer.id, customer.tenant, customer.display_name, _us(now)),
        )

    def find_customer(self, customer_id: str) -> CustomerRecord | None:
        row = self._conn.execute(
            "SELECT tenant, display_name, merged_into FROM customers WHERE id = ?", (customer_id,)
        ).fetchone()
        if row is None:
            return None
        return CustomerRecord(id=customer_id, tenant=row[0], display_name=row[1], merged_into=row[2])

    def get_customer(self, customer_id: str) -> CustomerRecord:
        customer = self.find_customer(customer_id)
        if customer is None:
            raise StoreError(f"unknown customer {customer_id!r}")
        return customer

    def set_display_name(self, customer_id: str, display_name: str) -> None:
        self._conn.execute("UPDATE customers SET display_name = ? WHERE id = ?", (display_name, customer_id))

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        self._conn.execute(
            "INSERT INTO identities (tenant, kind, value, customer_id, verified, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (tenant, identity.kind, identity.value, customer_id, identity.verified, _us(now)),
        )

    def mark_verified(self, tenant: str, identity: Identity) -> None:
        self._conn.execute(
            "UPDATE identities SET verified = 1 WHERE tenant = ? AND kind = ? AND value = ?",
            (tenant, identity.kind, identity.value),
        )

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]:
        rows = self._conn.execute(
            "SELECT kind, value, verified FROM identities WHERE customer_id = ?"
            " ORDER BY created_at, kind, value",
            (customer_id,),
        ).fetchall()
        return tuple(Identity(kind=k, value=v, verified=bool(verified)) for k, v, verified in rows)

    def move_identities(
        self, tenant: str, keys: Sequence[tuple[str, str]], from_customer: str, to_customer: str
    ) -> list[Identity]:
        moved: list[Identity] = []
        for kind, value in keys:
            row = self._conn.execute(
                "UPDATE identities SET customer_id = ? WHERE tenant = ? AND kind = ? AND value = ?"
                " AND customer_id = ? RETURNING verified",
                (to_customer, tenant, kind, value, from_customer),
            ).fetchone()
            if row is not None:
                moved.append(Identity(kind=kind, value=value, verified=bool(row[0])))
        return moved

    def set_merged_into(self, customer_id: str, into: str | None) -> None:
        self._conn.execute("UPDATE customers SET merged_into = ? WHERE id = ?", (into, customer_id))

    def add_merge(self, merge: MergeRecord) -> None:
        self._conn.execute(
            f"INSERT INTO merges ({_MERGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            (
                merge.id,
                merge.tenant,
                merge.surviving_customer,
                orjson.dumps(list(merge.merged_customers)).decode(),
                _identities_json(merge.identities),
                orjson.dumps([list(t) for t in merge.threads]).decode(),
                orjson.dumps(dict(merge.evidence)).decode(),
                _us(merge.created_at),
                _us(merge.undone_at) if merge.undone_at is not None else None,
            ),
        )
        self._conn.executemany(
            "INSERT INTO merge_members (customer_id, merge_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(c, merge.id) for c in (merge.surviving_customer, *merge.merged_customers)],
        )

    def get_merge(self, merge_id: str) -> MergeRecord | None:
        row = self._conn.execute(
            f"SELECT {_MERGE_COLUMNS} FROM merges WHERE id = ?", (merge_id,)  # noqa: S608
        ).fetchone()
        return _merge(row) if row is not None else None

    def mark_merge_undone(self, merge_id: str, at: datetime) -> None:
        self._conn.execute("UPDATE merges SET undone_at = ? WHERE id = ?", (_us(at), merge_id))

    def customer_merges(self, customer_id: str) -> list[MergeRecord]:
        rows = self._conn.execute(
            f"SELECT {', '.join('m.' + c.strip() for c in _MERGE_COLUMNS.split(','))}"  # noqa: S608
            " FROM merge_members mm JOIN merges m ON m.id = mm.merge_id WHERE mm.customer_id = ?"
            " ORDER BY m.created_at, m.id",
            (customer_id,),
        ).fetchall()
        return [_merge(r) for r in rows]

    def add_claimed_link(self, link: ClaimedLink) -> None:
        self._conn.execute(
            "INSERT INTO claimed_links (id, tenant, customer_id, other_customer_id, identities, message_id,"
            " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                link.id,
                link.tenant,
                link.customer_id,
                link.other_customer_id,
                orjson.dumps([[i.kind, i.value, i.verified] for i in link.identities]).decode(),
                link.message_id,
                _us(link.created_at),
            ),
        )

    def claimed_links(self, customer_id: str) -> list[ClaimedLink]:
        rows = self._conn.execute(
            "SELECT id, tenant, customer_id, other_customer_id, identities, message_id, created_at"
            " FROM claimed_links WHERE customer_id = ?"
            " UNION SELECT id, tenant, customer_id, other_customer_id, identities, message_id, created_at"
            " FROM claimed_links WHERE other_customer_id = ? ORDER BY 7, 1",
            (customer_id, customer_id),
        ).fetchall()
        return [
            ClaimedLink(
                id=r[0],
                tenant=r[1],
                customer_id=r[2],
                other_customer_id=r[3],
                identities=tuple(
                    Identity(kind=k, value=v, verified=bool(ok)) for k, v, ok in orjson.loads(r[4])
                ),
                message_id=r[5],
                created_at=_dt(r[6]),
            )
            for r in rows
        ]

    def find_open_thread(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads"  # noqa: S608
            " WHERE customer_id = ? AND tenant = ? AND inbox = ? AND status = 'open' AND last_activity >= ?"
            " ORDER BY last_activity DESC LIMIT 1",
            (customer_id, tenant, inbox, _us(active_since)),
        ).fetchone()
        return _thread(row) if row is not None else None

    def open_threads(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> list[ThreadRecord]:
        rows = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads"  # noqa: S608
            " WHERE customer_id = ? AND tenant = ? AND inbox = ? AND status = 'open' AND last_activity >= ?",
            (customer_id, tenant, inbox, _us(active_since)),
        ).fetchall()
        return sorted((_thread(r) for r in rows), key=lambda t: t.number)

    def get_thread(self, thread_id: str) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE id = ?", (thread_id,)  # noqa: S608
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_successor(self, thread_id: str) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE previous_id = ?"  # noqa: S608
            " ORDER BY created_at DESC LIMIT 1",
            (thread_id,),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_thread_by_number(self, tenant: str, number: int) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE tenant = ? AND number = ?",  # noqa: S608
            (tenant, number),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_thread_by_rfc822(self, tenant: str, rfc822_message_id: str) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {', '.join('t.' + c.strip() for c in _THREAD_COLUMNS.split(','))}"  # noqa: S608
            " FROM messages m JOIN threads t ON t.id = m.thread_id"
            " WHERE m.rfc822_message_id = ? AND t.tenant = ? ORDER BY m.received_at DESC LIMIT 1",
            (rfc822_message_id, tenant),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_thread_by_key(self, tenant: str, channel: str, inbox: str, key: str) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {', '.join('t.' + c.strip() for c in _THREAD_COLUMNS.split(','))}"  # noqa: S608
            " FROM thread_keys k JOIN threads t ON t.id = k.thread_id"
            " WHERE k.tenant = ? AND k.channel = ? AND k.inbox = ? AND k.key = ?",
            (tenant, channel, inbox, key),
        ).fetchone()
        return _thread(row) if row is not None else None

    def add_thread_key(
        self, tenant: str, channel: str, inbox: str, key: str, thread_id: str, now: datetime
    ) -> None:
        self._conn.execute(
            "INSERT INTO thread_keys (tenant, channel, inbox, key, thread_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (tenant, channel, inbox, key, thread_id, _us(now)),
        )

    def customer_thread_ids(self, customer_id: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT id FROM threads WHERE customer_id = ? ORDER BY number", (customer_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def move_threads(self, thread_ids: Sequence[str], to_customer: str) -> None:
        self._conn.executemany(
            "UPDATE threads SET customer_id = ? WHERE id = ?", [(to_customer, t) for t in thread_ids]
        )

    def next_thread_number(self, tenant: str) -> int:
        row = self._conn.execute(
            "INSERT INTO tenant_counters (tenant, next_thread_number) VALUES (?, 2)"
            " ON CONFLICT (tenant) DO UPDATE SET next_thread_number = next_thread_number + 1"
            " RETURNING next_thread_number - 1",
            (tenant,),
        ).fetchone()
        return int(row[0])

    def create_thread(self, thread: ThreadRecord) -> None:
        self._conn.execute(
            "INSERT INTO threads (id, tenant, inbox, customer_id, subject, status, number, last_activity,"
            " next_sequence, created_at, merged_into, previous_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
            (
                thread.id,
                thread.tenant,
                thread.inbox,
                thread.customer_id,
                thread.subject,
                "open" if thread.open else "closed",
                thread.number,
                _us(thread.last_activity),
                _us(thread.last_activity),
                thread.merged_into,
                thread.previous_id,
            ),
        )

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        row = self._conn.execute(
            "UPDATE threads SET next_sequence = next_sequence + 1, last_activity = max(last_activity, ?)"
            " WHERE id = ? RETURNING next_sequence - 1",
            (_us(now), thread_id),
        ).fetchone()
        if row is None:
            raise StoreError(f"unknown thread {thread_id!r}")
        return int(row[0])

    def set_thread_status(self, thread_id: str, open: bool, at: datetime) -> bool:
        if open:
            cur = self._conn.execute(
                "UPDATE threads SET status = 'open', last_activity = max(last_activity, ?)"
                " WHERE id = ? AND merged_into IS NULL",
                (_us(at), thread_id),
            )
        else:
            cur = self._conn.execute("UPDATE threads SET status = 'closed' WHERE id = ?", (thread_id,))
        if cur.rowcount:
            return True
        return self._conn.execute("SELECT 1 FROM threads WHERE id = ?", (thread_id,)).fetchone() is not None

    def merge_thread(self, thread_id: str, into: str, now: datetime) -> None:
        self._conn.execute(
            "UPDATE threads SET status = 'closed', merged_into = ? WHERE id = ?", (into, thread_id)
        )

    def add_message(self, message: MessageRecord) -> None:
        self._conn.execute(
            "INSERT INTO messages (message_id, thread_id, customer_id, sequence, channel, external_id,"
            " rfc822_message_id, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            # A provider resending after its key expired is placed again; the first record stays.
            " ON CONFLICT (message_id) DO NOTHING",
            (
                message.message_id,
                message.thread_id,
                message.customer_id,
                message.sequence,
                message.channel,
                message.external_id,
                message.rfc822_message_id,
                _us(message.received_at),
            ),
        )

    def recent_texts(self, customer_id: str, since: datetime, *, not_channel: str) -> list[RecentText]:
        rows = self._conn.execute(
            "SELECT message_id, thread_id, channel, text, at FROM recent_texts"
            " WHERE customer_id = ? AND at >= ? AND channel != ? ORDER BY at DESC LIMIT ?",
            (customer_id, _us(since), not_channel, RECENT_TEXTS_KEPT),
        ).fetchall()
        return [
            RecentText(
                customer_id=customer_id,
                message_id=r[0],
                thread_id=r[1],
                channel=r[2],
                text=r[3],
                at=_dt(r[4]),
            )
            for r in rows
        ]

    def add_recent_text(self, text: RecentText) -> None:
        self._conn.execute(
            "INSERT INTO recent_texts (customer_id, at, message_id, thread_id, channel, text)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (text.customer_id, _us(text.at), text.message_id, text.thread_id, text.channel, text.text),
        )
        # Only the newest RECENT_TEXTS_KEPT of a channel can ever be returned: without the cap, a
        # customer busy on one channel made recent_texts read every one of them for each message.
        self._conn.execute(
            "DELETE FROM recent_texts WHERE customer_id = ?1 AND channel = ?2 AND at < ("
            "SELECT at FROM recent_texts WHERE customer_id = ?1 AND channel = ?2"
            " ORDER BY at DESC LIMIT 1 OFFSET ?3)",
            (text.customer_id, text.channel, RECENT_TEXTS_KEPT - 1),
        )


def _insert_event(conn: sqlite3.Connection, event: Event, now: datetime) -> None:
    conn.execute(
        "INSERT INTO outbox (event_id, type, routing_key, tenant, channel, thread_id, sequence, body,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.event_id,
            event.type,
            event.routing_key,
            event.tenant,
            event.channel,
            event.thread_id,
            event.sequence,
            event.body,
            _us(now),
        ),
    )


def _quarantine_record(row: Sequence[Any]) -> QuarantineRecord:
    return QuarantineRecord(
        id=row[0],
        tenant=row[1],
        channel=row[2],
        inbox=row[3],
        reason=row[4],
        raw_ref=row[5],
        size=row[6],
        received_at=_dt(row[7]),
        replayed_at=_dt(row[8]) if row[8] is not None else None,
        replay_result=row[9],
    )


_QUARANTINE_COLUMNS = (
    "id, tenant, channel, inbox, reason, raw_ref, size, received_at, replayed_at, replay_result"
)


_MEDIA_COLUMNS = (
    "key, channel, inbox, account, ref, kind, state, attempts, next_attempt_at, sha256, size, content_type,"
    " name, error, created_at"
)


_MEDIA_CLAIM = (
    "UPDATE media SET attempts = attempts + 1, next_attempt_at = ? WHERE key IN"
    " (SELECT key FROM media WHERE state = 'pending' AND channel = ? AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at LIMIT ?)"
    " RETURNING key, channel, inbox, account, ref, kind, state, attempts, next_attempt_at, sha256, size,"
    " content_type, name, error, created_at"
)


def _media_record(row: Sequence[Any]) -> MediaFetch:
    return MediaFetch(
        key=row[0],
        channel=row[1],
        inbox=row[2],
        account=row[3],
        ref=row[4],
        kind=row[5],
        state=row[6],
        attempts=row[7],
        next_attempt_at=_dt(row[8]) if row[8] is not None else None,
        sha256=row[9],
        size=row[10],
        content_type=row[11],
        name=row[12],
        error=row[13],
        created_at=_dt(row[14]),
    )


class SQLiteStore:
    """:class:`gateway.store.base.Store` on one SQLite file and a content-addressed blob directory."""

    def __init__(self, settings: StoreSettings, outbox: OutboxSettings, *, clock: Clock = _utcnow) -> None:
        self._settings = settings
        self._outbox = outbox
        self._clock = clock
        self._blobs = BlobDir(settings.blob_dir)
        self.stats = StoreStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._open = False
        # Committed unpublished outbox rows. Only the writer thread changes it (the lock lets
        # other threads read it); _batch_delta is what the open batch's finished jobs add to it.
        self._lock = threading.Lock()
        self._backlog = 0
        self._batch_delta = 0
        self._group_target = 0
        self._disk_checked_at = -_DISK_CHECK_INTERVAL
        self._disk_low = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        await asyncio.to_thread(self._prepare_dirs)
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._run_writer, args=(ready,), name="tg-store-writer", daemon=True
        )
        self._writer.start()
        try:
            backlog = await asyncio.wrap_future(ready)
        except sqlite3.Error as exc:
            await asyncio.to_thread(self._writer.join)
            raise StoreError(f"cannot open {self._settings.path}: {exc}") from exc
        with self._lock:
            self._backlog = backlog
        self._stopping.clear()
        self._checkpointer = threading.Thread(
            target=self._run_checkpointer, name="tg-store-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tg-store-read"
        )
        self._open = True
        logger.info("store open at %s (outbox backlog %d)", self._settings.path, backlog)

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        writer, reader, checkpointer = self._writer, self._reader, self._checkpointer
        self._queue.put(None)  # jobs queued before this still run
        if writer is not None:
            await asyncio.to_thread(writer.join)
        self._stopping.set()
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.join)
        if reader is not None:
            await asyncio.get_running_loop().run_in_executor(reader, self._close_reader)
            reader.shutdown(wait=False)
        self._writer = self._reader = self._checkpointer = None

    def _prepare_dirs(self) -> None:
        self._settings.path.parent.mkdir(parents=True, exist_ok=True)
        self._blobs.ensure()

    def _connect(self, *, readonly: bool) -> sqlite3.Connection:
        conn = sqlite3.connect(self._settings.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA busy_timeout = 5000")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            # The checkpointer thread copies the WAL back so commits do not stall on it; this
            # larger automatic threshold only bounds the WAL should that thread fall behind.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA synchronous = FULL")
        if not readonly:
            conn.execute(f"PRAGMA cache_size = -{_WRITER_CACHE_KIB}")
        conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if current > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"database schema version {current} is newer than this ticketgate ({len(MIGRATIONS)})"
            )
        for version in range(current + 1, len(MIGRATIONS) + 1):
            # executescript runs the whole migration and its version bump as one transaction.
            conn.executescript(
                f"BEGIN IMMEDIATE;\n{MIGRATIONS[version - 1]}\nPRAGMA user_version = {version};\nCOMMIT;"
            )
            logger.info("store schema migrated to version %d", version)

    def _run_checkpointer(self) -> None:
        """Copy the WAL into the database now and then, off the writer's path (PASSIVE never blocks it)."""
        try:
            conn = self._connect(readonly=False)
        except sqlite3.Error:
            logger.exception("store checkpointer cannot connect; the writer checkpoints instead")
            return
        try:
            while not self._stopping.wait(_CHECKPOINT_INTERVAL):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    logger.warning("store checkpoint failed: %s", exc)
        finally:
            conn.close()

    # -- writer thread -------------------------------------------------------------------------

    def _run_writer(self, ready: concurrent.futures.Future[int]) -> None:
        try:
            conn = self._connect(readonly=False)
            self._migrate(conn)
            row = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
            backlog = int(row[0])
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(backlog)
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    break
                batch, stopping = self._collect(first)
                self._commit(conn, batch)
        finally:
            conn.close()

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus everything queued meanwhile, up to ``commit_max_batch``."""
        batch = [first]
        limit = self._settings.commit_max_batch
        target = min(self._group_target, limit)
        self._group_target = 0
        deadline = time.monotonic() + _GROUP_WAIT_LIMIT
        while len(batch) < limit:
            try:
                if len(batch) < target:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _commit(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            self._commit_batch(conn, batch)
        except Exception as exc:
            # Savepoint bookkeeping itself failed: keep nothing and keep the writer alive.
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            self._fail_batch(batch, StoreError(f"store write failed: {exc}"))

    def _commit_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        self._batch_delta = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_batch(batch, StoreError(f"cannot begin a transaction: {exc}"))
            return
        for index, job in enumerate(batch):
            conn.execute("SAVEPOINT job")
            try:
                value, delta = job.fn(conn)
            except Exception as exc:
                if not self._rollback_to_savepoint(conn):
                    # The error ended the whole transaction (disk full, I/O error): nothing of
                    # this batch was kept, and later jobs must not run outside a transaction.
                    self._fail_batch(batch, StoreError(f"transaction aborted: {exc}"))
                    return
                outcomes.append((False, _as_store_error(exc)))
                logger.debug("store job %d of %d failed: %r", index + 1, len(batch), exc)
            else:
                conn.execute("RELEASE job")
                self._batch_delta += delta
                outcomes.append((True, value))
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._fail_batch(batch, StoreError(f"commit failed: {exc}"))
            return
        with self._lock:
            self._backlog += self._batch_delta
        self.stats.commits += 1
        self.stats.jobs += len(batch)
        self.stats.failed_jobs += sum(1 for ok, _ in outcomes if not ok)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        _settle_all(batch, outcomes)

    @staticmethod
    def _rollback_to_savepoint(conn: sqlite3.Connection) -> bool:
        if not conn.in_transaction:
            return False
        try:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False
        return True

    def _fail_batch(self, batch: list[_Job], error: StoreError) -> None:
        logger.error("store commit of %d jobs failed: %s", len(batch), error.reason)
        self.stats.failed_commits += 1
        self.stats.failed_jobs += len(batch)
        _settle_all(batch, [(False, error)] * len(batch))

    # -- submitting ----------------------------------------------------------------------------

    def gather_next_batch(self, jobs: int) -> None:
        """Make the writer wait (up to 10 s) until ``jobs`` jobs are queued and commit them together.

        A hook for tests and benchmarks that need a batch of known membership; production never
        calls it.
        """
        self._group_target = jobs

    @property
    def backlog(self) -> int:
        """Committed, unpublished outbox rows."""
        with self._lock:
            return self._backlog

    def _check_disk(self) -> None:
        """Refuse new work early when the disk under the blob directory is nearly full."""
        if self._disk_is_low():
            raise BacklogFull(
                f"less than {self._settings.min_free_disk_mb} MB free under {self._settings.blob_dir}",
                retry_after=self._outbox.retry_after,
            )

    def _check_room(self, conn: sqlite3.Connection, rows: int) -> None:
        """On the writer thread, inside a job that just inserted ``rows`` events: refuse when they
        exceed the bound.

        Checked where the rows are known, so duplicates (which enqueue nothing) still get their
        answer when the outbox is full. The in-memory count only falls when this process marks
        events published; when it says "full", recount: another process (the relay process, an
        operator's replay) may have published meanwhile.
        """
        if not rows:
            return
        if self._backlog + self._batch_delta + rows > self._outbox.max_backlog:
            (unpublished,) = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
            with self._lock:
                # The count sees this batch's uncommitted rows, this job's included.
                self._backlog = unpublished - self._batch_delta - rows
        if self._backlog + self._batch_delta + rows > self._outbox.max_backlog:
            raise BacklogFull(
                f"outbox holds {self._backlog + self._batch_delta} unpublished events"
                f" (max_backlog {self._outbox.max_backlog})",
                retry_after=self._outbox.retry_after,
            )

    def _disk_is_low(self) -> bool:
        now = time.monotonic()
        if now - self._disk_checked_at >= _DISK_CHECK_INTERVAL:
            # statvfs reads file-system metadata the kernel keeps in memory; it does not wait on I/O.
            free = self._blobs.free_bytes()
            self._disk_low = free < self._settings.min_free_disk_mb * 1024 * 1024
            self._disk_checked_at = now
        return self._disk_low

    async def _submit(self, fn: WriteJob[T]) -> T:
        """Queue ``fn`` for the writer and wait for its commit."""
        if not self._open:
            raise StoreError("store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn=fn, future=future, loop=loop))
        return await future

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if not self._open or self._reader is None:
            raise StoreError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._with_reader, fn)

    def _with_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._reader_local.conn = conn
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    def _close_reader(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is not None:
            conn.close()
            self._reader_local.conn = None

    # -- archiving -----------------------------------------------------------------------------

    @staticmethod
    def _archive_inline(conn: sqlite3.Connection, digest: str, data: bytes, now: datetime) -> None:
        """Keep the raw bytes (``digest`` is their sha256, computed before the job) in the database."""
        conn.execute(
            "INSERT INTO raw_archive (sha256, data, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (sha256) DO NOTHING",
            (digest, data, _us(now)),
        )

    @staticmethod
    def _index_files(conn: sqlite3.Connection, files: Sequence[tuple[str, int]], now: datetime) -> None:
        if not files:
            return
        conn.executemany(
            "INSERT INTO blob_files (sha256, size, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (sha256) DO NOTHING",
            [(digest, size, _us(now)) for digest, size in files],
        )

    def _write_files(self, raw: bytes | None, attachments: Sequence[bytes]) -> list[tuple[str, int]]:
        """Durably write blobs (before the commit that references them); ``[(sha256, size)]``."""
        written = []
        for data in ([raw] if raw is not None else []) + list(attachments):
            written.append((self._blobs.put(data), len(data)))
        return written

    async def _prepare_blobs(
        self, body: bytes, attachments: Sequence[bytes]
    ) -> tuple[str, list[tuple[str, int]]]:
        """The raw body's sha256 and the files written; no await when nothing goes to a file."""
        inline = len(body) <= self._settings.inline_raw_max
        if inline and not attachments:
            return sha256_hex(body), []
        files = await asyncio.to_thread(self._write_files, None if inline else body, attachments)
        return sha256_hex(body), files

    # -- writes --------------------------------------------------------------------------------

    async def accept(
        self,
        envelope: RawEnvelope,
        messages: Sequence[CanonicalMessage],
        *,
        policies: Sequence[PlacementPolicy],
        build_event: EventBuilder,
    ) -> list[Placement]:
        if len(policies) != len(messages):
            raise ValueError("accept needs one placement policy per message")
        self._check_disk()
        attachments = [a.data for m in messages for a in m.attachments]
        digest, files = await self._prepare_blobs(envelope.body, attachments)
        body_inline = len(envelope.body) <= self._settings.inline_raw_max
        ref = raw_ref(digest)

        def job(conn: sqlite3.Connection) -> tuple[list[Placement], int]:
            now = self._clock()
            if body_inline:
                self._archive_inline(conn, digest, envelope.body, now)
            self._index_files(conn, files, now)
            tx = SQLiteTx(conn)
            placements: list[Placement] = []
            enqueued = 0
            for message, policy in zip(messages, policies, strict=True):
                placed = place(tx, message, policy, now=now)
                for merge_event in placed.events:
                    _insert_event(conn, merge_event, now)
                    enqueued += 1
                if placed.customer is not None:
                    event = build_event(
                        message, placed.placement, placed.customer, placed.thread_subject, ref
                    )
                    _insert_event(conn, event, now)
                    enqueued += 1
                placements.append(placed.placement)
            self._check_room(conn, enqueued)
            return placements, enqueued

        return await self._submit(job)

    async def quarantine(self, envelope: RawEnvelope, reason: str) -> QuarantineRecord:
        self._check_disk()
        digest, files = await self._prepare_blobs(envelope.body, ())
        body_inline = len(envelope.body) <= self._settings.inline_raw_max
        record = QuarantineRecord(
            id=new_id("qua"),
            tenant=envelope.tenant,
            channel=envelope.channel,
            inbox=envelope.inbox,
            reason=reason,
            raw_ref=raw_ref(digest),
            size=len(envelope.body),
            received_at=_dt(_us(envelope.received_at)),
        )
        headers = orjson.dumps(dict(envelope.headers)).decode()
        # Meta is transport facts; anything orjson cannot encode natively is kept as its str().
        meta = orjson.dumps(dict(envelope.meta), default=str).decode()

        def job(conn: sqlite3.Connection) -> tuple[QuarantineRecord, int]:
            now = self._clock()
            if body_inline:
                self._archive_inline(conn, digest, envelope.body, now)
            self._index_files(conn, files, now)
            conn.execute(
                "INSERT INTO quarantine (id, tenant, channel, inbox, reason, raw_ref, size, received_at,"
                " content_type, headers, meta, signature_verified, retry, remote, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.tenant,
                    record.channel,
                    record.inbox,
                    record.reason,
                    record.raw_ref,
                    record.size,
                    _us(record.received_at),
                    envelope.content_type,
                    headers,
                    meta,
                    envelope.signature_verified,
                    envelope.retry,
                    envelope.remote,
                    _us(now),
                ),
            )
            event = message_quarantined(
                quarantine_id=record.id,
                tenant=record.tenant,
                channel=record.channel,
                inbox=record.inbox,
                reason=reason,
                raw_ref=record.raw_ref,
                size=record.size,
                received_at=record.received_at,
                occurred_at=now,
            )
            _insert_event(conn, event, now)
            self._check_room(conn, 1)
            return record, 1

        return await self._submit(job)

    async def transact(self, work: TxWork[T]) -> T:
        # Not bounded by max_backlog: desk and control operations record decisions already made.
        def job(conn: sqlite3.Connection) -> tuple[T, int]:
            now = self._clock()
            value, events = work(SQLiteTx(conn), now)
            for event in events:
                _insert_event(conn, event, now)
            return value, len(events)

        return await self._submit(job)

    async def enqueue(self, events: Sequence[Event]) -> None:
        # Not bounded by max_backlog: these record state changes already made (merges, control).
        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            now = self._clock()
            for event in events:
                _insert_event(conn, event, now)
            return None, len(events)

        await self._submit(job)

    async def outbox_mark_published(self, positions: Sequence[int]) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            cur = conn.executemany(
                "UPDATE outbox SET published_at = ? WHERE position = ? AND published_at IS NULL",
                [(_us(self._clock()), position) for position in positions],
            )
            published = max(cur.rowcount, 0)
            conn.execute(
                "INSERT INTO counters (name, value) VALUES ('published_total', ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (published,),
            )
            return None, -published

        if positions:
            await self._submit(job)

    async def quarantine_mark_replayed(self, quarantine_id: str, result: str) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.execute(
                "UPDATE quarantine SET replayed_at = ?, replay_result = ? WHERE id = ?",
                (_us(self._clock()), result, quarantine_id),
            )
            return None, 0

        await self._submit(job)

    async def purge_expired(self, now: datetime) -> int:
        """Drop idempotency keys past the retention, and published outbox rows just as old."""
        cutoff = _us(now) - int(self._settings.idempotency_retention * 1_000_000)

        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            purged = conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,)).rowcount
            conn.execute("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < ?", (cutoff,))
            return purged, 0

        return await self._submit(job)

    async def purge_recent_texts(self, before: datetime, limit: int = 500) -> int:
        def job(conn: sqlite3.Connection) -> tuple[int, int]:
            deleted = conn.execute(
                "DELETE FROM recent_texts WHERE (customer_id, at, message_id) IN ("
                "SELECT customer_id, at, message_id FROM recent_texts WHERE at < ? ORDER BY at LIMIT ?)",
                (_us(before), limit),
            ).rowcount
            return deleted, 0

        return await self._submit(job)

    async def state_put(self, key: str, value: bytes) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.execute(
                "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, _us(self._clock())),
            )
            return None, 0

        await self._submit(job)

    async def state_cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        def job(conn: sqlite3.Connection) -> tuple[bool, int]:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            if (bytes(row[0]) if row is not None else None) != expected:
                return False, 0
            conn.execute(
                "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, _us(self._clock())),
            )
            return True, 0

        return await self._submit(job)

    async def state_get(self, key: str) -> bytes | None:
        def read(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._read(read)

    # -- media fetch queue (see Store.media_*) ----------------------------------------------------

    async def media_enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        rows = [
            (f.key, f.channel, f.inbox, f.account, f.ref, f.kind, f.name, f.content_type,
             _us(f.next_attempt_at or f.created_at), _us(f.created_at))
            for f in fetches
        ]

        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.executemany(
                "INSERT INTO media (key, channel, inbox, account, ref, kind, name, content_type,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                rows,
            )
            return None, 0

        if rows:
            await self._submit(job)

    async def media_claim(
        self, now: datetime, limit: int, lease: float, *, channel: str
    ) -> list[MediaFetch]:
        def job(conn: sqlite3.Connection) -> tuple[list[MediaFetch], int]:
            rows = conn.execute(
                _MEDIA_CLAIM,
                (_us(now) + int(lease * 1_000_000), channel, _us(now), limit),
            ).fetchall()
            claimed = sorted((_media_record(r) for r in rows), key=lambda f: (f.created_at, f.key))
            return claimed, 0

        return await self._submit(job)

    async def media_done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        digest = await asyncio.to_thread(self._blobs.put, data)

        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            now = self._clock()
            self._index_files(conn, [(digest, len(data))], now)
            conn.execute(
                "UPDATE media SET state = 'done', sha256 = ?, size = ?, content_type = ?, name = ?,"
                " error = NULL, next_attempt_at = NULL WHERE key = ?",
                (digest, len(data), content_type, name, key),
            )
            return None, 0

        await self._submit(job)
        return digest

    async def media_failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.execute(
                "UPDATE media SET state = ?, error = ?, next_attempt_at = ?"
                " WHERE key = ? AND state = 'pending'",
                ("pending" if retry_at else "failed", error[:500], _us(retry_at) if retry_at else None, key),
            )
            return None, 0

        await self._submit(job)

    async def media_get(self, key: str) -> MediaFetch | None:
        def read(conn: sqlite3.Connection) -> MediaFetch | None:
            row = conn.execute(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE key = ?", (key,)).fetchone()  # noqa: S608
            return _media_record(row) if row is not None else None

        return await self._read(read)

    async def ping(self) -> None:
        if self._disk_is_low():
            raise BacklogFull("free disk below store.min_free_disk_mb", retry_after=self._outbox.retry_after)

        def job(conn: sqlite3.Connection) -> tuple[None, int]:
            conn.execute("SELECT 1 FROM counters LIMIT 1").fetchall()
            return None, 0

        await self._submit(job)

    # -- reads ---------------------------------------------------------------------------------

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        def read(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(
                "SELECT position, event_id, type, routing_key, tenant, channel, thread_id, sequence, body,"
                " created_at FROM outbox WHERE published_at IS NULL AND position > ?"
                " ORDER BY position LIMIT ?",
                (after, limit),
            ).fetchall()
            return [
                OutboxRow(
                    position=r[0],
                    event_id=r[1],
                    type=r[2],
                    routing_key=r[3],
                    tenant=r[4],
                    channel=r[5],
                    thread_id=r[6],
                    sequence=r[7],
                    body=bytes(r[8]),
                    created_at=_dt(r[9]),
                )
                for r in rows
            ]

        return await self._read(read)

    async def outbox_status(self) -> OutboxStatus:
        def read(conn: sqlite3.Connection) -> OutboxStatus:
            backlog, oldest = conn.execute(
                "SELECT count(*), min(created_at) FROM outbox WHERE published_at IS NULL"
            ).fetchone()
            total = conn.execute("SELECT value FROM counters WHERE name = 'published_total'").fetchone()
            return OutboxStatus(
                backlog=backlog,
                oldest_created_at=_dt(oldest) if oldest is not None else None,
                published_total=total[0] if total else 0,
            )

        return await self._read(read)

    async def quarantine_list(self, limit: int = 100) -> list[QuarantineRecord]:
        def read(conn: sqlite3.Connection) -> list[QuarantineRecord]:
            rows = conn.execute(
                f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine ORDER BY created_at DESC, id DESC LIMIT ?",  # noqa: S608
                (limit,),
            ).fetchall()
            return [_quarantine_record(r) for r in rows]

        return await self._read(read)

    async def quarantine_get(self, quarantine_id: str) -> tuple[QuarantineRecord, RawEnvelope] | None:
        def read(conn: sqlite3.Connection) -> tuple[QuarantineRecord, RawEnvelope] | None:
            row = conn.execute(
                f"SELECT {_QUARANTINE_COLUMNS}, content_type, headers, meta, signature_verified, retry,"  # noqa: S608
                " remote FROM quarantine WHERE id = ?",
                (quarantine_id,),
            ).fetchone()
            if row is None:
                return None
            record = _quarantine_record(row)
            digest = parse_raw_ref(record.raw_ref)
            body = self._read_blob(conn, digest) if digest is not None else None
            if body is None:
                raise StoreError(f"raw bytes of quarantined {quarantine_id} are missing ({record.raw_ref})")
            headers: Mapping[str, str] = orjson.loads(row[11])
            meta: Mapping[str, Any] = orjson.loads(row[12])
            envelope = RawEnvelope(
                channel=record.channel,
                tenant=record.tenant,
                inbox=record.inbox,
                body=body,
                received_at=record.received_at,
                content_type=row[10],
                headers=headers,
                signature_verified=bool(row[13]),
                retry=row[14],
                remote=row[15],
                meta=meta,
            )
            return record, envelope

        return await self._read(read)

    async def read_blob(self, sha256: str) -> bytes | None:
        if not is_sha256(sha256):
            return None
        return await self._read(lambda conn: self._read_blob(conn, sha256))

    def _read_blob(self, conn: sqlite3.Connection, sha256: str) -> bytes | None:
        row = conn.execute("SELECT data FROM raw_archive WHERE sha256 = ?", (sha256,)).fetchone()
        if row is not None:
            return bytes(row[0])
        return self._blobs.get(sha256)


def _as_store_error(exc: Exception) -> Exception:
    """Database errors become :class:`StoreError`; anything else (a bug in a callback) stays itself."""
    if isinstance(exc, sqlite3.Error):
        store_error = StoreError(f"store write failed: {exc}")
        store_error.__cause__ = exc
        return store_error
    return exc


def _settle_all(batch: Sequence[_Job], outcomes: Sequence[tuple[bool, Any]]) -> None:
    """Hand results to the awaiting coroutines, one wake-up per event loop for the whole batch.

    Waking a loop costs a syscall on each side; per job it was a tenth of the writer's time.
    The loop may be gone at shutdown.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, bool, Any]]] = {}
    for job, (ok, value) in zip(batch, outcomes, strict=True):
        by_loop.setdefault(job.loop, []).append((job, ok, value))
    for loop, results in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, results)
        except RuntimeError:
            logger.debug("event loop closed before %d store results could be delivered", len(results))


def _resolve(results: Sequence[tuple[_Job, bool, Any]]) -> None:
    for job, ok, value in results:
        if job.future.done():  # the awaiting task was cancelled; its write is committed anyway
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
