"""The shared store: PostgreSQL, so several gateway instances can take any message.

The placement engine (:mod:`dedupe.engine`) is synchronous and runs against :class:`dedupe.tx.Tx`,
so this store runs the very same engine as the SQLite store: every write is one transaction on a
pooled psycopg 3 connection, executed on a bounded pool of worker threads. Placements (``accept``)
are grouped: the jobs waiting when a group starts run in one transaction, with their statements
pipelined (libpq pipeline mode: a round trip per read, not per statement), so a burst of messages
costs one commit, one WAL flush and one NOTIFY, and one hand-off to a worker thread
(``_group_placements``). Should a job fail, the group is rolled back and runs again with each job
under a savepoint of its own, so the failing job alone is rolled back (``_run_group``).

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
  previous one wrote. A group of placements takes the identity locks of all its messages first,
  in one global order (the lock keys, sorted), then row-locks the customers owning them, so its
  jobs wait for no lock another group holds while holding one that group waits for; a job then
  takes no lock the group holds, and reads an owner's row as the group locked it (``PostgresTx``).
  A transaction (or group) PostgreSQL picks as a deadlock victim (possible when a merge or a concurrent
  identity move makes a job lock a customer its group did not lock first) is rolled back and run
  again.
- ``advance_thread`` updates the thread row (a row lock held to commit), so sequences are strictly
  increasing without gaps, and a later message of a thread gets a later outbox position. (A thread
  created by the same transaction, unseen by others, starts at 1 without reading it back.)
- The outbox relay runs on one instance at a time: the holder of a session advisory lock (the
  *relay lease*) on a dedicated connection. ``SKIP LOCKED`` alone would let two relays each take
  a batch and publish them concurrently, so event 5 of a thread could reach the bus after event 6.
  Others stand by and take the lease over when its connection ends (crash, shutdown).
- Relays learn of events committed on other instances through LISTEN/NOTIFY on
  ``OUTBOX_CHANNEL``: after such commits each instance sends a NOTIFY (one per burst, in a
  transaction of its own: see ``_notify_commits``), and the relay listens on a dedicated connection
  (``outbox_listen``). Polling stays the fallback, so a lost notification costs latency only.
- The backlog bound is read from counter rows maintained in the accept transaction (a group reads
  them once and adds its events once). The rows are spread over slots so concurrent commits do not
  queue on one hot row; the bound can therefore be overshot by at most the events of the
  transactions and groups committing at that moment on other instances, never more.

Blobs: raw bodies up to ``inline_raw_max`` live in the database (same commit); larger bodies and
attachments are content-addressed files under ``blob_dir``, written durably before the commit that
references them. With several instances ``blob_dir`` must be one shared directory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import psycopg
import psycopg.errors
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from core.errors import BacklogFull, StoreError
from core.model import CanonicalMessage, Identity, Placement
from core.settings import OutboxSettings, StoreSettings
from dedupe.identities import normalize_all
from dedupe.tx import RECENT_TEXTS_KEPT, CustomerRecord, StoredIdentity, ThreadReads, ThreadRecord
from gateway.store.base import OutboxRow, OutboxStatus
from gateway.store.engine import (
    CUSTOMER_IDENTITIES,
    OPEN_THREADS,
    RECENT_TEXT_CAP,
    RECENT_TEXT_INSERT,
    RECENT_TEXTS,
    CachedThreadReads,
    Clock,
    Connection,
    Cursor,
    Dialect,
    Key,
    Keys,
    Owners,
    SqlStore,
    SqlTx,
    as_store_error,
    identity_records,
    outbox_rows,
    recent_text_records,
    stored_identities,
    thread_record,
    utcnow,
)
from gateway.store.erase import erased_key
from gateway.store.schema import migrations

logger = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.Connection[TupleRow]

POOL_SIZE = 8  # connections (and worker threads) per instance; mind max_connections
BACKLOG_SLOTS = 64  # counter rows the unpublished-event count is spread over (created by migration 1)
_OPEN_TIMEOUT = 10.0  # seconds open() waits for the first connections
_CONNECT_TIMEOUT = 5  # seconds per connection attempt
_LEASE_RETRY = 0.5  # seconds a standby waits between attempts to take the relay lease
_TX_ATTEMPTS = 4  # a transaction chosen as a deadlock victim is run again, from the start
# LISTEN/NOTIFY channel on which committed outbox events are announced to every instance's relay.
OUTBOX_CHANNEL = "ticketgate_outbox"
_LISTEN_RETRY = 0.2  # seconds before the first reconnect of a lost LISTEN connection; doubles
_LISTEN_RETRY_MAX = 10.0

# Words of the shared schema (gateway.store.schema), and the columns the first schema here has
# that SQLite's added later.
_DDL = {
    "text": "text",
    "int": "integer",
    "bigint": "bigint",
    "time": "timestamptz",
    "blob": "bytea",
    "bool": "boolean",
    "false": "false",
    "document": "jsonb",
    "serial": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "without_rowid": "",
    "idempotency_keys_later": "\n        duplicate_of text,\n        previous_thread_id text,",
    "customers_later": "\n        merged_into text REFERENCES customers (id),",
    "threads_later": "\n        merged_into text REFERENCES threads (id),"
    "\n        previous_id text REFERENCES threads (id),",
}

# Ordered migrations; ``schema_migrations`` records the versions applied. Append, never edit.
MIGRATIONS: tuple[str, ...] = migrations(
    _DDL,
    (
        """
    {first}
    CREATE INDEX threads_customer ON threads (customer_id);
    CREATE INDEX threads_previous ON threads (previous_id) WHERE previous_id IS NOT NULL;

    -- A channel's own thread key (Slack thread_ts, chat session): the first thread keeps it.
    {thread_keys}

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

    {claimed_links}

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

    {messages}

    {outbox}
    CREATE INDEX outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

    -- Unpublished events, counted in the transactions that add and publish them.
    CREATE TABLE outbox_backlog (
        slot integer PRIMARY KEY,
        unpublished bigint NOT NULL
    );
    -- 64 slots: BACKLOG_SLOTS.
    INSERT INTO outbox_backlog (slot, unpublished) SELECT s, 0 FROM generate_series(0, 63) s;

    {archive}

    {state}

    -- Media announced by committed messages (WeChat media_id), fetched after the answer.
    {media}
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
        # Blob files keep their content type (/blobs serves it).
        """
    {blob_content_type}
    """,
        # What the first delivery of a key said (CanonicalMessage.fingerprint), so a reuse of the
        # key for other content is told from a retry.
        """
    ALTER TABLE idempotency_keys ADD COLUMN fingerprint text;
    """,
        # the way back: reply routes, reply commands and their state, delivery reports.
        """
    {replies}
    """,
        # Retention and erasure (message content links, erased customers, the erasure audit), and
        # the time indexes the retention purge reads oldest first.
        """
    {erasure}
    CREATE INDEX messages_received ON messages (received_at);
    CREATE INDEX raw_archive_created ON raw_archive (created_at);
    """,
        # Reply routes for the messages stored before the reply ledger.
        """
    {reply_routes_backfill}
    """,
        # Mail fallbacks of replies held for a visitor who never came back (gateway.replies).
        """
    ALTER TABLE replies ADD COLUMN fallback_of text;
    CREATE INDEX replies_fallback ON replies (fallback_of) WHERE fallback_of IS NOT NULL;
    """,
    ),
)


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for a namespaced tuple of strings."""
    digest = hashlib.blake2b("\x1f".join(("ticketgate", *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def identity_lock(tenant: str, kind: str, value: str) -> int:
    """The advisory lock key of one identity (see :mod:`dedupe.tx`)."""
    return lock_key("identity", tenant, kind, value)


_MIGRATION_LOCK = lock_key("migrations")
RELAY_LEASE_LOCK = lock_key("relay-lease")


def _utc(moment: datetime) -> datetime:
    """Timezone-aware UTC; naive datetimes are taken as UTC (as the SQLite store does)."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _parsed(value: Any) -> Any:
    return value  # psycopg converts jsonb and arrays itself


def _placeholders(count: int) -> str:
    return ", ".join(["?"] * count)


class PostgresDialect(Dialect):
    """PostgreSQL's SQL: timestamptz, jsonb and text[] columns, lists bound as one array, and the
    locks that keep several writing instances apart (see :mod:`dedupe.tx`)."""

    serialized = False  # other instances write concurrently: re-read what a lock may have changed
    placeholder = "%s"
    words: ClassVar[Mapping[str, str]] = {
        "greatest": "greatest",
        "json": "::jsonb",
        # Byte order, as SQLite sorts: the database's collation may differ between servers.
        "collate": ' COLLATE "C"',
        "for_update": " FOR UPDATE",
        "skip_locked": " FOR UPDATE SKIP LOCKED",
        "each": "= ANY(?)",
        "merges": "customer_merges",
        "merges_of": "surviving_customer = ? OR merged_customers @> ARRAY[?]::text[]",  # GIN-indexed
        "recent_text_key": "ctid",
        "contains": "position(?::bytea IN body) > 0",
    }
    # A write, so a read-only standby or a full disk makes the instance unready.
    ping_sql = "UPDATE counters SET value = value WHERE name = 'ping'"

    ts = staticmethod(_utc)
    dt = staticmethod(_utc)
    load_json = staticmethod(_parsed)
    text_array = staticmethod(_parsed)  # psycopg sends a list as text[]

    def for_each(self, conn: Connection, sql: str, head: Sequence[Any], values: Sequence[Any]) -> int:
        return max(conn.execute(self.sql(sql), (*head, list(values))).rowcount, 0)

    def lock_identities(self, conn: Connection, tenant: str, keys: Keys) -> None:
        # One statement; its output columns are evaluated left to right, so the locks are taken in
        # the order of their keys, the one order every transaction and every group of placements
        # (PostgresStore._run_group) takes them in.
        locks = sorted(identity_lock(tenant, kind, value) for kind, value in keys)
        conn.execute(self.sql("SELECT " + ", ".join(["pg_advisory_xact_lock(?)"] * len(locks))), locks)

    def lock_customers(self, conn: Connection, customer_ids: Sequence[str]) -> None:
        # LockRows runs above the sort: rows are locked in this order, the same in every transaction.
        conn.execute(
            self.sql(
                f"SELECT id FROM customers WHERE id IN ({_placeholders(len(customer_ids))})"  # noqa: S608
                ' ORDER BY id COLLATE "C" FOR UPDATE'
            ),
            list(customer_ids),
        )

    def find_identities(self, conn: Connection, tenant: str, keys: Keys) -> dict[Key, tuple[str, bool]]:
        return self.found_identities(self.send_find_identities(conn, tenant, keys))

    def send_find_identities(self, conn: Connection, tenant: str, keys: Keys) -> Cursor:
        """:meth:`find_identities`'s statement, sent (pipelined: answered with the next read)."""
        # A literal IN list: with a prepared statement it plans as index probes (an unnest() of
        # arrays measured 4x slower here), and one round trip for all of a message's identities.
        pairs = ", ".join(["(?, ?)"] * len(keys))
        return conn.execute(
            self.sql(
                "SELECT kind, value, customer_id, verified FROM identities"  # noqa: S608 - placeholders only
                f" WHERE tenant = ? AND (kind, value) IN ({pairs})"
            ),
            [tenant, *(part for key in keys for part in key)],
        )

    @staticmethod
    def found_identities(sent: Cursor) -> dict[Key, tuple[str, bool]]:
        rows = sent.fetchall()
        return {(kind, value): (customer_id, bool(verified)) for kind, value, customer_id, verified in rows}

    def move_identities(self, conn: Connection, tenant: str, keys: Keys, owners: Owners) -> dict[Key, bool]:
        rows = conn.execute(
            self.sql(
                "UPDATE identities SET customer_id = ? WHERE tenant = ? AND customer_id = ?"
                " AND (kind, value) IN (SELECT * FROM unnest(?::text[], ?::text[]))"
                " RETURNING kind, value, verified"
            ),
            (owners[1], tenant, owners[0], [k for k, _ in keys], [v for _, v in keys]),
        ).fetchall()
        return {(k, v): bool(verified) for k, v, verified in rows}

    def add_recent_text(self, conn: Connection, row: Sequence[Any]) -> None:
        # One round trip; the DELETE sees the snapshot from before the INSERT (the new row is newer),
        # so the channel keeps RECENT_TEXTS_KEPT - 1 older rows.
        customer, channel = row[0], row[1]
        conn.execute(_RECENT_TEXT, (customer, channel, customer, channel, RECENT_TEXTS_KEPT - 2, *row))


POSTGRES = PostgresDialect()
_RECENT_TEXT = POSTGRES.sql(f"WITH capped AS ({RECENT_TEXT_CAP}) {RECENT_TEXT_INSERT}")


class _GroupLocks:
    """What a group transaction locked before its first job (``PostgresStore._run_group``): the
    identity keys of its messages, and the customers owning them, with their rows as locked.

    Held to commit, so a job finds them locked already; a job rolled back to its savepoint gives
    none of them back (they were taken before it). A customer row any job of the group writes is
    read from the database again (that job may have been rolled back, or not).
    """

    def __init__(
        self,
        identities: set[tuple[str, str, str]],
        owners: Any,
        *,
        owned: Any = None,
        keys: Any = None,
    ) -> None:
        self.identities = frozenset(identities)
        self._owners_read = owners  # pipelined: its rows come with the group's first read
        self._owners: dict[str, CustomerRecord] | None = None
        self.written: set[str] = set()
        # Read with the locks when the jobs run together (None: isolated): all identities of the
        # customers owning the group's identities, and which of its idempotency keys (and their
        # tombstones) exist.
        self._owned_read, self._keys_read = owned, keys
        self._found: dict[tuple[str, str, str], tuple[str, bool]] = {}
        self._owned: dict[str, tuple[Identity, ...]] | None = None
        self._keys: set[str] | None = None
        # What a job of the group changed since: identity keys added or marked verified (whose
        # owner a later job reads again), whether identities were moved (all are read again), and
        # the keys claimed (a key twice in a group: the second claim is read, not counted on).
        self.identities_written: set[tuple[str, str, str]] = set()
        self.identities_moved = False
        self.claimed: set[str] = set()
        # Customers a job of the group added identities to, and whether any identity was marked
        # verified (its owner's list is read again).
        self.owners_written: set[str] = set()
        self.verified_marked = False
        # A tenant's next thread number, once a job of the group has read it: the counter row stays
        # locked by the group to its commit, so the numbers after it are known without reading.
        # Forgotten when a job is rolled back to its savepoint (with its lock, maybe).
        self.thread_numbers: dict[str, int] = {}

    def found(self, tenant: str, keys: Sequence[Key]) -> dict[Key, tuple[str, bool]] | None:
        """The owners of these identity keys as read with the group's locks, unless a job of the
        group may have changed them since (then None: read them again)."""
        if self._owned_read is None or self.identities_moved:
            return None
        wanted = [(tenant, *key) for key in keys]
        if any(key in self.identities_written for key in wanted):
            return None
        self._read_owned()
        found = self._found
        return {key[1:]: found[key] for key in wanted if key in found}

    def _read_owned(self) -> dict[str, tuple[Identity, ...]]:
        if self._owned is None:
            rows: dict[str, list[tuple[str, str, bool]]] = {}
            for customer, tenant, kind, value, verified in self._owned_read.fetchall():
                self._found[tenant, kind, value] = (customer, bool(verified))
                rows.setdefault(customer, []).append((kind, value, verified))
            self._owned = {customer: identity_records(owned) for customer, owned in rows.items()}
        return self._owned

    def owned(self, customer_id: str) -> tuple[Identity, ...] | None:
        """The identities of a customer owning one of the group's identities, as read with the
        group's locks, unless a job of the group may have changed them since (then None)."""
        if self._owned_read is None or self.identities_moved or self.verified_marked:
            return None
        if customer_id in self.owners_written:
            return None
        return self._read_owned().get(customer_id)

    def unclaimed(self, key: str) -> bool:
        """Whether neither ``key`` nor its tombstone existed when the group began, nor has a job of
        the group claimed it since."""
        if self._keys_read is None or key in self.claimed:
            return False
        if self._keys is None:
            self._keys = {r[0] for r in self._keys_read.fetchall()}
        return key not in self._keys and erased_key(key) not in self._keys

    def owners(self) -> dict[str, CustomerRecord]:
        if self._owners is None:
            rows = self._owners_read.fetchall() if self._owners_read is not None else []
            self._owners = {
                r[0]: CustomerRecord(id=r[0], tenant=r[1], display_name=r[2], merged_into=r[3]) for r in rows
            }
        return self._owners


class PostgresTx(SqlTx):
    """:class:`dedupe.tx.Tx` over one pooled connection inside an open transaction; within a group
    of placements, what the group locked first is not locked again, nor its customers read again."""

    def __init__(self, conn: Connection, locks: _GroupLocks | None = None) -> None:
        super().__init__(conn, POSTGRES)
        self._locks = locks
        # A lookup of identities sent ahead (prefetch_identities): tenant, keys, its cursor (or
        # what the group read, already).
        self._ahead: tuple[str, list[Key], Cursor | dict[Key, tuple[str, bool]]] | None = None
        # Threads this transaction created and has not advanced yet: the values of their insert.
        self._unadvanced: dict[str, list[Any]] = {}
        # The next sequence of threads read with their rows locked and not advanced since.
        self._sequences: dict[str, int] = {}

    def _held(self, tenant: str, keys: Iterable[Key]) -> bool:
        """Whether the group holds the locks of all these identity keys."""
        return self._locks is not None and all((tenant, *key) in self._locks.identities for key in keys)

    def lock_identities(self, tenant: str, keys: Sequence[tuple[str, str]]) -> None:
        if not self._held(tenant, keys):
            super().lock_identities(tenant, keys)

    def prefetch_identities(self, tenant: str, identities: Sequence[Identity]) -> None:
        # Only under the group's identity locks: none of them can be added meanwhile, and one
        # moved by a merge is caught by the engine's lock-and-read-again as for any read. Read
        # with the group's locks when no job of the group changed them since, else sent now.
        keys = [i.key() for i in identities]
        if keys and self._locks is not None and self._held(tenant, keys):
            found = self._locks.found(tenant, keys)
            self._ahead = (
                tenant,
                keys,
                found if found is not None else POSTGRES.send_find_identities(self._conn, tenant, keys),
            )

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[:2] == (tenant, [i.key() for i in identities]):
            found = ahead[2]
            return stored_identities(
                identities, found if isinstance(found, dict) else POSTGRES.found_identities(found)
            )
        return super().find_identities(tenant, identities)

    def claim_key(
        self, key: str, message_id: str, now: datetime, fingerprint: str | None = None
    ) -> Placement | None:
        locks = self._locks
        if locks is None or not locks.unclaimed(key):
            if locks is not None:
                locks.claimed.add(key)
            return super().claim_key(key, message_id, now, fingerprint)
        # Absent when the group began: claimed as on a store with one writer, by the whole row
        # complete_claim inserts with the placement (a plain insert, held with the others). Should
        # another instance claim it meanwhile, that insert fails, the group runs again isolated,
        # and this claim is read then.
        locks.claimed.add(key)
        self._claims[key] = (message_id, self._d.ts(now), fingerprint)
        return None

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        if self._locks is not None:
            self._locks.identities_written.add((tenant, *identity.key()))
            self._locks.owners_written.add(customer_id)
        super().add_identity(tenant, customer_id, identity, now)

    def mark_verified(self, tenant: str, identity: Identity) -> None:
        if self._locks is not None:
            self._locks.identities_written.add((tenant, *identity.key()))
            self._locks.verified_marked = True
        super().mark_verified(tenant, identity)

    def move_identities(
        self, tenant: str, keys: Sequence[tuple[str, str]], from_customer: str, to_customer: str
    ) -> list[Identity]:
        if self._locks is not None:
            self._locks.identities_moved = True
        return super().move_identities(tenant, keys, from_customer, to_customer)

    def holds_customers(self, customer_ids: Sequence[str]) -> bool:
        if self._locks is None:
            return False
        owners = self._locks.owners()
        return all(c in owners for c in customer_ids)

    def find_customer(self, customer_id: str) -> CustomerRecord | None:
        if self._locks is not None and customer_id not in self._locks.written:
            held = self._locks.owners().get(customer_id)
            if held is not None:
                return held
        return super().find_customer(customer_id)

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None:
        self._written(customer.id)
        super().create_customer(customer, now)

    def set_display_name(self, customer_id: str, display_name: str) -> None:
        self._written(customer_id)
        super().set_display_name(customer_id, display_name)

    def set_merged_into(self, customer_id: str, into: str | None) -> None:
        self._written(customer_id)
        super().set_merged_into(customer_id, into)

    def next_thread_number(self, tenant: str) -> int:
        if self._locks is None:
            return super().next_thread_number(tenant)
        numbers = self._locks.thread_numbers
        number = numbers.get(tenant)
        if number is None:
            number = super().next_thread_number(tenant)  # locks the counter row to the group's commit
        else:
            self._x(
                "UPDATE tenant_counters SET next_thread_number = next_thread_number + 1 WHERE tenant = ?",
                (tenant,),
            )
        numbers[tenant] = number + 1
        return number

    def create_thread(self, thread: ThreadRecord) -> None:
        d = self._d
        row = [
            thread.id,
            thread.tenant,
            thread.inbox,
            thread.customer_id,
            thread.subject,
            "open" if thread.open else "closed",
            thread.number,
            d.ts(thread.last_activity),
            1,  # next_sequence
            thread.merged_into,
            thread.previous_id,
            d.ts(thread.last_activity),
        ]
        self._x(_CREATE_THREAD, row)
        self._unadvanced[thread.id] = row

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        sequence = self._sequences.pop(thread_id, None)
        if sequence is not None:
            # Read with its row locked (thread_reads) and not advanced since: the answer is known.
            self._x(_ADVANCE_THREAD, (self._d.ts(now), thread_id))
            return sequence
        row = self._unadvanced.pop(thread_id, None)
        if row is None:
            return super().advance_thread(thread_id, now)
        # Created here with sequence 1 next, and no other transaction sees it before the commit:
        # the answer is known, so the update need not be read back. While the insert is still
        # held (_FoldedWrites), it inserts the row as advanced instead (the update would have to
        # wait for it, as a statement of its own); else the update is a write folded with others.
        conn = self._conn
        if isinstance(conn, _FoldedWrites) and conn.holds(row):
            row[_CREATE_THREAD_NEXT] = 2
            row[_CREATE_THREAD_ACTIVITY] = max(row[_CREATE_THREAD_ACTIVITY], self._d.ts(now))
            return 1
        self._x(_ADVANCE_THREAD, (self._d.ts(now), thread_id))
        return 1

    def thread_reads(
        self,
        customer_id: str,
        *,
        tenant: str,
        inbox: str,
        active_since: datetime,
        texts_since: datetime | None,
        not_channel: str,
    ) -> ThreadReads:
        # All sent now, pipelined: the first answer asked for brings the others with it.
        d = self._d
        texts = None
        if texts_since is not None:
            texts = self._x(RECENT_TEXTS, (customer_id, d.ts(texts_since), not_channel, RECENT_TEXTS_KEPT))
        threads = self._x(_OPEN_THREADS_LOCKED, (customer_id, tenant, inbox, d.ts(active_since)))
        owned = self._locks.owned(customer_id) if self._locks is not None else None
        identities = self._x(CUSTOMER_IDENTITIES, (customer_id,)) if owned is None else None

        def open_threads() -> list[ThreadRecord]:
            rows = threads.fetchall()
            self._sequences.update((r[0], int(r[-1])) for r in rows)
            return [thread_record(d, r) for r in rows]

        return CachedThreadReads(
            lambda: recent_text_records(d, customer_id, texts.fetchall()) if texts is not None else [],
            open_threads,
            lambda: identity_records(identities.fetchall()) if identities is not None else owned or (),
        )

    def _written(self, customer_id: str) -> None:
        if self._locks is not None:
            self._locks.written.add(customer_id)


_RETRYABLE_TX = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
# SqlTx.create_thread's insert, with the next sequence and the last activity as values (the
# thread's insert and first advance in one: PostgresTx.advance_thread).
_CREATE_THREAD = (
    "INSERT INTO threads (id, tenant, inbox, customer_id, subject, status, number, last_activity,"
    " next_sequence, merged_into, previous_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_CREATE_THREAD_ACTIVITY, _CREATE_THREAD_NEXT = 7, 8
# SqlTx.advance_thread's update, where the sequence it takes is known (not read back).
_ADVANCE_THREAD = (
    "UPDATE threads SET next_sequence = next_sequence + 1, last_activity = {greatest}(last_activity, ?)"
    " WHERE id = ?"
)
# Tx.thread_reads's open threads with their next sequence, their rows locked to the commit: the
# thread a message joins is advanced without reading its sequence back.
_OPEN_THREADS_LOCKED = (
    OPEN_THREADS.replace(" FROM threads", ", next_sequence FROM threads", 1) + " FOR UPDATE"
)

# The relay's statements, one round trip each. Marking: the rows still unpublished among the
# positions, the backlog and the published total moved by as many (parameters: now, positions, slot).
_MARK_PUBLISHED = (
    "WITH marked AS (UPDATE outbox SET published_at = %s WHERE published_at IS NULL"
    " AND position = ANY(%s) RETURNING 1),"
    " n AS (SELECT count(*) AS rows FROM marked),"
    " backlog AS (UPDATE outbox_backlog SET unpublished = unpublished - (SELECT rows FROM n)"
    " WHERE slot = %s AND (SELECT rows FROM n) > 0),"
    " total AS (INSERT INTO counters (name, value) SELECT 'published_total', rows FROM n WHERE rows > 0"
    " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value)"
    " SELECT rows FROM n"
)
_OUTBOX_STATUS = (
    "SELECT (SELECT coalesce(sum(unpublished), 0) FROM outbox_backlog),"
    " (SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY position LIMIT 1),"
    " (SELECT value FROM counters WHERE name = 'published_total')"
)

# Placements per group transaction: a larger group holds its locks longer, and past 64 savepoints
# that wrote, a backend's subtransactions overflow its cache and slow every snapshot on the server.
_GROUP_MAX = 32
# Groups running at once: while one waits for the database (a read, its commit's WAL flush), the
# next one's jobs run. They queue only where their messages meet (an identity, a customer, a new
# thread's number).
_GROUPS = 2
_JOB_SAVEPOINT = "tg_job"
# Locks of a group (PostgresStore._run_group): identity keys in array order, which is sorted; then
# the customers owning the identities, given as (tenant, kind, value) columns, in id order, read as
# locked (the jobs' Tx answers get_customer from these rows: _GroupLocks).
_LOCK_IDENTITIES = "SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k"
# All identities of the customers owning a group's identities (given as (tenant, kind, value)
# columns), read with its locks: its identities' owners, and each customer's identities in the
# order of CUSTOMER_IDENTITIES.
_FIND_OWNED = (
    "SELECT i.customer_id, i.tenant, i.kind, i.value, i.verified FROM identities i WHERE i.customer_id IN ("
    "SELECT o.customer_id FROM identities o"
    " JOIN unnest(%s::text[], %s::text[], %s::text[]) AS u (tenant, kind, value)"
    " ON o.tenant = u.tenant AND o.kind = u.kind AND o.value = u.value)"
    ' ORDER BY i.customer_id, i.created_at, i.kind COLLATE "C", i.value COLLATE "C"'
)
# Which of a group's idempotency keys and their tombstones exist.
_FIND_KEYS = "SELECT key FROM idempotency_keys WHERE key = ANY(%s)"
_LOCK_OWNERS = (
    "SELECT id, tenant, display_name, merged_into FROM customers"
    " WHERE id IN (SELECT i.customer_id FROM identities i"
    " JOIN unnest(%s::text[], %s::text[], %s::text[]) AS u (tenant, kind, value)"
    " ON i.tenant = u.tenant AND i.kind = u.kind AND i.value = u.value)"
    ' ORDER BY id COLLATE "C" FOR UPDATE'
)


@dataclass(frozen=True, slots=True)
class _Queued:
    """A placement job waiting for its group: the job, the (tenant, kind, value) of its messages'
    identities, their idempotency keys, and the caller's future."""

    fn: Callable[[Connection], Any]
    identities: set[tuple[str, str, str]]
    keys: tuple[str, ...]  # the messages' idempotency keys
    future: asyncio.Future[Any]


class _GroupBacklog:
    """The outbox backlog within one group transaction: read once at its start, added to once at
    its end. A bound is checked against the backlog read plus the events of the group so far, so
    it may be overshot by the groups committing at that moment on other instances, not more."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        # Pipelined: its answer comes with the group's first read.
        self._read = conn.execute("SELECT coalesce(sum(unpublished), 0) FROM outbox_backlog")
        self._base: int | None = None
        self.added = 0  # events of the jobs done in the group
        self.pending = 0  # events of the job running

    def count(self, rows: int, bound: int | None, retry_after: float) -> None:
        if bound is not None:
            if self._base is None:
                row = self._read.fetchone()
                self._base = int(row[0]) if row is not None else 0
            backlog = self._base + self.added + self.pending
            if backlog + rows > bound:
                raise BacklogFull(
                    f"outbox holds {backlog} unpublished events (max_backlog {bound})",
                    retry_after=retry_after,
                )
        self.pending += rows


_TOUCHED = re.compile(r"\b(?:INTO|UPDATE|FROM|JOIN)\s+(\w+)", re.IGNORECASE)
# _RECENT_TEXT as the part of a statement it becomes when folded with others: its own WITH part
# (named once per statement: a second recent text touches the same table, so it starts another),
# then its INSERT.
_RECENT_TEXT_PARTS = (POSTGRES.sql(f"capped AS ({RECENT_TEXT_CAP})"), POSTGRES.sql(RECENT_TEXT_INSERT))


_Statement = tuple[str, Sequence[Any]]  # SQL and its parameters
_NUMBERED_ROWS = frozenset({"outbox"})  # tables whose rows are numbered as they are inserted


@functools.cache
def _tables(sql: str) -> frozenset[str]:
    """The tables ``sql`` reads or writes (one entry per statement text a store sends)."""
    return frozenset(_TOUCHED.findall(sql))


@functools.cache
def _held_write(sql: str) -> bool:
    """Whether ``sql`` only writes (no rows come back), so :class:`_FoldedWrites` may hold it."""
    if sql.startswith("WITH "):
        return sql == _RECENT_TEXT  # the one write with a WITH of its own a placement makes
    return sql.startswith(("INSERT INTO ", "UPDATE ", "DELETE FROM ")) and "RETURNING" not in sql


@functools.cache
def _takes_held(sql: str) -> bool:
    """Whether held writes may go with ``sql``, a statement whose rows are read, as ``WITH`` parts:
    it has no ``WITH`` of its own and takes no row lock (a lock wait would hold the writes)."""
    return sql.startswith(("SELECT ", "INSERT INTO ", "UPDATE ")) and " FOR " not in sql


class _HeldCursor:
    """What ``execute`` returns for a write held by :class:`_FoldedWrites`: it has no rows."""

    rowcount = -1  # as a pipelined cursor before its results are read

    def fetchone(self) -> Any:
        raise psycopg.ProgrammingError("a held write has no result")

    def fetchall(self) -> list[Any]:
        raise psycopg.ProgrammingError("a held write has no result")

    def executemany(self, sql: str, rows: Any, /) -> Any:
        raise psycopg.ProgrammingError("a held write is no cursor")

    def close(self) -> None:
        pass


_HELD = _HeldCursor()


class _FoldedWrites:
    """The connection a job of a group sees: the writes whose results nobody reads are held and
    sent as one statement (each a data-modifying ``WITH`` part of it), or as ``WITH`` parts of the
    next statement whose rows are read, and at the end of the job. A placement's tail (message,
    recent text, claim, content, reply route, outbox row) costs one statement this way instead of
    seven, and its raw bytes go with its first read: each statement is a message to the server, a
    send() of its own in libpq's pipeline mode and ~20 us of psycopg.

    The parts of one statement see the same snapshot and not each other's rows, so a write is held
    with others, or goes with a read, only when it touches none of their tables, or when it and
    they are all plain inserts of values (no upsert) into the same table (a customer's
    identities); otherwise, and before a read that locks rows or has a ``WITH`` of its own, the
    held writes go first, as a statement of their own.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._held: list[_Statement] = []
        self._tables: dict[str, bool] = {}  # table -> whether only plain inserts of values touch it

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not _held_write(sql):
            if self._held and _takes_held(sql) and self._tables.keys().isdisjoint(_tables(sql)):
                held, self._held = self._held, []
                self._tables.clear()
                return self._send(*_folded(held, (sql, params)), parts=True)
            self.flush()
            return self._conn.execute(sql, params)
        # DO UPDATE may change a row a part before it wrote: "cannot affect row a second time".
        # The parts of a statement run in no set order, so rows numbered as inserted (the outbox's
        # positions) go one statement each: two events must keep their order.
        tables = _tables(sql)
        plain = (
            sql.startswith("INSERT INTO ")
            and "SELECT" not in sql
            and "DO UPDATE" not in sql
            and _NUMBERED_ROWS.isdisjoint(tables)
        )
        if any(t in self._tables and not (plain and self._tables[t]) for t in tables):
            self.flush()
        self._held.append((sql, params))
        for table in tables:
            self._tables[table] = plain and self._tables.get(table, True)
        return _HELD

    def cursor(self) -> Any:
        self.flush()
        return self._conn.cursor()

    def holds(self, params: Sequence[Any]) -> bool:
        """Whether a write with these very parameters (the same object) is held, not sent yet."""
        return any(held is params for _, held in self._held)

    def flush(self) -> None:
        """Send the held writes (pipelined: their errors come with the next read or sync)."""
        held, self._held = self._held, []
        self._tables.clear()
        if held:
            self._send(*_folded(held[:-1], held[-1]), parts=len(held) > 1)

    def _send(self, sql: str, params: Sequence[Any], *, parts: bool) -> Any:
        """Execute a statement; one of several parts with psycopg's raw cursor, whose query psycopg
        does not parse: it parses a statement of more than 50 parameters (a placement's tail has
        ~60) for every execution, a fifth of a placement's psycopg time, not once per text."""
        if parts and isinstance(self._conn, psycopg.Connection):
            return psycopg.RawCursor(self._conn).execute(_numbered(sql), params)
        return self._conn.execute(sql, params)


_PLACEHOLDER = re.compile(r"%[s%]")


@functools.lru_cache(maxsize=512)
def _numbered(sql: str) -> str:
    """``sql`` with PostgreSQL's own placeholders (``$1``, ``$2``, ...) for psycopg's ``%s``."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() == "%%":
            return "%"
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


def _folded(
    parts: Sequence[tuple[str, Sequence[Any]]], last: tuple[str, Sequence[Any]]
) -> tuple[str, list[Any]]:
    """One statement: each of ``parts`` a ``WITH`` part, ``last`` the statement they go with."""
    if not parts:
        return last[0], list(last[1])
    names: list[str] = []
    for n, (sql, _) in enumerate(parts):
        if sql == _RECENT_TEXT:
            names += (_RECENT_TEXT_PARTS[0], f"_w{n} AS ({_RECENT_TEXT_PARTS[1]})")
        else:
            names.append(f"_w{n} AS ({sql})")
    sql = last[0]
    if sql == _RECENT_TEXT:
        names.append(_RECENT_TEXT_PARTS[0])
        sql = _RECENT_TEXT_PARTS[1]
    # The parameters follow the text: a part's own in its order, the parts in theirs.
    return f"WITH {', '.join(names)} {sql}", [p for _, params in (*parts, last) for p in params]


class _BinaryResults:
    """A connection whose statements answer in binary: an event's body comes as its bytes, not as
    hex the server encodes and the client decodes (the relay reads every body)."""

    def __init__(self, conn: Conn) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.cursor(binary=True).execute(sql, params)

    def cursor(self) -> Cursor:
        return self._conn.cursor(binary=True)


class _GroupState(threading.local):
    """What a worker thread knows of the group it runs, if any."""

    backlog: _GroupBacklog | None = None
    locks: _GroupLocks | None = None


class _JobFailed(Exception):
    """A job of a group run together failed: the group was rolled back, to run again isolated."""


def _not_committed(exc: Exception) -> StoreError:
    """One caller's error for a group that did not commit (each raises an object of its own)."""
    error = StoreError(str(exc) or exc.__class__.__name__)
    error.__cause__ = exc
    return error


class PostgresStore(SqlStore):
    """:class:`gateway.store.base.Store` on PostgreSQL (+ a shared blob directory), for several instances."""

    dialect = POSTGRES

    def __init__(self, settings: StoreSettings, outbox: OutboxSettings, *, clock: Clock = utcnow) -> None:
        if settings.dsn is None:
            raise ValueError("the PostgreSQL store needs store.dsn")
        super().__init__(settings, outbox, clock)
        self._dsn = settings.dsn.get_secret_value()
        self._pool: ConnectionPool[Conn] | None = None
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        # The relay lease lives on its own connection, used only from the one lease thread.
        self._lease_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._lease_conn: Conn | None = None
        self._lease_held = False
        self._lease_next_try = 0.0
        # Set after commits that add events; one task turns each burst of them into one NOTIFY.
        self._committed: asyncio.Event | None = None
        # Whether the commits since the last notification include events other than placements
        # (which only the pipeline's on_commit wakes this gateway's relay for).
        self._announce_to_all = False
        self._notifier: asyncio.Task[None] | None = None
        # Placements wait here for the next group transaction (_group_placements).
        self._queued: deque[_Queued] = deque()
        self._queued_event = asyncio.Event()
        self._grouper: asyncio.Task[None] | None = None
        self._group = _GroupState()
        # Whether the next group runs its jobs isolated (each under a savepoint): after a failing job.
        self._isolate_jobs = False
        self._open = False

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
        self._grouper = asyncio.create_task(self._group_placements(), name="tg-pg-placements")
        logger.info("PostgreSQL store open (schema version %d)", len(MIGRATIONS))

    async def close(self) -> None:
        if not self._open:
            return
        self._open = False
        # The placements queued before now still run: their callers wait for an answer.
        grouper, self._grouper = self._grouper, None
        if grouper is not None:
            self._queued_event.set()
            await grouper
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

    def _transact(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one transaction on a pooled connection; a deadlock victim runs again."""

        def run(conn: Conn) -> T:
            with conn.transaction():
                return fn(conn)

        return self._attempt(run)

    def _attempt(self, run: Callable[[Conn], T]) -> T:
        """``run`` a transaction on a pooled connection; run again from the start when PostgreSQL
        chose it as a deadlock victim."""
        pool = self._pool
        if pool is None:
            raise StoreError("store is closed")
        for attempt in range(1, _TX_ATTEMPTS + 1):
            try:
                with pool.connection() as conn:
                    return run(conn)
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

    async def _write(self, fn: Callable[[Connection], T], *, events: bool = False) -> T:
        """A transaction; when it may add outbox events, every listening relay hears of its commit."""
        value = await self._run(lambda: self._transact(fn))
        if events and self._committed is not None:
            self._announce_to_all = True
            self._committed.set()
        return value

    async def _write_placement(
        self, fn: Callable[[Connection], T], messages: Sequence[CanonicalMessage]
    ) -> T:
        """Queue the job for the next group transaction (:meth:`_group_placements`)."""
        if not self._open or self._grouper is None:
            raise StoreError("store is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        identities = {(m.tenant, *i.key()) for m in messages for i in normalize_all(m.identities)}
        keys = tuple(m.idempotency_key() for m in messages)
        self._queued.append(_Queued(fn, identities, keys, future))
        self._queued_event.set()
        value: T = await future
        return value

    async def _group_placements(self) -> None:
        """Whenever fewer than ``_GROUPS`` groups run, start one with the queued placements (all that
        wait, up to ``_GROUP_MAX``); until the store closes and nothing is queued or running.

        One commit (one WAL flush, one NOTIFY) and one hand-off to a worker thread per group instead
        of per placement, and the hot rows a placement writes (a tenant's thread counter, a backlog
        slot) are locked once per group rather than once per placement.
        """
        running: set[asyncio.Task[None]] = set()

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            self._queued_event.set()  # a group may start

        while self._open or self._queued or running:
            await self._queued_event.wait()
            self._queued_event.clear()
            while self._queued and len(running) < _GROUPS:
                group: list[_Queued] = []
                while self._queued and len(group) < _GROUP_MAX:
                    queued = self._queued.popleft()
                    if not queued.future.cancelled():  # a caller that gave up before it ran
                        group.append(queued)
                if group:
                    task = asyncio.create_task(self._commit_group(group), name="tg-pg-group")
                    running.add(task)
                    task.add_done_callback(done)

    async def _commit_group(self, group: Sequence[_Queued]) -> None:
        """Run one group on a worker thread and answer its callers."""
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._workers, self._transact_group, group
            )
        except Exception as exc:  # the group did not commit: no job in it did
            outcomes = [_not_committed(exc) for _ in group]
        else:
            if self._committed is not None:
                self._committed.set()
        for queued, outcome in zip(group, outcomes, strict=True):
            if queued.future.done():
                continue
            if isinstance(outcome, BaseException):
                queued.future.set_exception(outcome)
            else:
                queued.future.set_result(outcome)

    def _transact_group(self, group: Sequence[_Queued]) -> list[Any]:
        """The group in one transaction, its jobs together; if any job fails, once more with each job
        under a savepoint, so only the failing ones are refused (:meth:`_run_group`)."""
        if not self._isolate_jobs:
            try:
                return self._attempt(lambda conn: self._run_group(conn, group, isolated=False))
            except _JobFailed:
                # A failing job (a full outbox, a failing statement) tends to be followed by more
                # (the outbox stays full): isolate until a group's jobs all succeed again.
                self._isolate_jobs = True
        outcomes = self._attempt(lambda conn: self._run_group(conn, group, isolated=True))
        self._isolate_jobs = any(isinstance(outcome, BaseException) for outcome in outcomes)
        return outcomes

    def _run_group(self, conn: Conn, group: Sequence[_Queued], *, isolated: bool) -> list[Any]:
        """Each job of ``group`` in one transaction, pipelined; their outcomes (a job's value, or,
        when ``isolated``, the exception of a job rolled back to its savepoint).

        Locks first, for all jobs at once: the identities of every message in one global order
        (their lock keys, sorted), then the customers owning them (in id order). A job then takes
        no identity or customer lock another group may hold while waiting for one this group holds,
        so groups on several instances wait for each other instead of deadlocking (the rest, a
        customer merged meanwhile, is a deadlock victim run again). A deadlock runs the whole group
        again.

        Jobs run together (not ``isolated``): no savepoint and no sync of their own, so a job costs
        its own statements and reads only; any failure (a job's, or an error its queued writes
        raise at a later read or at the COMMIT) rolls the whole group back and raises
        :class:`_JobFailed`, and the group runs again isolated: each job under a savepoint, its
        queued writes synced before the savepoint is released, so a failing job (a full outbox, an
        error of its statements) is rolled back and answered alone.
        """
        try:
            with conn.pipeline() as pipeline:
                # BEGIN and COMMIT go in the pipeline like any statement: conn.transaction() would
                # wait for the BEGIN, and sync before the COMMIT and once more per pipeline level
                # after it. Here the pipeline's end is the commit's one wait; should a statement
                # have failed since the last sync, the COMMIT is skipped and that error raised
                # there. A transaction left open by an error is rolled back by the pool's
                # connection context (_attempt), or here before a group runs again isolated.
                conn.execute("BEGIN")
                outcomes = self._run_jobs(conn, pipeline, group, isolated=isolated)
                conn.execute("COMMIT")
        except _RETRYABLE_TX:
            raise
        except Exception as exc:
            if isolated or conn.broken or conn.closed:
                raise
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
            raise _JobFailed from exc
        return outcomes

    def _run_jobs(
        self, conn: Conn, pipeline: psycopg.Pipeline, group: Sequence[_Queued], *, isolated: bool
    ) -> list[Any]:
        """The group's locks, then each job (see :meth:`_run_group`)."""
        identities = sorted(set().union(*(q.identities for q in group)))
        outcomes: list[Any] = []
        owners = owned = None
        if identities:
            conn.execute(_LOCK_IDENTITIES, (sorted({identity_lock(*i) for i in identities}),))
            columns = [list(column) for column in zip(*identities, strict=True)]
            owners = conn.execute(_LOCK_OWNERS, columns)
            if not isolated:
                owned = conn.execute(_FIND_OWNED, columns)
        # Jobs run together read their identities and claims here, in the group's first round
        # trip, not one each (isolated, a job rolled back would make them stale).
        keys = sorted({key for q in group for key in q.keys})
        claimed = None
        if keys and not isolated:
            claimed = conn.execute(_FIND_KEYS, ([*keys, *(erased_key(key) for key in keys)],))
        # A job's Tx skips what these hold (PostgresTx); set anew for every attempt of the group.
        locks = self._group.locks = _GroupLocks(set(identities), owners, owned=owned, keys=claimed)
        backlog = self._group.backlog = _GroupBacklog(conn)
        try:
            held: _FoldedWrites | None = None  # together: the last job's writes, still held
            for queued in group:
                backlog.pending = 0
                if not isolated:
                    if held is not None:
                        held.flush()
                    backlog.conn = held = _FoldedWrites(conn)
                    outcomes.append(queued.fn(held))
                    backlog.added += backlog.pending
                    continue
                backlog.conn = folded = _FoldedWrites(conn)
                conn.execute(f"SAVEPOINT {_JOB_SAVEPOINT}")
                try:
                    value = queued.fn(folded)
                    folded.flush()
                    pipeline.sync()  # the job's queued writes: an error raised here is the job's
                except _RETRYABLE_TX:
                    raise
                except Exception as exc:
                    if conn.broken or conn.closed:
                        raise
                    with contextlib.suppress(psycopg.Error):  # the job's error, raised already
                        pipeline.sync()
                    locks.thread_numbers.clear()
                    conn.execute(f"ROLLBACK TO SAVEPOINT {_JOB_SAVEPOINT}")
                    conn.execute(f"RELEASE SAVEPOINT {_JOB_SAVEPOINT}")
                    outcomes.append(as_store_error(exc, psycopg.Error))
                    continue
                conn.execute(f"RELEASE SAVEPOINT {_JOB_SAVEPOINT}")
                backlog.added += backlog.pending
                outcomes.append(value)
            # The group's count goes with the last job's writes (together: still held).
            if backlog.added:
                self._add_backlog(held or conn, backlog.added)
            if held is not None:
                held.flush()
        finally:
            self._group.backlog = self._group.locks = None
        return outcomes

    async def _read(self, fn: Callable[[Connection], T]) -> T:
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

    def _tx(self, conn: Connection) -> SqlTx:
        group = self._group
        if group.locks is not None and group.backlog is not None and group.backlog.conn is conn:
            return PostgresTx(conn, group.locks)  # a job of the group this thread runs
        return PostgresTx(conn)

    # -- backlog bound -------------------------------------------------------------------------

    def _count_events(self, conn: Connection, rows: int, *, bounded: bool) -> None:
        """Count ``rows`` new unpublished events; refuse (rolling back) when they cross the bound."""
        if not rows:
            return
        group = self._group.backlog
        if group is not None and group.conn is conn:
            # In a group: counted once for the group at its end, from the backlog read at its start.
            group.count(rows, self._outbox.max_backlog if bounded else None, self._outbox.retry_after)
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

    def _count_published(self, conn: Connection, rows: int) -> None:
        self._add_backlog(conn, -rows)

    @staticmethod
    def _add_backlog(conn: Connection, rows: int) -> None:
        conn.execute(
            "UPDATE outbox_backlog SET unpublished = unpublished + %s WHERE slot = %s",
            (rows, random.randrange(BACKLOG_SLOTS)),  # noqa: S311 - load spreading, not crypto
        )

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
                return outbox_rows(POSTGRES, _BinaryResults(conn), after, limit)
            except psycopg.Error as exc:
                self._drop_lease()
                raise StoreError(f"outbox read failed (relay lease dropped): {exc}") from exc

        if not self._open or self._lease_thread is None:
            raise StoreError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._lease_thread, fetch)

    async def outbox_mark_published(self, positions: Sequence[int]) -> None:
        """One statement, so one round trip and its own transaction (the relay marks every batch)."""
        if not positions:
            return
        params = (self._clock(), list(positions), random.randrange(BACKLOG_SLOTS))  # noqa: S311 - load spreading
        await self._run(lambda: self._attempt(lambda conn: conn.execute(_MARK_PUBLISHED, params)))

    async def outbox_status(self) -> OutboxStatus:
        def read(conn: Connection) -> OutboxStatus:
            backlog, oldest, total = conn.execute(_OUTBOX_STATUS).fetchone()
            return OutboxStatus(
                backlog=int(backlog),
                oldest_created_at=_utc(oldest) if oldest is not None else None,
                published_total=int(total) if total is not None else 0,
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
            # Signed when only placements were committed: the gateway wakes its own relay after
            # those itself (the pipeline's on_commit), so that relay skips them (outbox_listen).
            payload = "" if self._announce_to_all else _instance(os.getpid())
            self._announce_to_all = False
            try:
                await self._run(
                    functools.partial(self._attempt, functools.partial(_notify_outbox, payload=payload))
                )
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
                    # The relay of a gateway runs in a child process of it; the gateway wakes it
                    # after each of its placements, sooner than a notification would.
                    woken_by_parent = _instance(os.getppid())
                    async for notify in conn.notifies():
                        if notify.payload == woken_by_parent:
                            continue
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


def _notify_outbox(conn: Connection, payload: str) -> None:
    """One statement in a transaction of its own (the connection is in autocommit), which skips
    the WAL flush at its commit."""
    conn.execute(
        "SELECT set_config('synchronous_commit', 'off', true), pg_notify(%s, %s)", (OUTBOX_CHANNEL, payload)
    )


@functools.cache  # a process's start time never changes: /proc is read once, not per notification
def _instance(pid: int) -> str:
    """What a gateway process signs its notifications with (see outbox_listen).

    A host name and a pid alone are not unique: replicas given one host name in containers of
    their own are often all pid 1. The machine's boot id and the process's start time (Linux
    /proc, empty elsewhere) tell them apart; a relay that still mistook another gateway for its
    own would only wait for its next poll.
    """
    return f"{socket.gethostname()} pid={pid} {_BOOT_ID} {_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    """When the process started, in clock ticks since boot; empty where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return _stat_start(file.read())
    except OSError:
        return ""


def _stat_start(stat: bytes) -> str:
    """Field 22 of a /proc/<pid>/stat line. The command name (field 2) may hold spaces and
    parentheses, so the fields are counted after its last ')'."""
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return ""


_BOOT_ID = _boot_id()


def _configure(conn: Conn) -> None:
    """Every session reads and writes timestamps in UTC."""
    conn.execute("SET TIME ZONE 'UTC'")
