"""The one SQL store engine behind both backends: the Tx, the job bodies and the row mappers.

SQLite and PostgreSQL run the same statements. What truly differs between them is held by a
:class:`Dialect`: the placeholder style and a few words of SQL (``max`` or ``greatest``, a jsonb
cast, a collation, row locks), how times and JSON are stored, the statements that run once per item
on one and once per list on the other, and the locks a multi-writer database needs. The backends
(:mod:`gateway.store.sqlite`, :mod:`gateway.store.postgres`) add their schema, connection handling,
group commit or retries, and the outbox backlog count, by subclassing :class:`SqlStore`.

Statements here are written with ``?`` placeholders and ``{word}`` slots; :meth:`Dialect.sql`
turns them into the backend's text once and caches it. Values are always bound as parameters;
only dialect words and placeholder lists are ever put into SQL text.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import orjson

from core.errors import BacklogFull, StoreError
from core.events import Event, customer_erased, message_quarantined
from core.media import MediaFetch
from core.model import Attachment, CanonicalMessage, Identity, Placement, RawEnvelope, plain_text
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
    ThreadReads,
    ThreadRecord,
    TxWork,
)
from gateway.store.base import Erasure, EventBuilder, OutboxRow, QuarantineCounts, QuarantineRecord
from gateway.store.blobs import BlobDir, is_sha256, parse_raw_ref, raw_ref, sha256_hex
from gateway.store.erase import (
    RETAINED_KINDS,
    audit_row,
    erase,
    erase_scan,
    erased_key,
    purge_batch,
    record_content,
)
from gateway.store.replies import ROUTE_INSERT, ReplyLedger

T = TypeVar("T")
# A blob file written for a job: (sha256, size, content type or None for a raw body).
_BlobFile = tuple[str, int, str | None]
Clock = Callable[[], datetime]
Key = tuple[str, str]  # an identity's (kind, value)
Keys = Sequence[Key]
Owners = tuple[str, str]  # (from customer, to customer)

_DISK_CHECK_INTERVAL = 1.0  # seconds a free-space reading is trusted


def as_store_error(exc: Exception, database_error: type[Exception]) -> Exception:
    """What the caller of a failed job gets: the driver's ``database_error`` becomes
    :class:`StoreError` (its cause kept); anything else (a bug in a callback) stays itself."""
    if isinstance(exc, database_error):
        error = StoreError(f"store write failed: {exc}")
        error.__cause__ = exc
        return error
    return exc


def utcnow() -> datetime:
    return datetime.now(UTC)


# What the readiness probe writes: one page, enough that a full file system refuses it.
_PROBE_BYTES = b"\0" * 4096


class Cursor(Protocol):
    """The part of a DB-API cursor (sqlite3, psycopg) the engine uses."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> Any: ...

    def close(self) -> None: ...


class Connection(Protocol):
    """The part of a DB-API connection (sqlite3, psycopg) the engine uses."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Cursor: ...

    def cursor(self) -> Cursor: ...


def executemany(conn: Connection, sql: str, rows: Sequence[Sequence[Any]]) -> int:
    """Run ``sql`` once per row (psycopg pipelines them); the rows changed, summed."""
    if not rows:
        return 0
    if len(rows) == 1:
        # The usual case on the hot path (one event, one content row): no cursor of its own.
        return max(conn.execute(sql, rows[0]).rowcount, 0)
    cur = conn.cursor()
    try:
        cur.executemany(sql, rows)
        return max(cur.rowcount, 0)
    finally:
        cur.close()


class Dialect:
    """What differs between the backends' SQL. One instance per backend, shared by every Tx."""

    #: True when no other transaction runs meanwhile (:attr:`dedupe.tx.Tx.serialized`).
    serialized: ClassVar[bool]
    #: The placeholder ``?`` in the shared statements becomes this.
    placeholder: ClassVar[str]
    #: Values of the ``{word}`` slots in the shared statements:
    #: ``greatest`` (the two-argument maximum), ``json`` (appended to a JSON placeholder),
    #: ``collate`` (byte order of text), ``for_update`` (row locks taken by a read),
    #: ``skip_locked`` (rows another writer claims are passed over), ``each`` (``= ?`` run once per
    #: value by :meth:`for_each`, or one array), ``merges`` (the merge table), ``merges_of`` (the
    #: condition on it naming a customer, every ``?`` that customer), ``recent_text_key`` (what
    #: identifies a recent text row).
    words: ClassVar[Mapping[str, str]]
    #: A write that fails when the database cannot write (readiness).
    ping_sql: ClassVar[str]
    #: Per retained kind (:mod:`gateway.store.erase`), the keys of up to ``?2`` rows older than
    #: ``?1``, oldest first; parameters (before, limit). These read a time index; a backend may
    #: find old rows another way (SQLite: the head of the table in rowid order).
    oldest_sql: ClassVar[Mapping[str, str]] = {
        "keys": "SELECT key FROM idempotency_keys WHERE created_at < ? ORDER BY created_at LIMIT ?",
        "events": "SELECT position FROM outbox WHERE published_at < ? ORDER BY published_at LIMIT ?",
        "messages": "SELECT message_id FROM messages WHERE received_at < ? ORDER BY received_at LIMIT ?",
        "raw_bodies": "SELECT sha256 FROM raw_archive WHERE created_at < ? ORDER BY created_at LIMIT ?",
        "raw_bodies_files": "SELECT sha256 FROM blob_files WHERE coalesce(used_at, created_at) < ?"
        " AND content_type IS NULL ORDER BY coalesce(used_at, created_at) LIMIT ?",
        "blobs": "SELECT sha256 FROM blob_files WHERE coalesce(used_at, created_at) < ?"
        " AND content_type IS NOT NULL ORDER BY coalesce(used_at, created_at) LIMIT ?",
        # Finished replies: far fewer rows than messages, so no time index.
        "replies": "SELECT id FROM replies WHERE status IN ('sent', 'failed') AND updated_at < ? LIMIT ?",
    }

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def sql(self, text: str) -> str:
        """The backend's text of a shared statement (cached: statements are a small fixed set)."""
        cached = self._cache.get(text)
        if cached is None:
            cached = text.format_map(self.words) if "{" in text else text
            if self.placeholder != "?":
                cached = cached.replace("?", self.placeholder)
            self._cache[text] = cached
        return cached

    # -- values (plain functions, called for every column read or written) ------------------------

    #: A time as stored; naive datetimes are taken as UTC.
    ts: Callable[[datetime], Any]
    #: A stored time as an aware UTC datetime.
    dt: Callable[[Any], datetime]
    #: A stored JSON column (or text array) as Python values.
    load_json: Callable[[Any], Any]
    #: A list of ids as stored in one column.
    text_array: Callable[[Sequence[str]], Any]

    # -- statements: portable SQL, one statement per item; a backend overrides what it does better --

    def for_each(self, conn: Connection, sql: str, head: Sequence[Any], values: Sequence[Any]) -> int:
        """Run a statement whose last placeholder is ``{each}`` for all ``values``; rows changed."""
        return executemany(conn, self.sql(sql), [(*head, value) for value in values])

    def lock_identities(self, conn: Connection, tenant: str, keys: Keys) -> None:
        """Lock identity keys until commit (:meth:`dedupe.tx.Tx.lock_identities`); nothing to do
        when transactions are serialized."""

    def lock_customers(self, conn: Connection, customer_ids: Sequence[str]) -> None:
        """Row-lock customers until commit (:meth:`dedupe.tx.Tx.lock_customers`); nothing to do
        when transactions are serialized."""

    def find_identities(self, conn: Connection, tenant: str, keys: Keys) -> dict[Key, tuple[str, bool]]:
        """(kind, value) -> (customer id, verified) of the stored identities among ``keys``."""
        found: dict[Key, tuple[str, bool]] = {}
        sql = self.sql(
            "SELECT customer_id, verified FROM identities WHERE tenant = ? AND kind = ? AND value = ?"
        )
        for kind, value in keys:
            row = conn.execute(sql, (tenant, kind, value)).fetchone()
            if row is not None:
                found[(kind, value)] = (row[0], bool(row[1]))
        return found

    def move_identities(self, conn: Connection, tenant: str, keys: Keys, owners: Owners) -> dict[Key, bool]:
        """Move those of ``keys`` owned by ``owners[0]`` to ``owners[1]``; (kind, value) -> verified."""
        moved: dict[Key, bool] = {}
        sql = self.sql(
            "UPDATE identities SET customer_id = ? WHERE tenant = ? AND kind = ? AND value = ?"
            " AND customer_id = ? RETURNING verified"
        )
        for kind, value in keys:
            row = conn.execute(sql, (owners[1], tenant, kind, value, owners[0])).fetchone()
            if row is not None:
                moved[(kind, value)] = bool(row[0])
        return moved

    def add_merge_members(self, conn: Connection, merge: MergeRecord) -> None:
        """Index a merge by its customers where the merge row itself cannot be searched by them
        (the ``{merges_of}`` word reads that index)."""

    def erase_merges(self, conn: Connection, customer_ids: Sequence[str]) -> int:
        """Delete the merge records naming any of ``customer_ids``; how many."""
        sql = self.sql("SELECT id FROM {merges} WHERE {merges_of}")
        ids: set[str] = set()
        marks = self.words["merges_of"].count("?")
        for customer in customer_ids:
            ids |= {r[0] for r in conn.execute(sql, (customer,) * marks).fetchall()}
        if ids:
            self.for_each(conn, "DELETE FROM {merges} WHERE id {each}", (), sorted(ids))
        return len(ids)

    def add_recent_text(self, conn: Connection, row: Sequence[Any]) -> None:
        """Insert a recent text, then cap its customer's channel (see :meth:`SqlTx.add_recent_text`).

        ``row`` holds ``RECENT_TEXT_INSERT``'s values; its first two are customer and channel.
        """
        conn.execute(self.sql(RECENT_TEXT_INSERT), row)
        # Inserted first, so the newest RECENT_TEXTS_KEPT include the new text.
        customer, channel = row[0], row[1]
        conn.execute(self.sql(RECENT_TEXT_CAP), (customer, channel, customer, channel, RECENT_TEXTS_KEPT - 1))


# -- shared statements and row mappers ------------------------------------------------------------

THREAD_COLUMNS = (
    "id, tenant, inbox, customer_id, subject, number, last_activity, status, merged_into, previous_id"
)
_THREAD_COLUMNS_T = ", ".join(f"t.{c.strip()}" for c in THREAD_COLUMNS.split(","))
_MERGE_COLUMNS = (
    "id, tenant, surviving_customer, merged_customers, identities, threads, evidence, created_at, undone_at"
)
_LINK_COLUMNS = "id, tenant, customer_id, other_customer_id, identities, message_id, created_at"
_QUARANTINE_COLUMNS = (
    "id, tenant, channel, inbox, reason, raw_ref, size, received_at, replayed_at, replay_result"
)
_MEDIA_COLUMNS = (
    "key, channel, inbox, account, ref, kind, state, attempts, next_attempt_at, sha256, size, content_type,"
    " name, error, created_at"
)
# Values: customer_id, channel, at, message_id, thread_id, text (customer and channel first: the cap).
RECENT_TEXT_INSERT = (
    "INSERT INTO recent_texts (customer_id, channel, at, message_id, thread_id, text)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
# The (RECENT_TEXTS_KEPT - offset)th newest text of a customer's channel and all older ones.
RECENT_TEXT_CAP = (
    "DELETE FROM recent_texts WHERE customer_id = ? AND channel = ? AND at < ("
    "SELECT at FROM recent_texts WHERE customer_id = ? AND channel = ? ORDER BY at DESC LIMIT 1 OFFSET ?)"
)
# The reads of Tx.thread_reads, one statement each (PostgreSQL sends them together).
# Parameters: customer, since, not channel, limit.
RECENT_TEXTS = (
    "SELECT message_id, thread_id, channel, text, at FROM recent_texts"
    " WHERE customer_id = ? AND at >= ? AND channel <> ? ORDER BY at DESC, message_id DESC LIMIT ?"
)
# Parameters: customer, tenant, inbox, active since.
OPEN_THREADS = (
    f"SELECT {THREAD_COLUMNS} FROM threads"  # noqa: S608 - column names only
    " WHERE customer_id = ? AND tenant = ? AND inbox = ? AND status = 'open' AND last_activity >= ?"
    " ORDER BY number"
)
# Parameter: customer.
CUSTOMER_IDENTITIES = (
    "SELECT kind, value, verified FROM identities WHERE customer_id = ?"
    " ORDER BY created_at, kind{collate}, value{collate}"
)
_OUTBOX_INSERT = (
    "INSERT INTO outbox (event_id, type, routing_key, tenant, channel, thread_id, sequence, body,"
    " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The first placement of an idempotency key (parameter: the key).
_KEY_SELECT = (
    "SELECT message_id, thread_id, customer_id, sequence, is_new_thread, duplicate_of,"
    " previous_thread_id, fingerprint, (SELECT number FROM threads t WHERE t.id = k.thread_id)"
    " FROM idempotency_keys k WHERE key = ?"
)
# The same for a key and its tombstone, each row ending with its key (parameters: key, tombstone).
# Two lookups in one statement; an IN list or an ORDER BY would build a temporary b-tree.
_KEY_PROBE = " UNION ALL ".join(
    [_KEY_SELECT.replace(" FROM idempotency_keys", ", key FROM idempotency_keys")] * 2
)
_OUTBOX_FETCH = (
    "SELECT position, event_id, type, routing_key, tenant, channel, thread_id, sequence, body, created_at"
    " FROM outbox WHERE published_at IS NULL AND position > ? ORDER BY position LIMIT ?"
)


def _json_text(value: Any) -> str:
    # Anything orjson cannot encode natively (transport facts, evidence) is kept as its str().
    return orjson.dumps(value, default=str).decode()


def _safe_text(value: str) -> str:
    """Text any backend stores: no lone surrogates (UTF-8 refuses them), no NUL (PostgreSQL does)."""
    return plain_text(value).replace("\x00", "\\x00")


def _safe_json(value: Any) -> Any:
    """``value`` with every key and string made :func:`_safe_text` (keys are ``str``): JSON-safe."""
    if isinstance(value, str):
        return _safe_text(value)
    if isinstance(value, Mapping):
        return {_safe_text(str(k)): _safe_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_safe_json(v) for v in value]
    return value


def _safe_json_text(value: Any) -> str:
    """``_json_text(_safe_json(value))``; one orjson call when nothing needs making safe (only
    JSON's own types, string keys, no lone surrogate, no NUL), which is nearly always."""
    try:
        text = orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: another type, a non-string key, a surrogate
        return _json_text(_safe_json(value))
    # A NUL is written \u0000 (a backslash before "u0000" in the text is only a false alarm).
    return _json_text(_safe_json(value)) if b"\\u0000" in text else text.decode()


def _identity_rows(identities: Iterable[Identity]) -> list[list[Any]]:
    return [[i.kind, i.value, i.verified] for i in identities]


def identity_records(rows: Iterable[Sequence[Any]]) -> tuple[Identity, ...]:
    return tuple(Identity(kind=k, value=v, verified=bool(verified)) for k, v, verified in rows)


def thread_record(d: Dialect, row: Sequence[Any]) -> ThreadRecord:
    return ThreadRecord(
        id=row[0],
        tenant=row[1],
        inbox=row[2],
        customer_id=row[3],
        subject=row[4],
        number=int(row[5]),
        last_activity=d.dt(row[6]),
        open=row[7] == "open",
        merged_into=row[8],
        previous_id=row[9],
    )


def _merge_record(d: Dialect, row: Sequence[Any]) -> MergeRecord:
    return MergeRecord(
        id=row[0],
        tenant=row[1],
        surviving_customer=row[2],
        merged_customers=tuple(d.load_json(row[3])),
        identities=tuple(
            (origin, Identity(kind=kind, value=value, verified=bool(verified)))
            for origin, kind, value, verified in d.load_json(row[4])
        ),
        threads=tuple((origin, thread) for origin, thread in d.load_json(row[5])),
        evidence=d.load_json(row[6]),
        created_at=d.dt(row[7]),
        undone_at=d.dt(row[8]) if row[8] is not None else None,
    )


def _link_record(d: Dialect, row: Sequence[Any]) -> ClaimedLink:
    return ClaimedLink(
        id=row[0],
        tenant=row[1],
        customer_id=row[2],
        other_customer_id=row[3],
        identities=identity_records(d.load_json(row[4])),
        message_id=row[5],
        created_at=d.dt(row[6]),
    )


def _quarantine_record(d: Dialect, row: Sequence[Any]) -> QuarantineRecord:
    return QuarantineRecord(
        id=row[0],
        tenant=row[1],
        channel=row[2],
        inbox=row[3],
        reason=row[4],
        raw_ref=row[5],
        size=row[6],
        received_at=d.dt(row[7]),
        replayed_at=d.dt(row[8]) if row[8] is not None else None,
        replay_result=row[9],
    )


def _media_record(d: Dialect, row: Sequence[Any]) -> MediaFetch:
    return MediaFetch(
        key=row[0],
        channel=row[1],
        inbox=row[2],
        account=row[3],
        ref=row[4],
        kind=row[5],
        state=row[6],
        attempts=row[7],
        next_attempt_at=d.dt(row[8]) if row[8] is not None else None,
        sha256=row[9],
        size=row[10],
        content_type=row[11],
        name=row[12],
        error=row[13],
        created_at=d.dt(row[14]),
    )


def outbox_rows(d: Dialect, conn: Connection, after: int, limit: int) -> list[OutboxRow]:
    """Unpublished events in outbox order, after position ``after``."""
    rows = conn.execute(d.sql(_OUTBOX_FETCH), (after, limit)).fetchall()
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
            created_at=d.dt(r[9]),
        )
        for r in rows
    ]


_SHARDS = tuple(f"{i:02x}" for i in range(256))
_PURGE_BATCH = 5000
_SWEEP_BATCH = 500


def _referenced(d: Dialect, conn: Connection, digests: Sequence[str]) -> set[str]:
    """Which of ``digests`` a committed row names: the blob index, the inline raw archive, fetched
    media, a quarantined envelope. Every file write is indexed in ``blob_files`` by the commit that
    names it, so the other tables (unindexed on these columns) are asked only about what it lacks."""
    # Not through Dialect.sql's cache: the list's length varies.
    marks = ", ".join([d.placeholder] * len(digests))
    query = f"SELECT sha256 FROM blob_files WHERE sha256 IN ({marks})"  # noqa: S608 - placeholders only
    found = {row[0] for row in conn.execute(query, digests).fetchall()}
    for digest in digests:
        if digest in found:
            continue
        row = conn.execute(
            d.sql(
                "SELECT 1 FROM raw_archive WHERE sha256 = ?"
                " UNION ALL SELECT 1 FROM media WHERE sha256 = ?"
                " UNION ALL SELECT 1 FROM quarantine WHERE raw_ref = ?"
            ),
            (digest, digest, raw_ref(digest)),
        ).fetchone()
        if row is not None:
            found.add(digest)
    return found


def _insert_events(d: Dialect, conn: Connection, events: Sequence[Event], now: datetime) -> None:
    created = d.ts(now)
    executemany(
        conn,
        d.sql(_OUTBOX_INSERT),
        [
            (e.event_id, e.type, e.routing_key, e.tenant, e.channel, e.thread_id, e.sequence, e.body, created)
            for e in events
        ],
    )


def stored_identities(
    identities: Sequence[Identity], stored: Mapping[Key, tuple[str, bool]]
) -> list[StoredIdentity]:
    """:meth:`SqlTx.find_identities`'s answer from :meth:`Dialect.find_identities`'s."""
    found: list[StoredIdentity] = []
    for identity in identities:
        hit = stored.get(identity.key())
        if hit is not None:
            found.append(
                StoredIdentity(kind=identity.kind, value=identity.value, customer_id=hit[0], verified=hit[1])
            )
    return found


def recent_text_records(d: Dialect, customer_id: str, rows: Iterable[Sequence[Any]]) -> list[RecentText]:
    return [
        RecentText(customer_id=customer_id, message_id=m, thread_id=t, channel=c, text=text, at=d.dt(at))
        for m, t, c, text, at in rows
    ]


class CachedThreadReads:
    """:class:`dedupe.tx.ThreadReads` from a function per answer, each called once, when its answer
    is first asked for.

    Plain attributes, not ``functools.cache``: wrapping three closures for every placement cost
    more than the reads they saved on the SQLite writer (whose reads are mostly from memory).
    """

    __slots__ = ("_identities", "_identities_fn", "_open_threads", "_open_threads_fn", "_texts", "_texts_fn")

    def __init__(
        self,
        recent_texts: Callable[[], list[RecentText]],
        open_threads: Callable[[], list[ThreadRecord]],
        identities: Callable[[], tuple[Identity, ...]],
    ) -> None:
        self._texts_fn, self._open_threads_fn, self._identities_fn = recent_texts, open_threads, identities
        self._texts: list[RecentText] | None = None
        self._open_threads: list[ThreadRecord] | None = None
        self._identities: tuple[Identity, ...] | None = None

    def recent_texts(self) -> list[RecentText]:
        if self._texts is None:
            self._texts = self._texts_fn()
        return self._texts

    def open_threads(self) -> list[ThreadRecord]:
        if self._open_threads is None:
            self._open_threads = self._open_threads_fn()
        return self._open_threads

    def identities(self) -> tuple[Identity, ...]:
        if self._identities is None:
            self._identities = self._identities_fn()
        return self._identities


# -- the Tx ---------------------------------------------------------------------------------------


class SqlTx:
    """:class:`dedupe.tx.Tx` over one open transaction (SQLite savepoint, PostgreSQL transaction)."""

    def __init__(self, conn: Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._d = dialect
        self.serialized = dialect.serialized
        # Keys claimed on a serialized store, not written yet: key -> (message id, time, fingerprint).
        self._claims: dict[str, tuple[str, Any, str | None]] = {}

    def _x(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._conn.execute(self._d.sql(sql), params)

    def _thread(self, sql: str, params: Sequence[Any]) -> ThreadRecord | None:
        row = self._x(sql, params).fetchone()
        return thread_record(self._d, row) if row is not None else None

    # -- idempotency ---------------------------------------------------------------------------

    def claim_key(
        self, key: str, message_id: str, now: datetime, fingerprint: str | None = None
    ) -> Placement | None:
        # Not claimed when the key's tombstone is there: its customer was erased, and a retry of
        # their message must not bring it back (gateway.store.erase).
        tombstone = erased_key(key)
        if self.serialized:
            # The only writer: nothing can take the key between this look and complete_claim,
            # which inserts the whole row (one write where claiming first costs two).
            rows = self._x(_KEY_PROBE, (key, tombstone)).fetchall()
            if not rows:
                self._claims[key] = (message_id, self._d.ts(now), fingerprint)
                return None
            row = min(rows, key=lambda r: r[-1] != key)  # the key's own row before its tombstone
        else:
            # RETURNING, not rowcount: a pipelined placement (PostgreSQL) learns a statement's row
            # count only once its results are read.
            claimed = self._x(
                "INSERT INTO idempotency_keys (key, message_id, created_at, fingerprint)"
                " SELECT ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE key = ?)"
                " ON CONFLICT (key) DO NOTHING RETURNING 1",
                (key, message_id, self._d.ts(now), fingerprint, tombstone),
            ).fetchone()
            if claimed is not None:
                return None
            # A concurrent claim waited above for the first transaction and sees its row.
            row = self._x(_KEY_SELECT, (key,)).fetchone()
            row = row or self._x(_KEY_SELECT, (tombstone,)).fetchone()
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
            # A key claimed before fingerprints were kept (NULL) matches anything.
            conflict=fingerprint is not None and row[7] is not None and row[7] != fingerprint,
            thread_number=int(row[8]) if row[8] is not None else None,
        )

    def complete_claim(self, key: str, placement: Placement) -> None:
        placed = (
            placement.thread_id,
            placement.customer_id,
            placement.sequence,
            placement.is_new_thread,
            placement.duplicate_of,
            placement.previous_thread_id,
        )
        claim = self._claims.pop(key, None)
        if claim is None:
            self._x(
                "UPDATE idempotency_keys SET thread_id = ?, customer_id = ?, sequence = ?, is_new_thread = ?,"
                " duplicate_of = ?, previous_thread_id = ? WHERE key = ?",
                (*placed, key),
            )
            return
        # A plain INSERT: should the key exist after all, the placement fails instead of hiding it.
        self._x(
            "INSERT INTO idempotency_keys (key, message_id, created_at, fingerprint, thread_id,"
            " customer_id, sequence, is_new_thread, duplicate_of, previous_thread_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, *claim, *placed),
        )

    # -- locks ---------------------------------------------------------------------------------

    def lock_identities(self, tenant: str, keys: Sequence[tuple[str, str]]) -> None:
        if keys:
            self._d.lock_identities(self._conn, tenant, keys)

    def lock_customers(self, customer_ids: Sequence[str]) -> None:
        if customer_ids:
            self._d.lock_customers(self._conn, customer_ids)

    def holds_customers(self, customer_ids: Sequence[str]) -> bool:
        return False

    # -- customers and identities --------------------------------------------------------------

    def prefetch_identities(self, tenant: str, identities: Sequence[Identity]) -> None:
        pass

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        if not identities:
            return []
        return stored_identities(
            identities, self._d.find_identities(self._conn, tenant, [i.key() for i in identities])
        )

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None:
        self._x(
            "INSERT INTO customers (id, tenant, display_name, merged_into, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (customer.id, customer.tenant, customer.display_name, customer.merged_into, self._d.ts(now)),
        )

    def find_customer(self, customer_id: str) -> CustomerRecord | None:
        row = self._x(
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
        self._x("UPDATE customers SET display_name = ? WHERE id = ?", (display_name, customer_id))

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        self._x(
            "INSERT INTO identities (tenant, kind, value, customer_id, verified, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (tenant, identity.kind, identity.value, customer_id, identity.verified, self._d.ts(now)),
        )

    def mark_verified(self, tenant: str, identity: Identity) -> None:
        self._x(
            "UPDATE identities SET verified = true WHERE tenant = ? AND kind = ? AND value = ?",
            (tenant, identity.kind, identity.value),
        )

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]:
        return identity_records(self._x(CUSTOMER_IDENTITIES, (customer_id,)).fetchall())

    def move_identities(
        self, tenant: str, keys: Sequence[tuple[str, str]], from_customer: str, to_customer: str
    ) -> list[Identity]:
        if not keys:
            return []
        moved = self._d.move_identities(self._conn, tenant, keys, (from_customer, to_customer))
        return [Identity(kind=k, value=v, verified=moved[(k, v)]) for k, v in keys if (k, v) in moved]

    def set_merged_into(self, customer_id: str, into: str | None) -> None:
        self._x("UPDATE customers SET merged_into = ? WHERE id = ?", (into, customer_id))

    def add_merge(self, merge: MergeRecord) -> None:
        self._x(
            f"INSERT INTO {{merges}} ({_MERGE_COLUMNS})"  # noqa: S608 - column names and dialect words only
            " VALUES (?, ?, ?, ?, ?{json}, ?{json}, ?{json}, ?, ?)",
            (
                merge.id,
                merge.tenant,
                merge.surviving_customer,
                self._d.text_array(list(merge.merged_customers)),
                _json_text([[origin, i.kind, i.value, i.verified] for origin, i in merge.identities]),
                _json_text([list(t) for t in merge.threads]),
                _json_text(dict(merge.evidence)),
                self._d.ts(merge.created_at),
                self._d.ts(merge.undone_at) if merge.undone_at is not None else None,
            ),
        )
        self._d.add_merge_members(self._conn, merge)

    def get_merge(self, merge_id: str) -> MergeRecord | None:
        row = self._x(f"SELECT {_MERGE_COLUMNS} FROM {{merges}} WHERE id = ?", (merge_id,)).fetchone()  # noqa: S608
        return _merge_record(self._d, row) if row is not None else None

    def mark_merge_undone(self, merge_id: str, at: datetime) -> None:
        self._x("UPDATE {merges} SET undone_at = ? WHERE id = ?", (self._d.ts(at), merge_id))

    def customer_merges(self, customer_id: str) -> list[MergeRecord]:
        rows = self._x(
            f"SELECT {_MERGE_COLUMNS} FROM {{merges}} WHERE {{merges_of}}"  # noqa: S608
            " ORDER BY created_at, id{collate}",
            (customer_id,) * self._d.words["merges_of"].count("?"),
        ).fetchall()
        return [_merge_record(self._d, r) for r in rows]

    def add_claimed_link(self, link: ClaimedLink) -> None:
        self._x(
            f"INSERT INTO claimed_links ({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?{{json}}, ?, ?)",  # noqa: S608
            (
                link.id,
                link.tenant,
                link.customer_id,
                link.other_customer_id,
                _json_text(_identity_rows(link.identities)),
                link.message_id,
                self._d.ts(link.created_at),
            ),
        )

    def claimed_links(self, customer_id: str) -> list[ClaimedLink]:
        rows = self._x(
            f"SELECT {_LINK_COLUMNS} FROM claimed_links"  # noqa: S608
            " WHERE customer_id = ? OR other_customer_id = ? ORDER BY created_at, id{collate}",
            (customer_id, customer_id),
        ).fetchall()
        return [_link_record(self._d, r) for r in rows]

    # -- threads -------------------------------------------------------------------------------

    def find_open_thread(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> ThreadRecord | None:
        return self._thread(
            f"SELECT {THREAD_COLUMNS} FROM threads"  # noqa: S608
            " WHERE customer_id = ? AND tenant = ? AND inbox = ? AND status = 'open' AND last_activity >= ?"
            " ORDER BY last_activity DESC LIMIT 1",
            (customer_id, tenant, inbox, self._d.ts(active_since)),
        )

    def open_threads(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> list[ThreadRecord]:
        rows = self._x(OPEN_THREADS, (customer_id, tenant, inbox, self._d.ts(active_since))).fetchall()
        return [thread_record(self._d, r) for r in rows]

    def get_thread(self, thread_id: str) -> ThreadRecord | None:
        return self._thread(f"SELECT {THREAD_COLUMNS} FROM threads WHERE id = ?", (thread_id,))  # noqa: S608

    def find_successor(self, thread_id: str) -> ThreadRecord | None:
        # The highest number is the newest: numbers are handed out in creation order per tenant.
        return self._thread(
            f"SELECT {THREAD_COLUMNS} FROM threads WHERE previous_id = ? ORDER BY number DESC LIMIT 1",  # noqa: S608
            (thread_id,),
        )

    def find_thread_by_number(self, tenant: str, number: int) -> ThreadRecord | None:
        return self._thread(
            f"SELECT {THREAD_COLUMNS} FROM threads WHERE tenant = ? AND number = ?",  # noqa: S608
            (tenant, number),
        )

    def find_thread_by_rfc822(self, tenant: str, rfc822_message_id: str) -> ThreadRecord | None:
        found = self._thread(
            f"SELECT {_THREAD_COLUMNS_T} FROM messages m JOIN threads t ON t.id = m.thread_id"  # noqa: S608
            " WHERE m.rfc822_message_id = ? AND t.tenant = ? ORDER BY m.received_at DESC LIMIT 1",
            (rfc822_message_id, tenant),
        )
        if found is not None:
            return found
        # A reply of ours by email: its Message-ID is the provider id the ledger keeps.
        return self._thread(
            f"SELECT {_THREAD_COLUMNS_T} FROM replies r JOIN threads t ON t.id = r.thread_id"  # noqa: S608
            " WHERE r.channel = 'email' AND r.provider_message_id = ? AND t.tenant = ? LIMIT 1",
            (rfc822_message_id, tenant),
        )

    def find_thread_by_key(self, tenant: str, channel: str, inbox: str, key: str) -> ThreadRecord | None:
        return self._thread(
            f"SELECT {_THREAD_COLUMNS_T} FROM thread_keys k JOIN threads t ON t.id = k.thread_id"  # noqa: S608
            " WHERE k.tenant = ? AND k.channel = ? AND k.inbox = ? AND k.key = ?",
            (tenant, channel, inbox, key),
        )

    def add_thread_key(
        self, tenant: str, channel: str, inbox: str, key: str, thread_id: str, now: datetime
    ) -> None:
        self._x(
            "INSERT INTO thread_keys (tenant, channel, inbox, key, thread_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (tenant, channel, inbox, key, thread_id, self._d.ts(now)),
        )

    def customer_thread_ids(self, customer_id: str) -> list[str]:
        rows = self._x(
            "SELECT id FROM threads WHERE customer_id = ? ORDER BY number", (customer_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def move_threads(self, thread_ids: Sequence[str], to_customer: str) -> None:
        if thread_ids:
            self._d.for_each(
                self._conn, "UPDATE threads SET customer_id = ? WHERE id {each}", (to_customer,), thread_ids
            )

    def next_thread_number(self, tenant: str) -> int:
        row = self._x(
            "INSERT INTO tenant_counters (tenant, next_thread_number) VALUES (?, 2)"
            " ON CONFLICT (tenant) DO UPDATE SET next_thread_number = tenant_counters.next_thread_number + 1"
            " RETURNING next_thread_number - 1",
            (tenant,),
        ).fetchone()
        return int(row[0])

    def create_thread(self, thread: ThreadRecord) -> None:
        self._x(
            "INSERT INTO threads (id, tenant, inbox, customer_id, subject, status, number, last_activity,"
            " next_sequence, merged_into, previous_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?)",
            (
                thread.id,
                thread.tenant,
                thread.inbox,
                thread.customer_id,
                thread.subject,
                "open" if thread.open else "closed",
                thread.number,
                self._d.ts(thread.last_activity),
                thread.merged_into,
                thread.previous_id,
                self._d.ts(thread.last_activity),
            ),
        )

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        # The UPDATE locks the row until commit: a concurrent advance waits, then sees this one.
        row = self._x(
            "UPDATE threads SET next_sequence = next_sequence + 1,"
            " last_activity = {greatest}(last_activity, ?) WHERE id = ? RETURNING next_sequence - 1",
            (self._d.ts(now), thread_id),
        ).fetchone()
        if row is None:
            raise StoreError(f"unknown thread {thread_id!r}")
        return int(row[0])

    def set_thread_status(self, thread_id: str, open: bool, at: datetime) -> bool:
        row = self._x("SELECT merged_into FROM threads WHERE id = ?{for_update}", (thread_id,)).fetchone()
        if row is None:
            return False
        if row[0] is not None:
            return True  # a merged thread stays merged and closed
        if open:
            self._x(
                "UPDATE threads SET status = 'open', last_activity = {greatest}(last_activity, ?)"
                " WHERE id = ?",
                (self._d.ts(at), thread_id),
            )
        else:
            self._x("UPDATE threads SET status = 'closed' WHERE id = ?", (thread_id,))
        return True

    def merge_thread(self, thread_id: str, into: str, now: datetime) -> None:
        self._x("UPDATE threads SET status = 'closed', merged_into = ? WHERE id = ?", (into, thread_id))

    # -- messages ------------------------------------------------------------------------------

    def add_message(self, message: MessageRecord) -> None:
        self._x(
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
                self._d.ts(message.received_at),
            ),
        )

    def recent_texts(self, customer_id: str, since: datetime, *, not_channel: str) -> list[RecentText]:
        rows = self._x(
            RECENT_TEXTS, (customer_id, self._d.ts(since), not_channel, RECENT_TEXTS_KEPT)
        ).fetchall()
        return recent_text_records(self._d, customer_id, rows)

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
        # Each read when first asked for: one at a time costs nothing more here than all at once.
        return CachedThreadReads(
            lambda: (
                []
                if texts_since is None
                else self.recent_texts(customer_id, texts_since, not_channel=not_channel)
            ),
            lambda: self.open_threads(
                customer_id=customer_id, tenant=tenant, inbox=inbox, active_since=active_since
            ),
            lambda: self.customer_identities(customer_id),
        )

    def add_recent_text(self, text: RecentText) -> None:
        # Only the newest RECENT_TEXTS_KEPT of a channel can ever be returned: without the cap, a
        # customer busy on one channel made recent_texts read every one of them for each message.
        self._d.add_recent_text(
            self._conn,
            (text.customer_id, text.channel, self._d.ts(text.at), text.message_id, text.thread_id, text.text),
        )


# -- the store ------------------------------------------------------------------------------------


class SqlStore(ReplyLedger, abc.ABC):
    """The :class:`gateway.store.base.Store` methods both backends share.

    A backend supplies how a job reaches the database (:meth:`_write`, :meth:`_read`), how the
    outbox backlog is counted and bounded, and its lifecycle; the jobs here get a connection inside
    an open transaction and never commit.
    """

    dialect: ClassVar[Dialect]

    def __init__(self, settings: StoreSettings, outbox: OutboxSettings, clock: Clock) -> None:
        self._settings = settings
        self._outbox = outbox
        self._clock = clock
        self._blobs = BlobDir(settings.blob_dir)
        self._disk_lock = threading.Lock()
        self._disk_checked_at = -_DISK_CHECK_INTERVAL
        self._disk_low = False

    # -- what a backend provides ------------------------------------------------------------------

    @abc.abstractmethod
    async def _write(self, fn: Callable[[Connection], T], *, events: bool = False) -> T:
        """Run ``fn`` in one durable transaction; ``events``: it may add outbox events."""

    async def _write_placement(
        self, fn: Callable[[Connection], T], messages: Sequence[CanonicalMessage]
    ) -> T:
        """Run an :meth:`accept` job (it adds events) placing ``messages``. A backend may run it
        differently: PostgreSQL groups concurrent jobs into one transaction and pipelines their
        statements. The job reads no ``rowcount`` (a pipelined cursor has none yet). The job writes
        customers, identities and threads only through :meth:`_tx`."""
        return await self._write(fn, events=True)

    async def _write_marks(self, fn: Callable[[Connection], T]) -> T:
        """Run an :meth:`outbox_mark_published` job (or :meth:`ping`'s): it writes the outbox and
        counters only."""
        return await self._write(fn)

    async def _write_text_purge(self, fn: Callable[[Connection], int]) -> int:
        """Run a :meth:`purge_recent_texts` job: it deletes recent texts only, and says how many."""
        return await self._write(fn)

    def _tx(self, conn: Connection) -> SqlTx:
        """The placement engine's Tx over ``conn`` (a backend may keep rows it owns in memory)."""
        return SqlTx(conn, self.dialect)

    @abc.abstractmethod
    async def _read(self, fn: Callable[[Connection], T]) -> T: ...

    @abc.abstractmethod
    def _count_events(self, conn: Connection, rows: int, *, bounded: bool) -> None:
        """Count ``rows`` events just added; when ``bounded``, raise BacklogFull past ``max_backlog``."""

    @abc.abstractmethod
    def _count_published(self, conn: Connection, rows: int) -> None:
        """Count ``rows`` events just marked published."""

    def _add_events(self, conn: Connection, events: Sequence[Event], now: datetime) -> None:
        _insert_events(self.dialect, conn, events, now)
        self._count_events(conn, len(events), bounded=False)

    def _add_reply_route(self, conn: Connection, message: CanonicalMessage, placement: Placement) -> None:
        """What answering ``message`` needs (``gateway.store.replies``), in the message's transaction."""
        d = self.dialect
        conn.execute(
            d.sql(ROUTE_INSERT),
            (
                placement.message_id,
                message.tenant,
                placement.thread_id,
                placement.customer_id,
                message.channel,
                message.inbox,
                _safe_text(message.external_id) if message.external_id is not None else None,
                _safe_json_text(_identity_rows(message.identities)),
                _safe_json_text(dict(message.extra)),
                d.ts(message.received_at),
            ),
        )

    # -- disk and blobs ---------------------------------------------------------------------------

    def _check_disk(self) -> None:
        """Refuse new work early when the disk under the blob directory is nearly full."""
        if self._disk_is_low():
            raise BacklogFull(
                f"less than {self._settings.min_free_disk_mb} MB free under {self._settings.blob_dir}",
                retry_after=self._outbox.retry_after,
            )

    def _disk_is_low(self) -> bool:
        with self._disk_lock:
            now = time.monotonic()
            if now - self._disk_checked_at >= _DISK_CHECK_INTERVAL:
                # statvfs reads file-system metadata the kernel keeps in memory; it does not wait on I/O.
                free = self._blobs.free_bytes()
                self._disk_low = free < self._settings.min_free_disk_mb * 1024 * 1024
                self._disk_checked_at = now
            return self._disk_low

    def _write_files(self, blobs: Sequence[tuple[bytes, str | None]]) -> list[_BlobFile]:
        """Durably write blobs (before the commit that references them); ``[(sha256, size, type)]``."""
        return [(self._blobs.put(data), len(data), content_type) for data, content_type in blobs]

    async def _prepare_blobs(
        self, body: bytes, attachments: Sequence[Attachment]
    ) -> tuple[str, list[_BlobFile]]:
        """The raw body's sha256 and the files written; no await when nothing goes to a file."""
        inline = len(body) <= self._settings.inline_raw_max
        if inline and not attachments:
            return sha256_hex(body), []
        blobs: list[tuple[bytes, str | None]] = [] if inline else [(body, None)]
        blobs += [(a.data, a.content_type) for a in attachments]
        files = await asyncio.to_thread(self._write_files, blobs)
        return sha256_hex(body), files

    def _archive(
        self, conn: Connection, body: bytes, digest: str, files: Sequence[_BlobFile], now: datetime
    ) -> None:
        """Keep a small raw body in the database and index the blob files written for this job."""
        d = self.dialect
        if len(body) <= self._settings.inline_raw_max:
            conn.execute(
                d.sql(
                    "INSERT INTO raw_archive (sha256, data, created_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (sha256) DO NOTHING"
                ),
                (digest, body, d.ts(now)),
            )
        self._index_files(conn, files, now)

    def _index_files(self, conn: Connection, files: Sequence[_BlobFile], now: datetime) -> None:
        d = self.dialect
        # The first content type given for the bytes is kept (a raw body gives none).
        executemany(
            conn,
            d.sql(
                "INSERT INTO blob_files (sha256, size, created_at, content_type) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (sha256) DO UPDATE"
                " SET content_type = COALESCE(blob_files.content_type, excluded.content_type),"
                # Stored again: retention counts from now (the file was touched by BlobDir.put).
                " used_at = excluded.created_at"
            ),
            [(digest, size, d.ts(now), content_type) for digest, size, content_type in files],
        )

    # -- writes -----------------------------------------------------------------------------------

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
        attachments = [a for m in messages for a in m.attachments]
        digest, files = await self._prepare_blobs(envelope.body, attachments)
        ref = raw_ref(digest)
        d = self.dialect

        def job(conn: Connection) -> list[Placement]:
            now = self._clock()
            self._archive(conn, envelope.body, digest, files, now)
            tx = self._tx(conn)
            placements: list[Placement] = []
            events: list[Event] = []
            for message, policy in zip(messages, policies, strict=True):
                placed = place(tx, message, policy, now=now)
                if not placed.placement.duplicate:
                    record_content(d, conn, message, placed.placement, digest)
                # Merge events first: a desk learns of the merged thread before the message on it.
                events.extend(placed.events)
                if placed.customer is not None:
                    events.append(
                        build_event(message, placed.placement, placed.customer, placed.thread_subject, ref)
                    )
                    self._add_reply_route(conn, message, placed.placement)
                placements.append(placed.placement)
            _insert_events(d, conn, events, now)
            # Counted where the rows are known, so duplicates (which enqueue nothing) still get
            # their answer when the outbox is full.
            self._count_events(conn, len(events), bounded=True)
            return placements

        return await self._write_placement(job, messages)

    async def quarantine(self, envelope: RawEnvelope, reason: str) -> QuarantineRecord:
        self._check_disk()
        digest, files = await self._prepare_blobs(envelope.body, ())
        d = self.dialect
        # Every text below may come from the request (a header, an SMTP envelope, an exception
        # quoting input): made storable here, so a quarantine never fails on what a request carried.
        reason = _safe_text(reason)
        record = QuarantineRecord(
            id=new_id("qua"),
            tenant=envelope.tenant,
            channel=envelope.channel,
            inbox=envelope.inbox,
            reason=reason,
            raw_ref=raw_ref(digest),
            size=len(envelope.body),
            received_at=d.dt(d.ts(envelope.received_at)),  # as it reads back
        )
        headers = _safe_json_text(envelope.headers)
        meta = _safe_json_text(envelope.meta)
        content_type = _safe_text(envelope.content_type) if envelope.content_type is not None else None
        remote = _safe_text(envelope.remote) if envelope.remote is not None else None

        def job(conn: Connection) -> QuarantineRecord:
            now = self._clock()
            self._archive(conn, envelope.body, digest, files, now)
            conn.execute(
                d.sql(
                    "INSERT INTO quarantine (id, tenant, channel, inbox, reason, raw_ref, size, received_at,"
                    " content_type, headers, meta, signature_verified, retry, remote, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                (
                    record.id,
                    record.tenant,
                    record.channel,
                    record.inbox,
                    record.reason,
                    record.raw_ref,
                    record.size,
                    d.ts(record.received_at),
                    content_type,
                    headers,
                    meta,
                    envelope.signature_verified,
                    envelope.retry,
                    remote,
                    d.ts(now),
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
            _insert_events(d, conn, [event], now)
            self._count_events(conn, 1, bounded=True)
            return record

        return await self._write(job, events=True)

    async def transact(self, work: TxWork[T]) -> T:
        # Not bounded by max_backlog: desk and control operations record decisions already made.
        def job(conn: Connection) -> T:
            now = self._clock()
            value, events = work(self._tx(conn), now)
            _insert_events(self.dialect, conn, events, now)
            self._count_events(conn, len(events), bounded=False)
            return value

        return await self._write(job, events=True)

    async def enqueue(self, events: Sequence[Event]) -> None:
        # Not bounded by max_backlog: these record state changes already made (merges, control).
        def job(conn: Connection) -> None:
            _insert_events(self.dialect, conn, events, self._clock())
            self._count_events(conn, len(events), bounded=False)

        if events:
            await self._write(job, events=True)

    async def outbox_mark_published(self, positions: Sequence[int]) -> None:
        d = self.dialect

        def job(conn: Connection) -> None:
            published = d.for_each(
                conn,
                "UPDATE outbox SET published_at = ? WHERE published_at IS NULL AND position {each}",
                (d.ts(self._clock()),),
                positions,
            )
            if not published:
                return
            self._count_published(conn, published)
            conn.execute(
                d.sql(
                    "INSERT INTO counters (name, value) VALUES ('published_total', ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value"
                ),
                (published,),
            )

        if positions:
            await self._write_marks(job)

    async def quarantine_mark_replayed(self, quarantine_id: str, result: str) -> None:
        d = self.dialect

        def job(conn: Connection) -> None:
            conn.execute(
                d.sql("UPDATE quarantine SET replayed_at = ?, replay_result = ? WHERE id = ?"),
                (d.ts(self._clock()), result, quarantine_id),
            )

        await self._write(job)

    async def purge_expired(self, now: datetime) -> int:
        """Drop idempotency keys past the retention, and published outbox rows just as old, in
        batches; how many keys went."""
        cutoff = now - timedelta(seconds=self._settings.idempotency_retention)
        purged = 0
        for kind in ("keys", "events"):
            while True:
                done = await self.purge_retained(kind, cutoff, _PURGE_BATCH)
                purged += done if kind == "keys" else 0
                if done < _PURGE_BATCH:
                    break
        return purged

    async def purge_retained(self, kind: str, before: datetime, limit: int) -> int:
        if kind not in RETAINED_KINDS:
            raise ValueError(f"not a retained kind: {kind!r}")
        d = self.dialect
        # A file touched this recently may be about to be named by a commit (see BlobDir.put): it
        # stays on disk, and the orphan sweep removes it later if nothing names it.
        file_cutoff = time.time() - self._settings.orphan_min_age
        purged = await self._write(lambda conn: purge_batch(d, conn, kind, d.ts(before), limit))
        if purged.files:
            await asyncio.to_thread(self._blobs.remove_stale, purged.files, file_cutoff)
        return purged.rows

    async def reclaim_space(self, pages: int) -> int:
        return 0

    async def _after_erase(self) -> None:
        """What a backend does once an erasure is committed (SQLite: scrub the WAL and free pages)."""

    async def erase_customer(
        self, customer_id: str, *, requested_by: str | None = None, tenant: str | None = None
    ) -> Erasure | None:
        d = self.dialect
        started = time.time()
        # The scans (outbox bodies, idempotency keys) run on a reader, off the writer's path; the
        # erasing transaction looks again only at what was added since.
        scan = await self._read(lambda conn: erase_scan(d, conn, customer_id, tenant, d.ts(self._clock())))
        if scan is None:
            return None
        erasure_id = new_id("era")

        def job(conn: Connection) -> tuple[Erasure, list[str]]:
            now = self._clock()
            erased = erase(d, conn, scan, d.ts(now))
            if erased.unpublished:
                self._count_published(conn, erased.unpublished)
            conn.execute(
                d.sql(
                    "INSERT INTO erasures (id, tenant, customer_id, requested_by, counts, digest,"
                    " requested_at) VALUES (?, ?, ?, ?, ?{json}, ?, ?)"
                ),
                (*audit_row(erased, erasure_id, requested_by), d.ts(now)),
            )
            scope = erased.scope
            merged = tuple(c for c in scope.customers if c != scope.customer_id)
            record = Erasure(
                id=erasure_id, tenant=scope.tenant, customer_id=scope.customer_id, merged_customers=merged,
                threads=tuple(scope.threads), requested_by=requested_by, requested_at=now,
                counts=erased.counts, digest=erased.digest,
            )  # fmt: skip
            event = customer_erased(
                tenant=scope.tenant, customer_id=scope.customer_id, merged_customers=merged,
                threads=scope.threads, erasure_id=erasure_id, counts=erased.counts, digest=erased.digest,
                occurred_at=now,
            )  # fmt: skip
            _insert_events(d, conn, [event], now)
            self._count_events(conn, 1, bounded=False)
            return record, erased.files

        record, files = await self._write(job, events=True)
        if files:
            # Files stored again since the erasure began belong to a message committed meanwhile.
            await asyncio.to_thread(self._blobs.remove_stale, files, started)
        await self._after_erase()
        return record

    async def purge_recent_texts(self, before: datetime, limit: int = 500) -> int:
        d = self.dialect

        def job(conn: Connection) -> int:
            deleted = conn.execute(
                d.sql(
                    "DELETE FROM recent_texts WHERE ({recent_text_key}) IN ("
                    "SELECT {recent_text_key} FROM recent_texts WHERE at < ? ORDER BY at LIMIT ?)"
                ),
                (d.ts(before), limit),
            ).rowcount
            return max(deleted, 0)

        return await self._write_text_purge(job)

    async def sweep_orphans(self, min_age: float) -> int:
        """Remove blob files no committed row names and older than ``min_age`` seconds; how many.

        Files are written before the commit that names them, so a commit that failed (a full disk,
        a full outbox, a crash) leaves its files behind. Only files older than ``min_age`` are
        candidates: another instance sharing the directory may be about to commit one it just
        wrote (or touched: :meth:`BlobDir.put`). Shard by shard, so memory stays small.
        """
        cutoff = time.time() - min_age
        removed = 0
        for shard in _SHARDS:
            names, leftovers = await asyncio.to_thread(self._blobs.stale, shard, cutoff)
            removed += leftovers
            for start in range(0, len(names), _SWEEP_BATCH):
                batch = names[start : start + _SWEEP_BATCH]
                referenced = await self._read(functools.partial(_referenced, self.dialect, digests=batch))
                orphans = [name for name in batch if name not in referenced]
                if orphans:
                    removed += await asyncio.to_thread(self._blobs.remove_stale, orphans, cutoff)
        return removed

    async def ping(self) -> None:
        """A real write: a probe file written and fsynced where the store writes files, then a
        committed row. A full disk fails here even when SQLite could still reuse its WAL's space."""
        if self._disk_is_low():
            raise BacklogFull("free disk below store.min_free_disk_mb", retry_after=self._outbox.retry_after)
        await asyncio.to_thread(self._probe_files)

        def job(conn: Connection) -> None:
            conn.execute(self.dialect.ping_sql)

        # It writes a counter only: as an outbox mark does, it leaves what a backend keeps in memory
        # (the SQLite writer's hot rows) true, and a readiness probe every few seconds must not
        # make the writer read every customer back.
        await self._write_marks(job)

    def _probe_dirs(self) -> list[Path]:
        """Directories the store writes files in (SQLite adds its database's)."""
        return [self._settings.blob_dir]

    def _probe_files(self) -> None:
        for directory in self._probe_dirs():
            probe = directory / f".ready-probe-{os.getpid()}"
            try:
                fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, _PROBE_BYTES)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(probe)

    # -- connector state --------------------------------------------------------------------------

    async def state_put(self, key: str, value: bytes) -> None:
        d = self.dialect

        def job(conn: Connection) -> None:
            conn.execute(
                d.sql(
                    "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
                ),
                (key, value, d.ts(self._clock())),
            )

        await self._write(job)

    async def state_cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        d = self.dialect

        def job(conn: Connection) -> bool:
            now = d.ts(self._clock())
            if expected is None:
                # A concurrent insert of the key (PostgreSQL) waits for the first and then conflicts.
                sql = (
                    "INSERT INTO state (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) DO NOTHING"
                )
                params: tuple[Any, ...] = (key, value, now)
            else:
                # The row lock makes a concurrent update wait and then re-check ``value`` (read committed).
                sql = "UPDATE state SET value = ?, updated_at = ? WHERE key = ? AND value = ?"
                params = (value, now, key, expected)
            return conn.execute(d.sql(sql), params).rowcount == 1

        return await self._write(job)

    async def state_get(self, key: str) -> bytes | None:
        def read(conn: Connection) -> bytes | None:
            row = conn.execute(self.dialect.sql("SELECT value FROM state WHERE key = ?"), (key,)).fetchone()
            return bytes(row[0]) if row is not None else None

        return await self._read(read)

    async def blob_put(self, data: bytes, content_type: str | None) -> str:
        """Keep ``data`` in the blob store (a reply's attachment fetched by URL); its sha256."""
        digest = await asyncio.to_thread(self._blobs.put, data)

        def job(conn: Connection) -> None:
            self._index_files(conn, [(digest, len(data), content_type)], self._clock())

        await self._write(job)
        return digest

    # -- media fetch queue (see Store.media_*) ----------------------------------------------------

    async def media_enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        d = self.dialect
        rows = [
            (f.key, f.channel, f.inbox, f.account, f.ref, f.kind, f.name, f.content_type,
             d.ts(f.next_attempt_at or f.created_at), d.ts(f.created_at))
            for f in fetches
        ]  # fmt: skip

        def job(conn: Connection) -> None:
            executemany(
                conn,
                d.sql(
                    "INSERT INTO media (key, channel, inbox, account, ref, kind, name, content_type,"
                    " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (key) DO NOTHING"
                ),
                rows,
            )

        if rows:
            await self._write(job)

    async def media_claim(self, now: datetime, limit: int, lease: float, *, channel: str) -> list[MediaFetch]:
        d = self.dialect

        def job(conn: Connection) -> list[MediaFetch]:
            # SKIP LOCKED (PostgreSQL): fetchers on other instances claim other rows instead of waiting.
            rows = conn.execute(
                d.sql(
                    "UPDATE media SET attempts = attempts + 1, next_attempt_at = ? WHERE key IN"  # noqa: S608
                    " (SELECT key FROM media WHERE state = 'pending' AND channel = ? AND next_attempt_at <= ?"
                    f" ORDER BY next_attempt_at LIMIT ?{{skip_locked}}) RETURNING {_MEDIA_COLUMNS}"
                ),
                (d.ts(now + timedelta(seconds=lease)), channel, d.ts(now), limit),
            ).fetchall()
            return sorted((_media_record(d, r) for r in rows), key=lambda f: (f.created_at, f.key))

        return await self._write(job)

    async def media_done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        digest = await asyncio.to_thread(self._blobs.put, data)
        d = self.dialect

        def job(conn: Connection) -> None:
            self._index_files(conn, [(digest, len(data), content_type)], self._clock())
            conn.execute(
                d.sql(
                    "UPDATE media SET state = 'done', sha256 = ?, size = ?, content_type = ?, name = ?,"
                    " error = NULL, next_attempt_at = NULL WHERE key = ?"
                ),
                (digest, len(data), content_type, name, key),
            )

        await self._write(job)
        return digest

    async def media_failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        d = self.dialect

        def job(conn: Connection) -> None:
            conn.execute(
                d.sql(
                    "UPDATE media SET state = ?, error = ?, next_attempt_at = ?"
                    " WHERE key = ? AND state = 'pending'"
                ),
                ("pending" if retry_at else "failed", error[:500], d.ts(retry_at) if retry_at else None, key),
            )

        await self._write(job)

    async def media_get(self, key: str) -> MediaFetch | None:
        d = self.dialect

        def read(conn: Connection) -> MediaFetch | None:
            row = conn.execute(d.sql(f"SELECT {_MEDIA_COLUMNS} FROM media WHERE key = ?"), (key,)).fetchone()  # noqa: S608
            return _media_record(d, row) if row is not None else None

        return await self._read(read)

    # -- reads ------------------------------------------------------------------------------------

    async def quarantine_list(self, limit: int = 100) -> list[QuarantineRecord]:
        d = self.dialect

        def read(conn: Connection) -> list[QuarantineRecord]:
            rows = conn.execute(
                d.sql(
                    f"SELECT {_QUARANTINE_COLUMNS} FROM quarantine"  # noqa: S608
                    " ORDER BY created_at DESC, id DESC LIMIT ?"
                ),
                (limit,),
            ).fetchall()
            return [_quarantine_record(d, r) for r in rows]

        return await self._read(read)

    async def quarantine_counts(self) -> QuarantineCounts:
        def read(conn: Connection) -> QuarantineCounts:
            row = conn.execute(
                "SELECT coalesce(sum(CASE WHEN replayed_at IS NULL THEN 1 ELSE 0 END), 0), count(*)"
                " FROM quarantine"
            ).fetchone()
            return QuarantineCounts(held=int(row[0]), total=int(row[1]))

        return await self._read(read)

    async def quarantine_get(self, quarantine_id: str) -> tuple[QuarantineRecord, RawEnvelope] | None:
        d = self.dialect

        def read(conn: Connection) -> tuple[QuarantineRecord, RawEnvelope] | None:
            row = conn.execute(
                d.sql(
                    f"SELECT {_QUARANTINE_COLUMNS}, content_type, headers, meta, signature_verified, retry,"  # noqa: S608
                    " remote FROM quarantine WHERE id = ?"
                ),
                (quarantine_id,),
            ).fetchone()
            if row is None:
                return None
            record = _quarantine_record(d, row)
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

    async def blob_content_type(self, sha256: str) -> str | None:
        if not is_sha256(sha256):
            return None

        def read(conn: Connection) -> str | None:
            row = conn.execute(
                self.dialect.sql("SELECT content_type FROM blob_files WHERE sha256 = ?"), (sha256,)
            ).fetchone()
            return None if row is None else row[0]

        return await self._read(read)

    def _read_blob(self, conn: Connection, sha256: str) -> bytes | None:
        row = conn.execute(
            self.dialect.sql("SELECT data FROM raw_archive WHERE sha256 = ?"), (sha256,)
        ).fetchone()
        if row is not None:
            return bytes(row[0])
        return self._blobs.get(sha256)
