"""The embedded store: one SQLite database (WAL, ``synchronous=FULL``) plus a blob directory.

The event loop never touches the disk. One writer thread owns the write connection and runs
queued jobs; the jobs that queued up while the previous commit was syncing are committed together
(one transaction, one fsync). One failing job does not take its batch siblings down: a batch of
placements and outbox marks runs without savepoints and, should a job fail, runs again with each
job inside its own SAVEPOINT, as any other batch does at once. Results travel back to the
awaiting coroutines through ``loop.call_soon_threadsafe``. Reads run on a separate connection in
one reader thread.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar, cast

import orjson

from core.errors import BacklogFull, StoreError
from core.model import CanonicalMessage
from core.settings import OutboxSettings, StoreSettings
from dedupe.tx import MergeRecord
from gateway.store.base import OutboxRow, OutboxStatus
from gateway.store.engine import (
    Clock,
    Connection,
    Dialect,
    SqlStore,
    SqlTx,
    as_store_error,
    executemany,
    outbox_rows,
    utcnow,
)
from gateway.store.hotrows import HotRows, HotTx
from gateway.store.schema import migrations

logger = logging.getLogger(__name__)

T = TypeVar("T")
# A write job runs on the writer thread inside its own savepoint.
WriteJob = Callable[[sqlite3.Connection], T]

# Seconds between passive WAL checkpoints. Each ends with an fsync of the database file, and on
# ext4 a commit's fsync of the WAL can wait behind it: the more the checkpoint copied, the longer.
# Every 1 s, under 1,000 messages/s, those waits (20-30 ms) were the ack latency's p99; every
# 0.25 s they stay under ~15 ms. An idle WAL makes a checkpoint a no-op.
_CHECKPOINT_INTERVAL = 0.25
_WAL_AUTOCHECKPOINT_PAGES = 16_384
# The writer's page cache: with SQLite's default (2 MiB) every placement re-reads index pages of
# idempotency keys, messages and the outbox once the database outgrows it. Readers keep the default.
_WRITER_CACHE_KIB = 32 * 1024
_WAL_SIZE_LIMIT = 64 * 1024 * 1024
# Customers whose rows the writer keeps in memory (gateway.store.hotrows): a few KB each at most.
_HOT_CUSTOMERS = 20_000
# Batches committed with a savepoint per job after a job failed in a batch without them.
_GUARDED_BATCHES = 16
_GROUP_WAIT_LIMIT = 10.0  # seconds gather_next_batch waits at most, so a test bug cannot hang the writer

# Words of the shared schema (gateway.store.schema): times are integer microseconds; the
# ``*_later`` columns came with migrations 4 and 5 here.
_DDL = {
    "text": "TEXT",
    "int": "INTEGER",
    "bigint": "INTEGER",
    "time": "INTEGER",
    "blob": "BLOB",
    "bool": "INTEGER",
    "false": "0",
    "document": "TEXT",
    "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "without_rowid": " WITHOUT ROWID",
    "idempotency_keys_later": "",
    "customers_later": "",
    "threads_later": "",
}

# Ordered migrations; ``PRAGMA user_version`` is the number applied. Append, never edit.
MIGRATIONS: tuple[str, ...] = migrations(
    _DDL,
    (
        """
    {first}

    {messages}

    {outbox}

    {archive}
    """,
        # 2: small durable connector state (IMAP watermarks, pull cursors).
        """
    {state}
    """,
        # 3: media announced by committed messages (WeChat media_id), fetched after the answer.
        """
    {media}
    CREATE INDEX media_due ON media (channel, next_attempt_at) WHERE state = 'pending';
    """,
        # 4: identity graph (merges, claimed links), thread references and merges, duplicate touchpoints.
        """
    ALTER TABLE customers ADD COLUMN merged_into TEXT;
    ALTER TABLE threads ADD COLUMN merged_into TEXT;
    ALTER TABLE threads ADD COLUMN previous_id TEXT;
    CREATE INDEX threads_customer ON threads (customer_id);
    CREATE INDEX threads_previous ON threads (previous_id) WHERE previous_id IS NOT NULL;

    {thread_keys}

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

    {claimed_links}

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
        # 8: blob files keep their content type (/blobs serves it).
        """
    {blob_content_type}
    """,
        # 9: what the first delivery of a key said (CanonicalMessage.fingerprint), so a reuse of the
        # key for other content is told from a retry.
        """
    ALTER TABLE idempotency_keys ADD COLUMN fingerprint TEXT;
    """,
        # 10: the way back: reply routes, reply commands and their state, delivery reports.
        """
    {replies}
    """,
        # 11: retention and erasure (message content links, erased customers, the erasure audit).
        # Old rows are found by their rowid order (insertion order), so no time index is needed.
        """
    {erasure}
    """,
        # 12: reply routes for the messages stored before the reply ledger (migration 10).
        """
    {reply_routes_backfill}
    """,
        # 13: mail fallbacks of replies held for a visitor who never came back (gateway.replies).
        """
    ALTER TABLE replies ADD COLUMN fallback_of TEXT;
    CREATE INDEX replies_fallback ON replies (fallback_of) WHERE fallback_of IS NOT NULL;
    """,
        # 14: recent texts keyed by (customer, channel, at, message id), so the key also finds a
        # channel's cap and recent_texts_by_channel goes: one b-tree fewer written per placement.
        # The table holds only the duplicate window's texts, so the copy is short.
        """
    CREATE TABLE recent_texts_by_key (
        customer_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        at INTEGER NOT NULL,
        message_id TEXT NOT NULL,
        thread_id TEXT NOT NULL,
        text TEXT NOT NULL,
        PRIMARY KEY (customer_id, channel, at, message_id)
    ) WITHOUT ROWID;
    INSERT INTO recent_texts_by_key (customer_id, channel, at, message_id, thread_id, text)
        SELECT customer_id, channel, at, message_id, thread_id, text FROM recent_texts;
    DROP TABLE recent_texts;
    ALTER TABLE recent_texts_by_key RENAME TO recent_texts;
    CREATE INDEX recent_texts_by_age ON recent_texts (at);
    """,
        # 15: a customer's open threads found without last_activity in the index (they are few), so
        # advancing a thread (which moves last_activity) no longer rewrites an index entry.
        """
    DROP INDEX threads_open_by_customer;
    CREATE INDEX threads_open ON threads (customer_id, tenant, inbox, number) WHERE status = 'open';
    """,
    ),
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


def _json_list(values: Sequence[str]) -> str:
    return orjson.dumps(list(values)).decode()


class SQLiteDialect(Dialect):
    """SQLite's SQL: times as integer microseconds, JSON as text, the portable statements.

    The one writer thread runs one transaction at a time, so the lock methods have nothing to do;
    one statement per item costs no round trip here, and SQLite probes its indexes for each, where
    it would scan a tenant's rows for a list of (kind, value) pairs.
    """

    serialized = True  # the one writer thread runs one transaction at a time: no locks needed
    placeholder = "?"
    words: ClassVar[Mapping[str, str]] = {
        "greatest": "max",
        "json": "",
        "collate": "",  # BINARY, SQLite's default, is byte order already
        "for_update": "",
        "skip_locked": "",
        "each": "= ?",
        "merges": "merges",
        "merges_of": "id IN (SELECT merge_id FROM merge_members WHERE customer_id = ?)",
        "recent_text_key": "customer_id, channel, at, message_id",  # the primary key (WITHOUT ROWID)
        "contains": "instr(body, ?) > 0",
    }
    # Rows are appended in time order, so the old ones are at the head of the table in rowid
    # order: a look at the first ``limit`` rows finds them without a time index (which would cost
    # every message its bytes). A straggler behind a younger row goes in a later round.
    oldest_sql: ClassVar[Mapping[str, str]] = {
        **Dialect.oldest_sql,
        "events": "SELECT position FROM (SELECT position, published_at FROM outbox"
        " ORDER BY position LIMIT ?2) WHERE published_at < ?1",
        "messages": "SELECT message_id FROM (SELECT message_id, received_at FROM messages"
        " ORDER BY rowid LIMIT ?2) WHERE received_at < ?1",
        "raw_bodies": "SELECT sha256 FROM (SELECT sha256, created_at FROM raw_archive"
        " ORDER BY rowid LIMIT ?2) WHERE created_at < ?1",
    }
    # A write (committed with fsync), not a read: readiness asks whether the store can store.
    ping_sql = (
        "INSERT INTO counters (name, value) VALUES ('ping', 1)"
        " ON CONFLICT (name) DO UPDATE SET value = counters.value + 1"
    )

    ts = staticmethod(_us)
    dt = staticmethod(_dt)
    load_json = staticmethod(orjson.loads)
    text_array = staticmethod(_json_list)

    def erase_merges(self, conn: Connection, customer_ids: Sequence[str]) -> int:
        sql = "SELECT merge_id FROM merge_members WHERE customer_id = ?"
        ids = sorted({r[0] for c in customer_ids for r in conn.execute(sql, (c,)).fetchall()})
        if ids:
            executemany(conn, "DELETE FROM merge_members WHERE merge_id = ?", [(i,) for i in ids])
            executemany(conn, "DELETE FROM merges WHERE id = ?", [(i,) for i in ids])
        return len(ids)

    def add_merge_members(self, conn: Connection, merge: MergeRecord) -> None:
        # merged_customers is JSON text here: merge_members finds a customer's merges.
        executemany(
            conn,
            "INSERT INTO merge_members (customer_id, merge_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(c, merge.id) for c in (merge.surviving_customer, *merge.merged_customers)],
        )


SQLITE = SQLiteDialect()


class SQLiteTx(SqlTx):
    """:class:`dedupe.tx.Tx` over the writer connection, inside the current savepoint."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(conn, SQLITE)


@dataclass(slots=True)
class StoreStats:
    """Counters of the writer thread, for metrics and to show group commit at work."""

    commits: int = 0
    jobs: int = 0
    failed_jobs: int = 0
    failed_commits: int = 0
    largest_batch: int = 0


class _OneCursor:
    """The writer connection as a placement job sees it: its statements, each read before the next
    runs, share one cursor (sqlite3 makes and tracks a new one for every Connection.execute)."""

    __slots__ = ("_conn", "_cursor")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._cursor = conn.cursor()

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> sqlite3.Cursor:
        return self._cursor.execute(sql, params)

    def cursor(self) -> sqlite3.Cursor:
        return self._conn.cursor()


# The tables whose rows the writer keeps in memory (gateway.store.hotrows).
_HOT_TABLES = frozenset({"customers", "identities", "threads", "recent_texts", "tenant_counters"})
_ROW_WRITES = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})
# Any schema change is taken as a write of every table.
_SCHEMA_WRITES = frozenset(
    getattr(sqlite3, name)
    for name in dir(sqlite3)
    if name.startswith(("SQLITE_CREATE_", "SQLITE_DROP_", "SQLITE_ALTER_"))
)
_CLASSIFIED_MAX = 4096  # statement texts remembered (an IN list's length makes a new text)


class _HotWrites:
    """Which statements write a table the hot rows mirror, as SQLite's authorizer tells while it
    compiles ``EXPLAIN`` of each text (once per text; the writer thread's alone)."""

    def __init__(self) -> None:
        self._known: dict[str, bool] = {}

    def __call__(self, conn: sqlite3.Connection, sql: str, params: Any) -> bool:
        known = self._known.get(sql)
        if known is None:
            known = self._known[sql] = self._classify(conn, sql, params)
            if len(self._known) > _CLASSIFIED_MAX:
                self._known.clear()
        return known

    @staticmethod
    def _classify(conn: sqlite3.Connection, sql: str, params: Any) -> bool:
        found = False

        def authorize(action: int, table: str | None, *_: str | None) -> int:
            nonlocal found
            if action in _SCHEMA_WRITES or (action in _ROW_WRITES and table in _HOT_TABLES):
                found = True
            return sqlite3.SQLITE_OK

        conn.set_authorizer(authorize)
        try:
            conn.execute(f"EXPLAIN {sql}", params).fetchall()
        except sqlite3.Error:
            return True  # not told: taken as a write (the statement itself says what is wrong)
        finally:
            conn.set_authorizer(None)
        return found


class _Watched:
    """The writer connection as a job of SQL of its own sees it: it notes whether a statement wrote
    a table the hot rows mirror, so the writer forgets them only then. Anything but a statement
    (an attribute not named here) is taken as such a write."""

    def __init__(self, conn: sqlite3.Connection, writes_hot: _HotWrites) -> None:
        self._conn = conn
        self._writes_hot = writes_hot
        self.wrote_hot = False

    def note(self, sql: str, params: Any) -> None:
        if not self.wrote_hot and self._writes_hot(self._conn, sql, params):
            self.wrote_hot = True

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> _WatchedCursor:
        return _WatchedCursor(self, self._conn.cursor()).execute(sql, params)

    def cursor(self) -> _WatchedCursor:
        return _WatchedCursor(self, self._conn.cursor())

    def __getattr__(self, name: str) -> Any:
        self.wrote_hot = True
        return getattr(self._conn, name)


class _WatchedCursor:
    """A cursor of :class:`_Watched`: statements are noted; results are read as from sqlite3's."""

    def __init__(self, watch: _Watched, cursor: sqlite3.Cursor) -> None:
        self._watch = watch
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> _WatchedCursor:
        self._watch.note(sql, params)
        self._cursor.execute(sql, params)
        return self

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]], /) -> _WatchedCursor:
        rows = list(rows)
        if rows:
            self._watch.note(sql, rows[0])
        self._cursor.executemany(sql, rows)
        return self

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cursor)

    def __getattr__(self, name: str) -> Any:  # fetchone, fetchall, rowcount, close, ...
        return getattr(self._cursor, name)


@dataclass(slots=True)
class _Job:
    fn: WriteJob[Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    # The job writes customers, identities and threads only through HotTx (or not at all), so
    # the writer's hot rows stay true after it. Any other job runs on a _Watched connection.
    keeps_hot_rows: bool = False
    # Set by its last run: the job wrote a table the hot rows mirror (it did not keep them).
    wrote_hot: bool = False


class SQLiteStore(SqlStore):
    """:class:`gateway.store.base.Store` on one SQLite file and a content-addressed blob directory."""

    dialect = SQLITE

    def _probe_dirs(self) -> list[Path]:
        return [*super()._probe_dirs(), self._settings.path.parent]

    def __init__(
        self,
        settings: StoreSettings,
        outbox: OutboxSettings,
        *,
        clock: Clock = utcnow,
        reads_only: bool = False,
    ) -> None:
        super().__init__(settings, outbox, clock)
        # The relay process reads the outbox and sends its marks to the gateway's writer: it needs
        # neither a writer thread nor a checkpointer (a second one would copy the WAL back twice).
        self._reads_only = reads_only
        self.stats = StoreStats()
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._stopping = threading.Event()
        self._reader: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._open = False
        # Committed unpublished outbox rows. Only the writer thread changes it (the lock lets
        # other threads read it); _batch_delta is what the open batch's finished jobs add to it,
        # _job_delta what the running job adds (kept only if the job's savepoint is released).
        self._lock = threading.Lock()
        self._backlog = 0
        self._batch_delta = 0
        self._job_delta = 0
        self._group_target = 0
        self._hot = HotRows(_HOT_CUSTOMERS)  # the writer thread's alone
        self._writes_hot = _HotWrites()  # likewise
        self._guarded = 0  # batches still to run with a savepoint per job

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return
        if not self._reads_only:
            await self._start_writing()
        self._reader = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tg-store-read"
        )
        self._open = True

    async def _start_writing(self) -> None:
        """The writer thread (it migrates the schema first) and the checkpointer."""
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
        logger.info("store open at %s (outbox backlog %d)", self._settings.path, backlog)
        if not await asyncio.to_thread(self._incremental):
            logger.warning(
                "store %s cannot give freed space back to the file system (auto_vacuum is not"
                " INCREMENTAL): stop the gateway and run `ticketgate store vacuum` once",
                self._settings.path,
            )

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

    def _connect(self, *, readonly: bool, writer: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(self._settings.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA busy_timeout = 5000")
        if writer:
            # Takes effect only in a new (empty) file; an older file needs one full VACUUM
            # (``ticketgate store vacuum``, see vacuum_file) before freed pages can be given back.
            # The writer's alone: the pragma commits page 1 even when it changes nothing, and a
            # commit by another connection (the checkpointer starting, a vacuum after retention)
            # makes the writer forget its hot rows (PRAGMA data_version).
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            # After a checkpoint the WAL shrinks back to this, instead of keeping its largest size.
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")
            # Deleted content (retention, erasure) is overwritten with zeros, in the pages and in
            # free pages, so an erased customer's bytes do not linger in the file.
            conn.execute("PRAGMA secure_delete = ON")
            # The checkpointer thread copies the WAL back so commits do not stall on it; this
            # larger automatic threshold only bounds the WAL should that thread fall behind.
            conn.execute(f"PRAGMA wal_autocheckpoint = {_WAL_AUTOCHECKPOINT_PAGES}")
            # Every job runs in a savepoint, whose sub-journal keeps the first image of each page
            # the job changes: in a temporary file that was a write(2) per page, 15% of the
            # writer's time. In memory it is a copy (and erased rows never reach a temp file).
            conn.execute("PRAGMA temp_store = MEMORY")
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

    def _incremental(self) -> bool:
        conn = sqlite3.connect(self._settings.path, isolation_level=None)
        try:
            return int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) == 2  # INCREMENTAL
        finally:
            conn.close()

    async def reclaim_space(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the file system (PRAGMA incremental_vacuum).

        On a connection of its own, outside the writer's batches: the pragma must run outside a
        transaction. It takes the write lock briefly; the writer waits (busy_timeout) meanwhile.
        """
        if not self._open or pages <= 0:
            return 0
        return await asyncio.to_thread(self._vacuum, pages)

    def _vacuum(self, pages: int) -> int:
        conn = self._connect(readonly=False)
        try:
            before = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            if before:
                # executescript steps the pragma to its end (execute would free one page only).
                conn.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
            return before - int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        finally:
            conn.close()

    async def _after_erase(self) -> None:
        """Copy the WAL into the database and truncate it (its old frames hold the erased rows as
        they were), then give every free page back (they are zeroed: secure_delete)."""
        await asyncio.to_thread(self._truncate_wal)
        await self.reclaim_space(2**31 - 1)

    def _truncate_wal(self) -> None:
        conn = self._connect(readonly=False)
        try:
            for _ in range(50):
                busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    return
                time.sleep(0.1)  # a reader's snapshot holds the WAL; it ends with its read
            logger.warning("store: WAL not truncated after an erasure (readers busy)")
        finally:
            conn.close()

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
            conn = self._connect(readonly=False, writer=True)
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
        """Commit ``batch`` in one transaction; see :meth:`_commit_unguarded` and :meth:`_commit_guarded`."""
        if len(batch) == 1 or (self._guarded == 0 and all(job.keeps_hot_rows for job in batch)):
            if self._commit_unguarded(conn, batch):
                return
            # A job failed and took its batch down: run it again, each job in its own savepoint,
            # and keep savepoints for the batches after it (a full outbox fails job after job).
            self._guarded = _GUARDED_BATCHES
        else:
            self._guarded = max(0, self._guarded - 1)
        self._commit_guarded(conn, batch)

    def _commit_unguarded(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        """Run the jobs without savepoints; ``False`` when one of several failed (nothing was kept).

        A savepoint costs a statement pair and a copy of every page its job touches, a tenth of a
        placement. Only a job that can run again after a rollback goes without: the store's own
        placements and outbox marks, whose effects are the transaction's and the hot rows' (which
        are forgotten), or a job alone in its batch, whose failure is its batch's.
        """
        if not self._begin(conn, batch):
            return True
        outcomes: list[tuple[bool, Any]] = []
        for job in batch:
            self._job_delta = 0
            try:
                value = self._run(conn, job)
            except Exception as exc:
                self._hot.forget()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if len(batch) > 1:
                    return False
                logger.debug("store job failed: %r", exc)
                self._settle(batch, [(False, as_store_error(exc, sqlite3.Error))])
                return True
            self._job_done(job)
            outcomes.append((True, value))
        self._end(conn, batch, outcomes)
        return True

    def _commit_guarded(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Run each job in its own savepoint, so a failing job does not fail its batch siblings."""
        if not self._begin(conn, batch):
            return
        outcomes: list[tuple[bool, Any]] = []
        for index, job in enumerate(batch):
            conn.execute("SAVEPOINT job")
            self._job_delta = 0
            try:
                value = self._run(conn, job)
            except Exception as exc:
                self._hot.forget()  # what the job changed in memory is not undone piece by piece
                if not self._rollback_to_savepoint(conn):
                    # The error ended the whole transaction (disk full, I/O error): nothing of
                    # this batch was kept, and later jobs must not run outside a transaction.
                    self._fail_batch(batch, StoreError(f"transaction aborted: {exc}"))
                    return
                outcomes.append((False, as_store_error(exc, sqlite3.Error)))
                logger.debug("store job %d of %d failed: %r", index + 1, len(batch), exc)
            else:
                conn.execute("RELEASE job")
                self._job_done(job)
                outcomes.append((True, value))
        self._end(conn, batch, outcomes)

    def _begin(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        self._batch_delta = 0
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail_batch(batch, StoreError(f"cannot begin a transaction: {exc}"))
            return False
        self._hot.check(conn)
        return True

    def _run(self, conn: sqlite3.Connection, job: _Job) -> Any:
        if job.keeps_hot_rows:
            return job.fn(conn)
        watched = _Watched(conn, self._writes_hot)
        try:
            # Typed as the connection: it answers what the jobs use of one (engine.Connection).
            return job.fn(cast(sqlite3.Connection, watched))
        finally:
            job.wrote_hot = watched.wrote_hot

    def _job_done(self, job: _Job) -> None:
        if job.wrote_hot:
            self._hot.forget()
        self._batch_delta += self._job_delta

    def _end(self, conn: sqlite3.Connection, batch: list[_Job], outcomes: list[tuple[bool, Any]]) -> None:
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
        self._settle(batch, outcomes)

    def _settle(self, batch: list[_Job], outcomes: list[tuple[bool, Any]]) -> None:
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
        self._hot.forget()  # the batch's changes are gone
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

    def _count_events(self, conn: Connection, rows: int, *, bounded: bool) -> None:
        if rows and bounded:
            self._check_room(conn, rows)
        self._job_delta += rows

    def _count_published(self, conn: Connection, rows: int) -> None:
        self._job_delta -= rows

    def _check_room(self, conn: Connection, rows: int) -> None:
        """On the writer thread, inside a job that just inserted ``rows`` events: refuse when they
        exceed the bound.

        The in-memory count only falls when this process marks events published; when it says
        "full", recount: another process (the relay process, an operator's replay) may have
        published meanwhile.
        """
        pending = self._batch_delta + self._job_delta
        if self._backlog + pending + rows > self._outbox.max_backlog:
            (unpublished,) = conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
            with self._lock:
                # The count sees this batch's uncommitted rows, this job's included.
                self._backlog = unpublished - pending - rows
        if self._backlog + pending + rows > self._outbox.max_backlog:
            raise BacklogFull(
                f"outbox holds {self._backlog + pending} unpublished events"
                f" (max_backlog {self._outbox.max_backlog})",
                retry_after=self._outbox.retry_after,
            )

    async def _submit(self, fn: WriteJob[T], *, keeps_hot_rows: bool = False) -> T:
        """Queue ``fn`` for the writer and wait for its commit."""
        if not self._open:
            raise StoreError("store is closed")
        if self._reads_only:
            raise StoreError("this store was opened for reading only")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn=fn, future=future, loop=loop, keeps_hot_rows=keeps_hot_rows))
        return await future

    async def _write(self, fn: Callable[[Connection], T], *, events: bool = False) -> T:
        return await self._submit(fn)

    async def _write_placement(
        self, fn: Callable[[Connection], T], messages: Sequence[CanonicalMessage]
    ) -> T:
        return await self._submit(lambda conn: fn(_OneCursor(conn)), keeps_hot_rows=True)

    async def _write_marks(self, fn: Callable[[Connection], T]) -> T:
        return await self._submit(fn, keeps_hot_rows=True)

    async def _write_text_purge(self, fn: Callable[[Connection], int]) -> int:
        # The sweep runs every minute: forgetting every hot row for it would make the writer read
        # each customer back. Only the texts are read again, and only when some were deleted.
        def purge(conn: Connection) -> int:
            deleted = fn(conn)
            if deleted:
                self._hot.forget_texts()
            return deleted

        return await self._submit(purge, keeps_hot_rows=True)

    def _tx(self, conn: Connection) -> SqlTx:
        return HotTx(conn, SQLITE, self._hot)

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        if not self._open or self._reader is None:
            raise StoreError("store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._reader, self._with_reader, fn)

    def _with_reader(self, fn: Callable[[Connection], T]) -> T:
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

    # -- the outbox ----------------------------------------------------------------------------

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        return await self._read(lambda conn: outbox_rows(SQLITE, conn, after, limit))

    async def outbox_status(self) -> OutboxStatus:
        def read(conn: Connection) -> OutboxStatus:
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


def vacuum_file(path: Path) -> tuple[int, int]:
    """Rebuild the database file once with ``auto_vacuum = INCREMENTAL`` (a full VACUUM), so
    retention's freed pages can be given back later; (bytes before, bytes after).

    Run with the gateway stopped: VACUUM holds the write lock for its whole run and needs free disk
    space for a copy of the database. Idempotent.
    """
    before = path.stat().st_size
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return before, path.stat().st_size


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
