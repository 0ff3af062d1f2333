"""The shared store: PostgreSQL, so several gateway instances can take any message.

The placement engine (:mod:`dedupe.engine`) is synchronous and runs against :class:`dedupe.tx.Tx`,
so this store runs the very same engine as the SQLite store: every write is one transaction on a
pooled psycopg 3 connection, executed on a bounded pool of worker threads. PostgreSQL groups the
commits of concurrent connections into shared WAL flushes itself, so no writer queue is needed here.

Concurrency across instances:

- Idempotency keys are claimed with ``INSERT ... ON CONFLICT DO NOTHING``: a concurrent claim of
  the same key waits for the first transaction and then sees its placement.
- The engine locks in one order (:mod:`dedupe.tx`): ``lock_identities`` takes
  ``pg_advisory_xact_lock`` on a hash of (tenant, kind, value) of every identity of the message,
  sorted, before any customer is resolved, so two first messages of one new customer cannot create
  two customers; ``lock_customers`` row-locks the owning customers (``SELECT ... FOR UPDATE`` in
  id order), so two messages of one customer arriving through different identities on different
  instances cannot open two threads. The locks end with the transaction, after its commit is
  visible, so the next holder reads (read committed: a fresh snapshot per statement) what the
  previous one wrote. A transaction PostgreSQL picks as a deadlock victim (possible only when
  merges lock customers in a second round) is rolled back and run again.
- ``advance_thread`` updates the thread row (a row lock held to commit), so sequences are strictly
  increasing without gaps, and a later message of a thread gets a later outbox position.
- The outbox relay runs on one instance at a time: the holder of a session advisory lock (the
  *relay lease*) on a dedicated connection. ``SKIP LOCKED`` alone would let two relays each take
  a batch and publish them concurrently, so event 5 of a thread could reach the bus after event 6.
  Others stand by and take the lease over when its connection ends (crash, shutdown).
- Relays learn of events committed on other instances through LISTEN/NOTIFY on
  ``OUTBOX_CHANNEL``: after such commits each instance sends a NOTIFY (one per burst, in a
  transaction of its own: see ``_notify_commits``), and the relay listens on a dedicated connection
  (``outbox_listen``). Polling stays the fallback, so a lost notification costs latency only.
- The backlog bound is read from counter rows maintained in the accept transaction. The rows are
  spread over slots so concurrent commits do not queue on one hot row; the bound can therefore be
  overshot by at most the number of transactions committing at that moment (a few), never more.

Blobs: raw bodies up to ``inline_raw_max`` live in the database (same commit); larger bodies and
attachments are content-addressed files under ``blob_dir``, written durably before the commit that
references them. With several instances ``blob_dir`` must be one shared directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
import psycopg
import psycopg.errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

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
Conn = psycopg.Connection[TupleRow]

POOL_SIZE = 8  # connections (and worker threads) per instance; mind max_connections
BACKLOG_SLOTS = 64  # counter rows the unpublished-event count is spread over (created by migration 1)
_OPEN_TIMEOUT = 10.0  # seconds open() waits for the first connections
_CONNECT_TIMEOUT = 5  # seconds per connection attempt
_LEASE_RETRY = 0.5  # seconds a standby waits between attempts to take the relay lease
_TX_ATTEMPTS = 4  # a transaction chosen as a deadlock victim is run again, from the start
_DISK_CHECK_INTERVAL = 1.0
# LISTEN/NOTIFY channel on which committed outbox events are announced to every instance's relay.
OUTBOX_CHANNEL = "ticketgate_outbox"
_LISTEN_RETRY = 0.2  # seconds before the first reconnect of a lost LISTEN connection; doubles
_LISTEN_RETRY_MAX = 10.0

# Ordered migrations; ``schema_migrations`` records the versions applied. Append, never edit.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE idempotency_keys (
        key text PRIMARY KEY,
        message_id text NOT NULL,
        thread_id text,
        customer_id text,
        sequence integer,
        is_new_thread boolean,
        duplicate_of text,
        previous_thread_id text,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

    CREATE TABLE customers (
        id text PRIMARY KEY,
        tenant text NOT NULL,
        display_name text,
        merged_into text REFERENCES customers (id),
        created_at timestamptz NOT NULL
    );
    CREATE TABLE identities (
        tenant text NOT NULL,
        kind text NOT NULL,
        value text NOT NULL,
        customer_id text NOT NULL REFERENCES customers (id),
        verified boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL,
        PRIMARY KEY (tenant, kind, value)
    );
    CREATE INDEX identities_customer ON identities (customer_id);

    CREATE TABLE tenant_counters (
        tenant text PRIMARY KEY,
        next_thread_number bigint NOT NULL
    );
    CREATE TABLE threads (
        id text PRIMARY KEY,
        tenant text NOT NULL,
        inbox text NOT NULL,
        customer_id text NOT NULL REFERENCES customers (id),
        subject text,
        status text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
        number bigint NOT NULL,
        last_activity timestamptz NOT NULL,
        next_sequence integer NOT NULL DEFAULT 1,
        merged_into text REFERENCES threads (id),
        previous_id text REFERENCES threads (id),
        created_at timestamptz NOT NULL,
        UNIQUE (tenant, number)
    );
    CREATE INDEX threads_open_by_customer ON threads (customer_id, tenant, inbox, last_activity)
        WHERE status = 'open';
    CREATE INDEX threads_customer ON threads (customer_id);
    CREATE INDEX threads_previous ON threads (previous_id) WHERE previous_id IS NOT NULL;

    -- A channel's own thread key (Slack thread_ts, chat session): the first thread keeps it.
    CREATE TABLE thread_keys (
        tenant text NOT NULL,
        channel text NOT NULL,
        inbox text NOT NULL,
        key text NOT NULL,
        thread_id text NOT NULL REFERENCES threads (id),
        created_at timestamptz NOT NULL,
        PRIMARY KEY (tenant, channel, inbox, key)
    );

    CREATE TABLE customer_merges (
        id text PRIMARY KEY,
        tenant text NOT NULL,
        surviving_customer text NOT NULL,
        merged_customers text[] NOT NULL,
        identities jsonb NOT NULL,
        threads jsonb NOT NULL,
        evidence jsonb NOT NULL,
        created_at timestamptz NOT NULL,
        undone_at timestamptz
    );
    CREATE INDEX customer_merges_survivor ON customer_merges (surviving_customer);
    CREATE INDEX customer_merges_merged ON customer_merges USING gin (merged_customers);

    CREATE TABLE claimed_links (
        id text PRIMARY KEY,
        tenant text NOT NULL,
        customer_id text NOT NULL,
        other_customer_id text NOT NULL,
        identities jsonb NOT NULL,
        message_id text,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX claimed_links_customer ON claimed_links (customer_id);
    CREATE INDEX claimed_links_other ON claimed_links (other_customer_id);

    -- Recent normalised texts per customer, for duplicate touchpoints; pruned to the window.
    CREATE TABLE recent_texts (
        customer_id text NOT NULL,
        message_id text NOT NULL,
        thread_id text NOT NULL,
        channel text NOT NULL,
        text text NOT NULL,
        at timestamptz NOT NULL,
        PRIMARY KEY (customer_id, message_id)
    );
    CREATE INDEX recent_texts_by_time ON recent_texts (customer_id, at);

    CREATE TABLE messages (
        message_id text PRIMARY KEY,
        thread_id text NOT NULL REFERENCES threads (id),
        customer_id text NOT NULL REFERENCES customers (id),
        sequence integer NOT NULL,
        channel text NOT NULL,
        external_id text,
        rfc822_message_id text,
        received_at timestamptz NOT NULL,
        UNIQUE (thread_id, sequence)
    );
    CREATE INDEX messages_rfc822 ON messages (rfc822_message_id) WHERE rfc822_message_id IS NOT NULL;

    CREATE TABLE outbox (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id text NOT NULL UNIQUE,
        type text NOT NULL,
        routing_key text NOT NULL,
        tenant text NOT NULL,
        channel text NOT NULL,
        thread_id text,
        sequence integer,
        body bytea NOT NULL,
        created_at timestamptz NOT NULL,
        published_at timestamptz
    );
    CREATE INDEX outbox_unpublished ON outbox (position) WHERE published_at IS NULL;
    CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

    -- Unpublished events, counted in the transactions that add and publish them.
    CREATE TABLE outbox_backlog (
        slot integer PRIMARY KEY,
        unpublished bigint NOT NULL
    );
    -- 64 slots: BACKLOG_SLOTS.
    INSERT INTO outbox_backlog (slot, unpublished) SELECT s, 0 FROM generate_series(0, 63) s;

    CREATE TABLE raw_archive (
        sha256 text PRIMARY KEY,
        data bytea NOT NULL,
        created_at timestamptz NOT NULL
    );
    CREATE TABLE blob_files (
        sha256 text PRIMARY KEY,
        size bigint NOT NULL,
        created_at timestamptz NOT NULL
    );

    CREATE TABLE quarantine (
        id text PRIMARY KEY,
        tenant text NOT NULL,
        channel text NOT NULL,
        inbox text NOT NULL,
        reason text NOT NULL,
        raw_ref text NOT NULL,
        size bigint NOT NULL,
        received_at timestamptz NOT NULL,
        content_type text,
        headers text NOT NULL,
        meta text NOT NULL,
        signature_verified boolean NOT NULL,
        retry integer NOT NULL,
        remote text,
        created_at timestamptz NOT NULL,
        replayed_at timestamptz,
        replay_result text
    );
    CREATE INDEX quarantine_created ON quarantine (created_at);

    CREATE TABLE counters (
        name text PRIMARY KEY,
        value bigint NOT NULL
    );

    CREATE TABLE state (
        key text PRIMARY KEY,
        value bytea NOT NULL,
        updated_at timestamptz NOT NULL
    );

    -- Media announced by committed messages (WeChat media_id), fetched after the answer.
    CREATE TABLE media (
        key text PRIMARY KEY,
        channel text NOT NULL,
        inbox text NOT NULL,
        account text NOT NULL,
        ref text NOT NULL,
        kind text NOT NULL,
        state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'failed')),
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz,
        sha256 text,
        size bigint,
        content_type text,
        name text,
        error text,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX media_due ON media (next_attempt_at) WHERE state = 'pending';
    """,
    # Recent texts are capped per customer and channel (Tx.add_recent_text); this finds the cap.
    """
    CREATE INDEX recent_texts_by_channel ON recent_texts (customer_id, channel, at);
    """,
    # Recent texts past the duplicate window are swept by age (Store.purge_recent_texts).
    """
    CREATE INDEX recent_texts_by_age ON recent_texts (at);
    """,
)


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for a namespaced tuple of strings."""
    digest = hashlib.blake2b("\x1f".join(("ticketgate", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_MIGRATION_LOCK = lock_key("migrations")
RELAY_LEASE_LOCK = lock_key("relay-lease")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _utc(moment: datetime) -> datetime:
    """Timezone-aware UTC; naive datetimes are taken as UTC (as the SQLite store does)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


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
        number=int(row[5]),
        last_activity=_utc(row[6]),
        open=row[7] == "open",
        merged_into=row[8],
        previous_id=row[9],
    )


def _identity_list(identities: Sequence[Identity]) -> list[list[Any]]:
    return [[i.kind, i.value, i.verified] for i in identities]


def _identities_from(data: Sequence[Sequence[Any]]) -> tuple[Identity, ...]:
    return tuple(Identity(kind=k, value=v, verified=bool(verified)) for k, v, verified in data)


def _merge(row: Sequence[Any]) -> MergeRecord:
    return MergeRecord(
        id=row[0],
        tenant=row[1],
        surviving_customer=row[2],
        merged_customers=tuple(row[3]),
        identities=tuple(
            (origin, Identity(kind=k, value=v, verified=bool(verified))) for origin, k, v, verified in row[4]
        ),
        threads=tuple((origin, thread_id) for origin, thread_id in row[5]),
        evidence=row[6],
        created_at=_utc(row[7]),
        undone_at=_utc(row[8]) if row[8] is not None else None,
    )


_MERGE_COLUMNS = (
    "id, tenant, surviving_customer, merged_customers, identities, threads, evidence, created_at, undone_at"
)
_LINK_COLUMNS = "id, tenant, customer_id, other_customer_id, identities, message_id, created_at"


def _link(row: Sequence[Any]) -> ClaimedLink:
    return ClaimedLink(
        id=row[0],
        tenant=row[1],
        customer_id=row[2],
        other_customer_id=row[3],
        identities=_identities_from(row[4]),
        message_id=row[5],
        created_at=_utc(row[6]),
    )


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


def _json(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


class PostgresTx:
    """:class:`dedupe.tx.Tx` over one pooled connection inside an open transaction."""

    serialized = False  # other instances write concurrently: re-read what a lock may have changed

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    # -- idempotency ---------------------------------------------------------------------------

    def claim_key(self, key: str, message_id: str, now: datetime) -> Placement | None:
        cur = self._conn.execute(
            "INSERT INTO idempotency_keys (key, message_id, created_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING",
            (key, message_id, now),
        )
        if cur.rowcount == 1:
            return None
        # A concurrent claim waited above for the first transaction; read committed sees its row.
        row = self._conn.execute(
            "SELECT message_id, thread_id, customer_id, sequence, is_new_thread, duplicate_of,"
            " previous_thread_id FROM idempotency_keys WHERE key = %s",
            (key,),
        ).fetchone()
        if row is None or row[1] is None:
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
            "UPDATE idempotency_keys SET thread_id = %s, customer_id = %s, sequence = %s,"
            " is_new_thread = %s, duplicate_of = %s, previous_thread_id = %s WHERE key = %s",
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

    # -- locks ---------------------------------------------------------------------------------

    def lock_identities(self, tenant: str, keys: Sequence[tuple[str, str]]) -> None:
        if not keys:
            return
        # One statement; its output columns are evaluated left to right, so locks follow ``keys``.
        self._conn.execute(
            "SELECT " + ", ".join(["pg_advisory_xact_lock(%s)"] * len(keys)),
            [lock_key("identity", tenant, kind, value) for kind, value in keys],
        )

    def lock_customers(self, customer_ids: Sequence[str]) -> None:
        if not customer_ids:
            return
        # LockRows runs above the sort: rows are locked in this order, the same in every transaction.
        self._conn.execute(
            f"SELECT id FROM customers WHERE id IN ({_placeholders(len(customer_ids))})"  # noqa: S608
            ' ORDER BY id COLLATE "C" FOR UPDATE',
            list(customer_ids),
        )

    # -- customers and identities --------------------------------------------------------------

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        if not identities:
            return []
        # A literal IN list: with a prepared statement it plans as index probes (an unnest() of
        # arrays measured 4x slower here).
        pairs = ", ".join(["(%s, %s)"] * len(identities))
        rows = self._conn.execute(
            "SELECT kind, value, customer_id, verified FROM identities"  # noqa: S608 - placeholders only
            f" WHERE tenant = %s AND (kind, value) IN ({pairs})",
            [tenant, *(part for i in identities for part in (i.kind, i.value))],
        ).fetchall()
        stored = {(kind, value): (customer_id, bool(verified)) for kind, value, customer_id, verified in rows}
        found: list[StoredIdentity] = []
        for identity in identities:
            hit = stored.get(identity.key())
            if hit is not None:
                found.append(
                    StoredIdentity(
                        kind=identity.kind, value=identity.value, customer_id=hit[0], verified=hit[1]
                    )
                )
        return found

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None:
        self._conn.execute(
            "INSERT INTO customers (id, tenant, display_name, merged_into, created_at)"
            " VALUES (%s, %s, %s, %s, %s)",
            (customer.id, customer.tenant, customer.display_name, customer.merged_into, now),
        )

    def find_customer(self, customer_id: str) -> CustomerRecord | None:
        row = self._conn.execute(
            "SELECT tenant, display_name, merged_into FROM customers WHERE id = %s", (customer_id,)
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
        self._conn.execute(
            "UPDATE customers SET display_name = %s WHERE id = %s", (display_name, customer_id)
        )

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        self._conn.execute(
            "INSERT INTO identities (tenant, kind, value, customer_id, verified, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (tenant, identity.kind, identity.value, customer_id, identity.verified, now),
        )

    def mark_verified(self, tenant: str, identity: Identity) -> None:
        self._conn.execute(
            "UPDATE identities SET verified = true WHERE tenant = %s AND kind = %s AND value = %s",
            (tenant, identity.kind, identity.value),
        )

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]:
        rows = self._conn.execute(
            "SELECT kind, value, verified FROM identities WHERE customer_id = %s"
            ' ORDER BY created_at, kind COLLATE "C", value COLLATE "C"',
            (customer_id,),
        ).fetchall()
        return tuple(Identity(kind=k, value=v, verified=bool(verified)) for k, v, verified in rows)

    def move_identities(
        self, tenant: str, keys: Sequence[tuple[str, str]], from_customer: str, to_customer: str
    ) -> list[Identity]:
        if not keys:
            return []
        rows = self._conn.execute(
            "UPDATE identities SET customer_id = %s WHERE tenant = %s AND customer_id = %s"
            " AND (kind, value) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
            " RETURNING kind, value, verified",
            (to_customer, tenant, from_customer, [k for k, _ in keys], [v for _, v in keys]),
        ).fetchall()
        moved = {(k, v): bool(verified) for k, v, verified in rows}
        return [Identity(kind=k, value=v, verified=moved[(k, v)]) for k, v in keys if (k, v) in moved]

    def set_merged_into(self, customer_id: str, into: str | None) -> None:
        self._conn.execute("UPDATE customers SET merged_into = %s WHERE id = %s", (into, customer_id))

    def add_merge(self, merge: MergeRecord) -> None:
        self._conn.execute(
            "INSERT INTO customer_merges (id, tenant, surviving_customer, merged_customers, identities,"
            " threads, evidence, created_at, undone_at)"
            " VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb, %s::jsonb, %s, %s)",
            (
                merge.id,
                merge.tenant,
                merge.surviving_customer,
                list(merge.merged_customers),
                _json([[origin, i.kind, i.value, i.verified] for origin, i in merge.identities]),
                _json([list(t) for t in merge.threads]),
                _json(dict(merge.evidence)),
                merge.created_at,
                merge.undone_at,
            ),
        )

    def get_merge(self, merge_id: str) -> MergeRecord | None:
        row = self._conn.execute(
            f"SELECT {_MERGE_COLUMNS} FROM customer_merges WHERE id = %s",  # noqa: S608
            (merge_id,),
        ).fetchone()
        return _merge(row) if row is not None else None

    def mark_merge_undone(self, merge_id: str, at: datetime) -> None:
        self._conn.execute("UPDATE customer_merges SET undone_at = %s WHERE id = %s", (at, merge_id))

    def customer_merges(self, customer_id: str) -> list[MergeRecord]:
        rows = self._conn.execute(
            f"SELECT {_MERGE_COLUMNS} FROM customer_merges"  # noqa: S608
            " WHERE surviving_customer = %s OR merged_customers @> ARRAY[%s]::text[]"
            ' ORDER BY created_at, id COLLATE "C"',
            (customer_id, customer_id),
        ).fetchall()
        return [_merge(r) for r in rows]

    def add_claimed_link(self, link: ClaimedLink) -> None:
        self._conn.execute(
            "INSERT INTO claimed_links (id, tenant, customer_id, other_customer_id, identities, message_id,"
            " created_at) VALUES (%s, %s, %s, %s, %s::jsonb, %s, %s)",
            (
                link.id,
                link.tenant,
                link.customer_id,
                link.other_customer_id,
                _json(_identity_list(link.identities)),
                link.message_id,
                link.created_at,
            ),
        )

    def claimed_links(self, customer_id: str) -> list[ClaimedLink]:
        rows = self._conn.execute(
            f"SELECT {_LINK_COLUMNS} FROM claimed_links"  # noqa: S608
            ' WHERE customer_id = %s OR other_customer_id = %s ORDER BY created_at, id COLLATE "C"',
            (customer_id, customer_id),
        ).fetchall()
        return [_link(r) for r in rows]

    # -- threads -------------------------------------------------------------------------------

    def find_open_thread(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads"  # noqa: S608
            " WHERE customer_id = %s AND tenant = %s AND inbox = %s AND status = 'open'"
            " AND last_activity >= %s ORDER BY last_activity DESC LIMIT 1",
            (customer_id, tenant, inbox, active_since),
        ).fetchone()
        return _thread(row) if row is not None else None

    def open_threads(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> list[ThreadRecord]:
        rows = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads"  # noqa: S608
            " WHERE customer_id = %s AND tenant = %s AND inbox = %s AND status = 'open'"
            " AND last_activity >= %s ORDER BY number",
            (customer_id, tenant, inbox, active_since),
        ).fetchall()
        return [_thread(r) for r in rows]

    def get_thread(self, thread_id: str) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE id = %s",  # noqa: S608
            (thread_id,),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_successor(self, thread_id: str) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE previous_id = %s"  # noqa: S608
            " ORDER BY number DESC LIMIT 1",
            (thread_id,),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_thread_by_number(self, tenant: str, number: int) -> ThreadRecord | None:
        row = self._conn.execute(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE tenant = %s AND number = %s",  # noqa: S608
            (tenant, number),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_thread_by_rfc822(self, tenant: str, rfc822_message_id: str) -> ThreadRecord | None:
        columns = ", ".join(f"t.{c.strip()}" for c in _THREAD_COLUMNS.split(","))
        row = self._conn.execute(
            f"SELECT {columns} FROM messages m JOIN threads t ON t.id = m.thread_id"  # noqa: S608
            " WHERE m.rfc822_message_id = %s AND t.tenant = %s ORDER BY m.received_at DESC LIMIT 1",
            (rfc822_message_id, tenant),
        ).fetchone()
        return _thread(row) if row is not None else None

    def find_thread_by_key(self, tenant: str, channel: str, inbox: str, key: str) -> ThreadRecord | None:
        columns = ", ".join(f"t.{c.strip()}" for c in _THREAD_COLUMNS.split(","))
        row = self._conn.execute(
            f"SELECT {columns} FROM thread_keys k JOIN threads t ON t.id = k.thread_id"  # noqa: S608
            " WHERE k.tenant = %s AND k.channel = %s AND k.inbox = %s AND k.key = %s",
            (tenant, channel, inbox, key),
        ).fetchone()
        return _thread(row) if row is not None else None

    def add_thread_key(
        self, tenant: str, channel: str, inbox: str, key: str, thread_id: str, now: datetime
    ) -> None:
        self._conn.execute(
            "INSERT INTO thread_keys (tenant, channel, inbox, key, thread_id, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (tenant, channel, inbox, key, thread_id, now),
        )

    def customer_thread_ids(self, customer_id: str) -> list[str]:
        rows = self._conn.execute(
            "SELECT id FROM threads WHERE customer_id = %s ORDER BY number", (customer_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def move_threads(self, thread_ids: Sequence[str], to_customer: str) -> None:
        if thread_ids:
            self._conn.execute(
                "UPDATE threads SET customer_id = %s WHERE id = ANY(%s)", (to_customer, list(thread_ids))
            )

    def next_thread_number(self, tenant: str) -> int:
        row = self._conn.execute(
            "INSERT INTO tenant_counters (tenant, next_thread_number) VALUES (%s, 2)"
            " ON CONFLICT (tenant) DO UPDATE"
            " SET next_thread_number = tenant_counters.next_thread_number + 1"
            " RETURNING next_thread_number - 1",
            (tenant,),
        ).fetchone()
        assert row is not None
        return int(row[0])

    def create_thread(self, thread: ThreadRecord) -> None:
        self._conn.execute(
            "INSERT INTO threads (id, tenant, inbox, customer_id, subject, status, number, last_activity,"
            " next_sequence, merged_into, previous_id, created_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, 1, %s, %s, %s)",
            (
                thread.id,
                thread.tenant,
                thread.inbox,
                thread.customer_id,
                thread.subject,
                "open" if thread.open else "closed",
                thread.number,
                thread.last_activity,
                thread.merged_into,
                thread.previous_id,
                thread.last_activity,
            ),
        )

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        # The UPDATE locks the row until commit: a concurrent advance waits, then sees this one.
        row = self._conn.execute(
            "UPDATE threads SET next_sequence = next_sequence + 1,"
            " last_activity = greatest(last_activity, %s) WHERE id = %s RETURNING next_sequence - 1",
            (now, thread_id),
        ).fetchone()
        if row is None:
            raise StoreError(f"unknown thread {thread_id!r}")
        return int(row[0])

    def set_thread_status(self, thread_id: str, open: bool, at: datetime) -> bool:
        row = self._conn.execute(
            "SELECT merged_into FROM threads WHERE id = %s FOR UPDATE", (thread_id,)
        ).fetchone()
        if row is None:
            return False
        if row[0] is not None:
            return True  # a merged thread stays merged and closed
        if open:
            self._conn.execute(
                "UPDATE threads SET status = 'open', last_activity = greatest(last_activity, %s)"
                " WHERE id = %s",
                (at, thread_id),
            )
        else:
            self._conn.execute("UPDATE threads SET status = 'closed' WHERE id = %s", (thread_id,))
        return True

    def merge_thread(self, thread_id: str, into: str, now: datetime) -> None:
        self._conn.execute(
            "UPDATE threads SET status = 'closed', merged_into = %s WHERE id = %s", (into, thread_id)
        )

    # -- messages ------------------------------------------------------------------------------

    def add_message(self, message: MessageRecord) -> None:
        self._conn.execute(
            "INSERT INTO messages (message_id, thread_id, customer_id, sequence, channel, external_id,"
            " rfc822_message_id, received_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
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
                message.received_at,
            ),
        )

    def recent_texts(self, customer_id: str, since: datetime, *, not_channel: str) -> list[RecentText]:
        rows = self._conn.execute(
            "SELECT message_id, thread_id, channel, text, at FROM recent_texts"
            " WHERE customer_id = %s AND at >= %s AND channel <> %s"
            " ORDER BY at DESC, message_id DESC LIMIT %s",
            (customer_id, since, not_channel, RECENT_TEXTS_KEPT),
        ).fetchall()
        return [
            RecentText(customer_id=customer_id, message_id=m, thread_id=t, channel=c, text=text, at=_utc(at))
            for m, t, c, text, at in rows
        ]

    def add_recent_text(self, text: RecentText) -> None:
        # One round trip; the DELETE sees the snapshot from before the INSERT (the new row is newer),
        # so the channel keeps RECENT_TEXTS_KEPT - 1 older rows. Only the newest RECENT_TEXTS_KEPT
        # of a channel can ever be returned: without the cap, a customer busy on one channel made
        # recent_texts read every one of them for each message.
        self._conn.execute(
            "WITH capped AS (DELETE FROM recent_texts WHERE customer_id = %s AND channel = %s AND at < ("
            "SELECT at FROM recent_texts WHERE customer_id = %s AND channel = %s"
            " ORDER BY at DESC LIMIT 1 OFFSET %s))"
            " INSERT INTO recent_texts (customer_id, message_id, thread_id, channel, text, at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                text.customer_id,
                text.channel,
                text.customer_id,
                text.channel,
                RECENT_TEXTS_KEPT - 2,
                text.customer_id,
                text.message_id,
                text.thread_id,
                text.channel,
                text.text,
                text.at,
            ),
        )


def _insert_events(conn: Conn, events: Sequence[Event], now: datetime) -> None:
    if not events:
        return
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO outbox (event_id, type, routing_key, tenant, channel, thread_id, sequence, body,"
            " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [
                (
                    e.event_id,
                    e.type,
                    e.routing_key,
                    e.tenant,
                    e.channel,
                    e.thread_id,
                    e.sequence,
                    e.body,
                    now,
                )
                for e in events
            ],
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
        received_at=_utc(row[7]),
        replayed_at=_utc(row[8]) if row[8] is not None else None,
        replay_result=row[9],
    )


_QUARANTINE_COLUMNS = (
    "id, tenant, channel, inbox, reason, raw_ref, size, received_at, replayed_at, replay_result"
)
_MEDIA_COLUMNS = (
    "key, channel, inbox, account, ref, kind, state, attempts, next_attempt_at, sha256, size, content_type,"
    " name, error, created_at"
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
        next_attempt_at=_utc(row[8]) if row[8] is not None else None,
        sha256=row[9],
        size=row[10],
        content_type=row[11],
        name=row[12],
        error=row[13],
        created_at=_utc(row[14]),
    )


_RETRYABLE_TX = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


class PostgresStore:
    """:class:`gateway.store.base.Store` on PostgreSQL (+ a shared blob directory), for several instances."""

    def __init__(self, settings: StoreSettings, outbox: OutboxSettings, *, clock: Clock = _utcnow) -> None:
        if settings.dsn is None:
            raise ValueError("the PostgreSQL store needs store.dsn")
        self._settings = settings
        self._outbox = outbox
        self._clock = clock
        self._dsn = settings.dsn.get_secret_value()
        self._blobs = BlobDir(settings.blob_dir)
        self._pool: ConnectionPool[Conn] | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        # The relay lease lives on its own connection, used only from the one lease thread.
        self._lease_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._lease_conn: Conn | None = None
        self._lease_held = False
        self._lease_next_try = 0.0
        # Set after commits that add events; one task turns each burst of them into one NOTIFY.
        self._committed: asyncio.Event | None = None
        self._notifier: asyncio.Task[None] | None = None
        self._open = False
        self._disk_lock = threading.Lock()
        self._disk_checked_at = -_DISK_CHECK_INTERVAL
        self._disk_low = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        await asyncio.to_thread(self._blobs.ensure)
        pool: ConnectionPool[Conn] = ConnectionPool(
            self._dsn,
            min_size=2,
            max_size=POOL_SIZE,
            kwargs={
                "autocommit": True,
                "connect_timeout": _CONNECT_TIMEOUT,
                "application_name": "ticketgate",
            },
            configure=_configure,
            open=False,
            name="ticketgate-store",
        )
        try:
            await asyncio.to_thread(pool.open, True, _OPEN_TIMEOUT)
            await asyncio.to_thread(self._migrate, pool)
        except (PoolTimeout, psycopg.Error) as exc:
            await asyncio.to_thread(pool.close)
            raise StoreError(f"cannot open the PostgreSQL store: {exc}") from exc
        self._pool = pool
        self._workers = concurrent.futures.ThreadPoolExecutor(
            max_workers=POOL_SIZE, thread_name_prefix="tg-pg-store"
        )
        self._lease_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tg-pg-lease"
        )
        self._lease_next_try = 0.0
        self._committed = asyncio.Event()
        self._notifier = asyncio.create_task(self._notify_commits(self._committed), name="tg-pg-notify")
        self._open = True
        logger.info("PostgreSQL store open (schema version %d)", len(MIGRATIONS))

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        notifier, self._notifier, self._committed = self._notifier, None, None
        if notifier is not None:
            notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await notifier
        pool, workers, lease = self._pool, self._workers, self._lease_thread
        self._pool = self._workers = self._lease_thread = None
        if lease is not None:
            await asyncio.get_running_loop().run_in_executor(lease, self._drop_lease)
            lease.shutdown(wait=True)
        if workers is not None:
            await asyncio.to_thread(workers.shutdown, True)
        if pool is not None:
            await asyncio.to_thread(pool.close)

    @staticmethod
    def _migrate(pool: ConnectionPool[Conn]) -> None:
        """Apply missing migrations in one transaction, serialised across starting instances."""
        with pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            current = int(row[0]) if row is not None else 0
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"database schema version {current} is newer than this ticketgate ({len(MIGRATIONS)})"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                conn.execute(MIGRATIONS[version - 1])
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                logger.info("store schema migrated to version %d", version)

    # -- running transactions ------------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        if not self._open or self._workers is None:
            raise StoreError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn)

    def _transact(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in one transaction on a pooled connection; a deadlock victim runs again."""
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed")
        for attempt in range(1, _TX_ATTEMPTS + 1):
            try:
                with pool.connection() as conn, conn.transaction():
                    return fn(conn)
            except _RETRYABLE_TX as exc:
                if attempt == _TX_ATTEMPTS:
                    raise StoreError(f"store write failed after {attempt} attempts: {exc}") from exc
                logger.debug("transaction retried after %s", exc.__class__.__name__)
                time.sleep(random.uniform(0, 0.005 * attempt))  # noqa: S311 - jitter, not crypto
            except psycopg.Error as exc:
                raise StoreError(f"store write failed: {exc}") from exc
            except PoolTimeout as exc:
                raise StoreError(f"no database connection: {exc}") from exc
        raise AssertionError("unreachable")

    async def _write(self, fn: Callable[[Conn], T]) -> T:
        return await self._run(lambda: self._transact(fn))

    async def _write_events(self, fn: Callable[[Conn], T]) -> T:
        """A write that may add outbox events: once it committed, every listening relay hears of it."""
        value = await self._write(fn)
        if self._committed is not None:
            self._committed.set()
        return value

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        def run() -> T:
            pool = self._pool
            if pool is None:
                raise StoreError("store is closed")
            try:
                with pool.connection() as conn:
                    return fn(conn)
            except psycopg.Error as exc:
                raise StoreError(f"read failed: {exc}") from exc
            except PoolTimeout as exc:
                raise StoreError(f"no database connection: {exc}") from exc

        return await self._run(run)

    # -- backlog bound -------------------------------------------------------------------------

    def _add_backlog(self, conn: Conn, rows: int, *, bounded: bool) -> None:
        """Count ``rows`` new unpublished events; refuse (rolling back) when they cross the bound."""
        if not rows:
            return
        slot = random.randrange(BACKLOG_SLOTS)  # noqa: S311 - load spreading, not crypto
        row = conn.execute(
            "WITH mine AS (UPDATE outbox_backlog SET unpublished = unpublished + %s WHERE slot = %s"
            " RETURNING unpublished)"
            " SELECT (SELECT unpublished FROM mine)"
            " + (SELECT coalesce(sum(unpublished), 0) FROM outbox_backlog WHERE slot <> %s)",
            (rows, slot, slot),
        ).fetchone()
        total = int(row[0]) if row is not None and row[0] is not None else 0
        if bounded and total > self._outbox.max_backlog:
            raise BacklogFull(
                f"outbox holds {total - rows} unpublished events (max_backlog {self._outbox.max_backlog})",
                retry_after=self._outbox.retry_after,
            )

    def _check_disk(self) -> None:
        if self._disk_is_low():
            raise BacklogFull(
                f"less than {self._settings.min_free_disk_mb} MB free under {self._settings.blob_dir}",
                retry_after=self._outbox.retry_after,
            )

    def _disk_is_low(self) -> bool:
        with self._disk_lock:
            now = time.monotonic()
            if now - self._disk_checked_at >= _DISK_CHECK_INTERVAL:
                free = self._blobs.free_bytes()
                self._disk_low = free < self._settings.min_free_disk_mb * 1024 * 1024
                self._disk_checked_at = now
            return self._disk_low

    # -- archiving -----------------------------------------------------------------------------

    @staticmethod
    def _archive_inline(conn: Conn, data: bytes, now: datetime) -> None:
        conn.execute(
            "INSERT INTO raw_archive (sha256, data, created_at) VALUES (%s, %s, %s)"
            " ON CONFLICT (sha256) DO NOTHING",
            (sha256_hex(data), data, now),
        )

    @staticmethod
    def _index_files(conn: Conn, files: Sequence[tuple[str, int]], now: datetime) -> None:
        if not files:
            return
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO blob_files (sha256, size, created_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (sha256) DO NOTHING",
                [(digest, size, now) for digest, size in files],
            )

    def _write_files(self, raw: bytes | None, attachments: Sequence[bytes]) -> list[tuple[str, int]]:
        return [
            (self._blobs.put(data), len(data))
            for data in ([raw] if raw is not None else []) + list(attachments)
        ]

    async def _prepare_blobs(self, body: bytes, attachments: Sequence[bytes]) -> list[tuple[str, int]]:
        inline = len(body) <= self._settings.inline_raw_max
        if inline and not attachments:
            return []
        return await asyncio.to_thread(self._write_files, None if inline else body, attachments)

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
        files = await self._prepare_blobs(envelope.body, [a.data for m in messages for a in m.attachments])
        body_inline = len(envelope.body) <= self._settings.inline_raw_max
        ref = raw_ref(sha256_hex(envelope.body))

        def job(conn: Conn) -> list[Placement]:
            now = self._clock()
            if body_inline:
                self._archive_inline(conn, envelope.body, now)
            self._index_files(conn, files, now)
            tx = PostgresTx(conn)
            placements: list[Placement] = []
            events: list[Event] = []
            for message, policy in zip(messages, policies, strict=True):
                placed = place(tx, message, policy, now=now)
                # Merge events first: a desk learns of the merged thread before the message on it.
                events.extend(placed.events)
                if placed.customer is not None:
                    events.append(
                        build_event(message, placed.placement, placed.customer, placed.thread_subject, ref)
                    )
                placements.append(placed.placement)
            _insert_events(conn, events, now)
            self._add_backlog(conn, len(events), bounded=True)
            return placements

        return await self._write_events(job)

    async def quarantine(self, envelope: RawEnvelope, reason: str) -> QuarantineRecord:
        self._check_disk()
        files = await self._prepare_blobs(envelope.body, ())
        body_inline = len(envelope.body) <= self._settings.inline_raw_max
        record = QuarantineRecord(
            id=new_id("qua"),
            tenant=envelope.tenant,
            channel=envelope.channel,
            inbox=envelope.inbox,
            reason=reason,
            raw_ref=raw_ref(sha256_hex(envelope.body)),
            size=len(envelope.body),
            received_at=_utc(envelope.received_at),
        )
        headers = orjson.dumps(dict(envelope.headers)).decode()
        meta = orjson.dumps(dict(envelope.meta), default=str).decode()

        def job(conn: Conn) -> QuarantineRecord:
            now = self._clock()
            if body_inline:
                self._archive_inline(conn, envelope.body, now)
            self._index_files(conn, files, now)
            conn.execute(
                "INSERT INTO quarantine (id, tenant, channel, inbox, reason, raw_ref, size, received_at,"
                " content_type, headers, meta, signature_verified, retry, remote, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    record.id,
                    record.tenant,
                    record.channel,
                    record.inbox,
                    record.reason,
                    record.raw_ref,
                    record.size,
                    record.received_at,
                    envelope.content_type,
                    headers,
                    meta,
                    envelope.signature_verified,
                    envelope.retry,
                    envelope.remote,
                    now,
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
            _insert_events(conn, [event], now)
            self._add_backlog(conn, 1, bounded=True)
            return record

        return await self._write_events(job)

    async def transact(self, work: TxWork[T]) -> T:
        # Not bounded by max_backlog: desk and control operations record decisions already made.
        def job(conn: Conn) -> T:
            now = self._clock()
            value, events = work(PostgresTx(conn), now)
            _insert_events(conn, events, now)
            self._add_backlog(conn, len(events), bounded=False)
            return value

        return await self._write_events(job)

    async def enqueue(self, events: Sequence[Event]) -> None:
        # Not bounded by max_backlog: these record state changes already made (merges, control).
        def job(conn: Conn) -> None:
            _insert_events(conn, events, self._clock())
            self._add_backlog(conn, len(events), bounded=False)

        if events:
            await self._write_events(job)

    async def outbox_mark_published(self, positions: Sequence[int]) -> None:
        def job(conn: Conn) -> None:
            cur = conn.execute(
                "UPDATE outbox SET published_at = %s WHERE position = ANY(%s) AND published_at IS NULL",
                (self._clock(), list(positions)),
            )
            published = max(cur.rowcount, 0)
            if not published:
                return
            conn.execute(
                "UPDATE outbox_backlog SET unpublished = unpublished - %s WHERE slot = %s",
                (published, random.randrange(BACKLOG_SLOTS)),  # noqa: S311
            )
            conn.execute(
                "INSERT INTO counters (name, value) VALUES ('published_total', %s)"
                " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
                (published,),
            )

        if positions:
            await self._write(job)

    async def quarantine_mark_replayed(self, quarantine_id: str, result: str) -> None:
        def job(conn: Conn) -> None:
            conn.execute(
                "UPDATE quarantine SET replayed_at = %s, replay_result = %s WHERE id = %s",
                (self._clock(), result, quarantine_id),
            )

        await self._write(job)

    async def purge_expired(self, now: datetime) -> int:
        """Drop idempotency keys past the retention, and published outbox rows just as old."""
        cutoff = _utc(now) - timedelta(seconds=self._settings.idempotency_retention)

        def job(conn: Conn) -> int:
            purged = conn.execute("DELETE FROM idempotency_keys WHERE created_at < %s", (cutoff,)).rowcount
            conn.execute("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < %s", (cutoff,))
            return max(purged, 0)

        return await self._write(job)

    async def purge_recent_texts(self, before: datetime, limit: int = 500) -> int:
        def job(conn: Conn) -> int:
            deleted = conn.execute(
                "DELETE FROM recent_texts WHERE ctid IN ("
                "SELECT ctid FROM recent_texts WHERE at < %s ORDER BY at LIMIT %s)",
                (_utc(before), limit),
            ).rowcount
            return max(deleted, 0)

        return await self._write(job)

    async def state_put(self, key: str, value: bytes) -> None:
        def job(conn: Conn) -> None:
            conn.execute(
                "INSERT INTO state (key, value, updated_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
                (key, value, self._clock()),
            )

        await self._write(job)

    async def state_cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        def job(conn: Conn) -> bool:
            if expected is None:
                cur = conn.execute(
                    "INSERT INTO state (key, value, updated_at) VALUES (%s, %s, %s)"
                    " ON CONFLICT (key) DO NOTHING",
                    (key, value, self._clock()),
                )
            else:
                cur = conn.execute(
                    "UPDATE state SET value = %s, updated_at = %s WHERE key = %s AND value = %s",
                    (value, self._clock(), key, expected),
                )
            return cur.rowcount == 1

        return await self._write(job)

    async def state_get(self, key: str) -> bytes | None:
        def read(conn: Conn) -> bytes | None:
            row = conn.execute("SELECT value FROM state WHERE key = %s", (key,)).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._read(read)

    # -- media fetch queue (see Store.media_*) --------------------------------------------------

    async def media_enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        rows = [
            (
                f.key,
                f.channel,
                f.inbox,
                f.account,
                f.ref,
                f.kind,
                f.name,
                f.content_type,
                _utc(f.next_attempt_at or f.created_at),
                _utc(f.created_at),
            )
            for f in fetches
        ]

        def job(conn: Conn) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO media (key, channel, inbox, account, ref, kind, name, content_type,"
                    " next_attempt_at, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (key) DO NOTHING",
                    rows,
                )

        if rows:
            await self._write(job)

    async def media_claim(self, now: datetime, limit: int, lease: float, *, channel: str) -> list[MediaFetch]:
        def job(conn: Conn) -> list[MediaFetch]:
            # SKIP LOCKED: fetchers on other instances claim other rows instead of waiting here.
            rows = conn.execute(
                f"UPDATE media SET attempts = attempts + 1, next_attempt_at = %s WHERE key IN"  # noqa: S608
                " (SELECT key FROM media WHERE state = 'pending' AND channel = %s AND next_attempt_at <= %s"
                " ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_MEDIA_COLUMNS}",
                (_utc(now) + timedelta(seconds=lease), channel, _utc(now), limit),
            ).fetchall()
            return sorted((_media_record(r) for r in rows), key=lambda f: (f.created_at, f.key))

        return await self._write(job)

    async def media_done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        digest = await asyncio.to_thread(self._blobs.put, data)

        def job(conn: Conn) -> None:
            self._index_files(conn, [(digest, len(data))], self._clock())
            conn.execute(
                "UPDATE media SET state = 'done', sha256 = %s, size = %s, content_type = %s, name = %s,"
                " error = NULL, next_attempt_at = NULL WHERE key = %s",
                (digest, len(data), content_type, name, key),
            )

        await self._write(job)
        return digest

    async def media_failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        def job(conn: Conn) -> None:
            conn.execute(
                "UPDATE media SET state = %s, error = %s, next_attempt_at = %s"
                " WHERE key = %s AND state = 'pending'",
                (
                    "pending" if retry_at else "failed",
                    error[:500],
                    _utc(retry_at) if retry_at else None,
                    key,
                ),
            )

        await self._write(job)

    async def media_get(self, key: str) -> MediaFetch | None:
        def read(conn: Conn) -> MediaFetch | None:
            row = conn.execute(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE key = %s", (key,)).fetchone()  # noqa: S608
            return _media_record(row) if row is not None else None

        return await self._read(read)

    async def ping(self) -> None:
        if self._disk_is_low():
            raise BacklogFull("free disk below store.min_free_disk_mb", retry_after=self._outbox.retry_after)

        def job(conn: Conn) -> None:
            # A write, so a read-only standby or a full disk makes the instance unready.
            conn.execute("UPDATE counters SET value = value WHERE name = 'ping'")

        await self._write(job)

    # -- the relay lease and the outbox --------------------------------------------------------

    @property
    def relay_lease_held(self) -> bool:
        """Whether this instance's relay is the one publishing (others stand by)."""
        return self._lease_held

    def _drop_lease(self) -> None:
        conn, self._lease_conn, self._lease_held = self._lease_conn, None, False
        if conn is not None:
            conn.close()  # the server releases the session lock with the session

    def _leader_conn(self) -> Conn | None:
        """On the lease thread: the lease connection while this instance holds the lease."""
        if self._lease_held and self._lease_conn is not None and not self._lease_conn.closed:
            return self._lease_conn
        self._lease_held = False
        now = time.monotonic()
        if now < self._lease_next_try:
            return None
        self._lease_next_try = now + _LEASE_RETRY
        try:
            if self._lease_conn is None or self._lease_conn.closed:
                self._lease_conn = psycopg.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=_CONNECT_TIMEOUT,
                    # Names the instance holding the lease in pg_stat_activity (see docs/operations.md).
                    application_name=f"ticketgate-relay {socket.gethostname()} pid={os.getpid()}"[:63],
                )
                _configure(self._lease_conn)
            row = self._lease_conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LEASE_LOCK,)).fetchone()
        except psycopg.Error as exc:
            self._drop_lease()
            raise StoreError(f"relay lease: {exc}") from exc
        self._lease_held = bool(row and row[0])
        if self._lease_held:
            logger.info("this instance holds the outbox relay lease")
            return self._lease_conn
        return None

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        """Unpublished events in outbox order, for the instance holding the relay lease only.

        Read on the lease connection itself: if that session ended (and with it the lease, which
        another instance may now hold), the read fails instead of handing out rows twice.
        """

        def fetch() -> list[OutboxRow]:
            conn = self._leader_conn()
            if conn is None:
                return []
            try:
                rows = conn.execute(
                    "SELECT position, event_id, type, routing_key, tenant, channel, thread_id, sequence,"
                    " body, created_at FROM outbox WHERE published_at IS NULL AND position > %s"
                    " ORDER BY position LIMIT %s",
                    (after, limit),
                ).fetchall()
            except psycopg.Error as exc:
                self._drop_lease()
                raise StoreError(f"outbox read failed (relay lease dropped): {exc}") from exc
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
                    created_at=_utc(r[9]),
                )
                for r in rows
            ]

        if not self._open or self._lease_thread is None:
            raise StoreError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._lease_thread, fetch)

    async def outbox_status(self) -> OutboxStatus:
        def read(conn: Conn) -> OutboxStatus:
            backlog = conn.execute("SELECT coalesce(sum(unpublished), 0) FROM outbox_backlog").fetchone()
            oldest = conn.execute(
                "SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT 1"
            ).fetchone()
            total = conn.execute("SELECT value FROM counters WHERE name = 'published_total'").fetchone()
            return OutboxStatus(
                backlog=int(backlog[0]) if backlog is not None else 0,
                oldest_created_at=_utc(oldest[0]) if oldest is not None else None,
                published_total=int(total[0]) if total is not None else 0,
            )

        return await self._read(read)

    # -- wake-ups across instances (LISTEN/NOTIFY) ----------------------------------------------

    async def _notify_commits(self, committed: asyncio.Event) -> None:
        """After commits that added events, NOTIFY :data:`OUTBOX_CHANNEL`: one notification per burst.

        Not sent inside the writing transactions: a transaction that notifies holds a cluster-wide
        lock from its commit until its commit record is flushed, so notifying writes would commit one
        at a time instead of sharing WAL flushes. This transaction of its own skips the flush
        (a notification lost in a crash costs a poll, nothing more), so it holds that lock only
        briefly, and it covers every commit made while the previous one was being sent.
        """
        while True:
            await committed.wait()
            committed.clear()
            try:
                await self._write(_notify_outbox)
            except StoreError as exc:
                logger.debug("outbox notification not sent (relays poll): %s", exc)

    async def outbox_listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` when any instance commits outbox events; runs until cancelled (by the relay).

        LISTEN on a dedicated connection. Notifications are hints and the relay keeps polling, so a
        lost connection costs latency, never events: it is opened again with backoff, and ``wake``
        is called once listening (again), for what was committed meanwhile. A standby is woken only
        when it may try for the relay lease, the holder on every notification.
        """
        delay = _LISTEN_RETRY
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=_CONNECT_TIMEOUT,
                    application_name=f"ticketgate-listen {socket.gethostname()} pid={os.getpid()}"[:63],
                    # An idle listener would not notice a silently dead peer otherwise.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
                async with conn:
                    await conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
                    if delay > _LISTEN_RETRY:
                        logger.info("listening for outbox commits again")
                    delay = _LISTEN_RETRY
                    wake()
                    async for _ in conn.notifies():
                        if self._lease_held or time.monotonic() >= self._lease_next_try:
                            wake()
            except Exception as exc:  # never fatal: the relay polls until the connection is back
                if delay == _LISTEN_RETRY:
                    logger.warning(
                        "outbox LISTEN connection failed, the relay polls until it is back: %s",
                        exc,
                        exc_info=not isinstance(exc, psycopg.Error),
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _LISTEN_RETRY_MAX)

    # -- reads ---------------------------------------------------------------------------------

    async def quarantine_list(self, limit: int = 100) -> list[QuarantineRecord]:
        def read(conn: Conn) -> list[QuarantineRecord]:
            rows = conn.execute(
                f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine ORDER BY created_at DESC, id DESC LIMIT %s",  # noqa: S608
                (limit,),
            ).fetchall()
            return [_quarantine_record(r) for r in rows]

        return await self._read(read)

    async def quarantine_get(self, quarantine_id: str) -> tuple[QuarantineRecord, RawEnvelope] | None:
        def read(conn: Conn) -> tuple[QuarantineRecord, RawEnvelope] | None:
            row = conn.execute(
                f"SELECT {_QUARANTINE_COLUMNS}, content_type, headers, meta, signature_verified, retry,"  # noqa: S608
                " remote FROM quarantine WHERE id = %s",
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

    def _read_blob(self, conn: Conn, sha256: str) -> bytes | None:
        row = conn.execute("SELECT data FROM raw_archive WHERE sha256 = %s", (sha256,)).fetchone()
        if row is not None:
            return bytes(row[0])
        return self._blobs.get(sha256)


def _notify_outbox(conn: Conn) -> None:
    conn.execute("SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, '')", (OUTBOX_CHANNEL,))


def _configure(conn: Conn) -> None:
    """Every session reads and writes timestamps in UTC."""
    conn.execute("SET TIME ZONE 'UTC'")
