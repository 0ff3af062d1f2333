"""The SQLite writer's hot rows: customers, their identities, threads and recent texts, and each
tenant's next thread number, in memory.

A placement of a known customer read its identity, its customer, its open threads, its recent
texts and its identity list for the event, and capped its recent texts: six of its statements.
One SQLite file has one writer thread, so what that thread read or wrote stays true until someone
else writes, and that is watched:

- other connections (``ticketgate customer erase`` or ``quarantine replay`` in another process, a
  vacuum): ``PRAGMA data_version``, read by the writer after it takes the write lock for a batch,
  moves when they commit; then everything is forgotten (:meth:`HotRows.check`);
- the writer's own jobs: placements and outbox marks change these rows only through
  :class:`HotTx`, which keeps them current; any other job may write them with SQL of its own
  (erasure, retention, desk and control operations), so it runs on a connection that notes
  whether one of its statements writes a table kept here (SQLite's authorizer tells, once per
  statement text), and everything is forgotten after one that did (the recent-text sweep forgets
  the texts only);
- a job rolled back to its savepoint, or a batch rolled back: forgotten too, rather than undone
  piece by piece.

Forgetting is always safe: the next placement reads the database again. The number of customers
kept is bounded; the least recently used go first.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.errors import StoreError
from core.model import Identity, replace
from dedupe.tx import RECENT_TEXTS_KEPT, CustomerRecord, RecentText, StoredIdentity, ThreadRecord
from gateway.store.engine import (
    RECENT_TEXT_CAP,
    RECENT_TEXT_INSERT,
    THREAD_COLUMNS,
    Connection,
    Cursor,
    Dialect,
    SqlTx,
    thread_record,
)

# (tenant, kind, value) of an identity.
_IdentityKey = tuple[str, str, str]
# A customer with more open threads than this keeps them in the database only (it is rare: a
# desk that never closes threads), so a placement never copies a long list.
_OPEN_THREADS_KEPT = 16
# Likewise for more recent texts than this (each channel keeps RECENT_TEXTS_KEPT).
_TEXTS_KEPT = 4 * RECENT_TEXTS_KEPT
# What the recent texts kept across all customers may weigh, as characters plus TEXT_OVERHEAD per
# text (its tuple and ids): the counts above alone would allow gigabytes (a text is up to 2,000
# characters). Past it, the least recently used customers' texts are forgotten and read again from
# the table when needed. A unit of weight costs ~3 bytes of resident memory once lists, ids and the
# allocator's turnover are counted (bench/rss.py, 780-character texts: 24,000,000 took 72 MB,
# 4,000,000 takes 12 MB), so this keeps ~4,500 such texts, or ~20,000 chat-sized ones.
TEXT_CHARS_KEPT = 4_000_000
TEXT_OVERHEAD = 100


def text_weight(text: str) -> int:
    """What one kept recent text counts against :data:`TEXT_CHARS_KEPT`."""
    return len(text) + TEXT_OVERHEAD


# A recent text as stored: (at, message id, thread id, channel, normalised text).
_Text = tuple[int, str, str, str, str]


@dataclass(slots=True)
class _Thread:
    record: ThreadRecord
    next_sequence: int
    last_activity: int  # record.last_activity as stored, so advancing compares integers


@dataclass(slots=True)
class _Customer:
    record: CustomerRecord
    # Every identity of the customer once read: key -> (created_at as stored, verified).
    identities: dict[_IdentityKey, tuple[int, bool]] | None = None
    # ``identities`` oldest first (then kind, value), as Tx.customer_identities returns them.
    view: tuple[Identity, ...] | None = None
    # Every open thread of the customer once read (at most _OPEN_THREADS_KEPT), by id.
    threads: dict[str, _Thread] | None = None
    # (number, id) of every thread of the customer, open or not, once read; ascending.
    thread_ids: list[tuple[int, str]] | None = None
    # Every recent text of the customer once read (at most _TEXTS_KEPT), oldest first.
    texts: list[_Text] | None = None
    text_chars: int = 0  # what ``texts`` weigh (text_weight of each)


class HotRows:
    """What the writer knows of the customers it placed messages on lately. Writer thread only."""

    def __init__(self, limit: int, text_chars: int = TEXT_CHARS_KEPT) -> None:
        self._limit = limit
        self._text_limit = text_chars
        self.text_chars = 0  # the weight of every customer's texts kept
        # The customers whose texts are kept, least recently set first: the budget's eviction order,
        # so that trimming never walks the customers whose texts are gone already.
        self._with_texts: dict[str, _Customer] = {}
        self._customers: dict[str, _Customer] = {}
        # Identity -> customer, for every identity of a customer whose identities were read.
        self._owners: dict[_IdentityKey, str] = {}
        # Thread -> customer, for every thread of a customer whose open threads were read.
        self._thread_owners: dict[str, str] = {}
        # Tenant -> the thread number it hands out next (tenant_counters), once handed out here.
        self.thread_numbers: dict[str, int] = {}
        self._data_version: int | None = None
        self.forgotten = 0  # times everything was forgotten (tests and benchmarks read it)

    def __len__(self) -> int:
        return len(self._customers)

    def check(self, conn: Connection) -> None:
        """At the start of a batch, with the write lock held: forget everything if another
        connection committed since the last batch."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self.forget()
            self._data_version = version

    def forget(self) -> None:
        self.thread_numbers.clear()
        if self._customers:
            self._customers.clear()
            self._owners.clear()
            self._thread_owners.clear()
            self._with_texts.clear()
            self.text_chars = 0
            self.forgotten += 1

    def forget_texts(self) -> None:
        """Forget the recent texts kept (rows were deleted); the rest stays, texts are read again."""
        for entry in self._with_texts.values():
            entry.texts, entry.text_chars = None, 0
        self._with_texts.clear()
        self.text_chars = 0

    def set_texts(self, entry: _Customer, texts: list[_Text] | None, chars: int) -> None:
        """Keep ``texts`` (weighing ``chars``) for ``entry``; past the budget, forget the texts of
        the customers used least recently."""
        if texts is None:
            chars = 0
        self.text_chars += chars - entry.text_chars
        entry.texts, entry.text_chars = texts, chars
        customer_id = entry.record.id
        self._with_texts.pop(customer_id, None)
        if texts is not None:
            self._with_texts[customer_id] = entry
        while self.text_chars > self._text_limit:
            oldest = self._with_texts.pop(next(iter(self._with_texts)))
            self.text_chars -= oldest.text_chars
            oldest.texts, oldest.text_chars = None, 0

    def get(self, customer_id: str) -> _Customer | None:
        entry = self._customers.pop(customer_id, None)
        if entry is not None:
            self._customers[customer_id] = entry  # the most recently used go last
        return entry

    def add(self, entry: _Customer) -> None:
        self._drop(entry.record.id)
        self._customers[entry.record.id] = entry
        if entry.identities is not None:
            self._own_identities(entry)
        if entry.threads is not None:
            self._own_threads(entry)
        while len(self._customers) > self._limit:
            self._drop(next(iter(self._customers)))

    def owner(self, key: _IdentityKey) -> _Customer | None:
        customer_id = self._owners.get(key)
        return self._customers[customer_id] if customer_id is not None else None

    def thread_owner(self, thread_id: str) -> _Customer | None:
        customer_id = self._thread_owners.get(thread_id)
        return self._customers[customer_id] if customer_id is not None else None

    def set_identities(self, entry: _Customer, identities: dict[_IdentityKey, tuple[int, bool]]) -> None:
        entry.identities = identities
        entry.view = None
        self._own_identities(entry)

    def set_threads(self, entry: _Customer, threads: dict[str, _Thread] | None) -> None:
        for thread_id in entry.threads or ():
            del self._thread_owners[thread_id]
        entry.threads = threads if threads is None or len(threads) <= _OPEN_THREADS_KEPT else None
        self._own_threads(entry)

    def _own_identities(self, entry: _Customer) -> None:
        for key in entry.identities or ():
            self._owners[key] = entry.record.id

    def _own_threads(self, entry: _Customer) -> None:
        for thread_id in entry.threads or ():
            self._thread_owners[thread_id] = entry.record.id

    def _drop(self, customer_id: str) -> None:
        entry = self._customers.pop(customer_id, None)
        if entry is None:
            return
        self.text_chars -= entry.text_chars
        self._with_texts.pop(customer_id, None)
        for key in entry.identities or ():
            del self._owners[key]
        for thread_id in entry.threads or ():
            del self._thread_owners[thread_id]


class HotTx(SqlTx):
    """:class:`SqlTx` that answers the hot reads from :class:`HotRows` and keeps them current; the
    recent-text cap runs only when a channel has more than it keeps.

    A write this class does not keep current (a merge moving identities or threads, a thread
    closed, merged or reopened) forgets everything first.
    """

    def __init__(self, conn: Connection, dialect: Dialect, hot: HotRows) -> None:
        super().__init__(conn, dialect)
        self._hot = hot
        # One cursor for the Tx's own statements, each read at once: sqlite3 makes (and tracks)
        # a new cursor for every Connection.execute, a third of a short statement's cost.
        self._cursor = conn.cursor()

    def _x(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._cursor.execute(self._d.sql(sql), params)

    # -- customers and identities --------------------------------------------------------------

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        found: dict[tuple[str, str], StoredIdentity] = {}
        missing: list[Identity] = []
        for identity in identities:
            key = (tenant, identity.kind, identity.value)
            entry = self._hot.owner(key)
            if entry is None or entry.identities is None:
                missing.append(identity)
                continue
            found[identity.key()] = StoredIdentity(
                kind=identity.kind,
                value=identity.value,
                customer_id=entry.record.id,
                verified=entry.identities[key][1],
            )
        if missing:
            for stored in super().find_identities(tenant, missing):
                found[(stored.kind, stored.value)] = stored
        return [found[i.key()] for i in identities if i.key() in found]

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None:
        super().create_customer(customer, now)
        # New: no identities, threads or texts yet, and every later one goes through this Tx.
        self._hot.add(_Customer(record=customer, identities={}, threads={}, thread_ids=[], texts=[]))

    def find_customer(self, customer_id: str) -> CustomerRecord | None:
        entry = self._hot.get(customer_id)
        if entry is not None:
            return entry.record
        record = super().find_customer(customer_id)
        if record is not None:
            self._hot.add(_Customer(record=record))
        return record

    def set_display_name(self, customer_id: str, display_name: str) -> None:
        super().set_display_name(customer_id, display_name)
        entry = self._hot.get(customer_id)
        if entry is not None:
            entry.record = replace(entry.record, display_name=display_name)

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        super().add_identity(tenant, customer_id, identity, now)
        entry = self._hot.get(customer_id)
        if entry is not None and entry.identities is not None:
            identities = dict(entry.identities)
            identities[(tenant, identity.kind, identity.value)] = (self._d.ts(now), identity.verified)
            self._hot.set_identities(entry, identities)

    def mark_verified(self, tenant: str, identity: Identity) -> None:
        super().mark_verified(tenant, identity)
        key = (tenant, identity.kind, identity.value)
        entry = self._hot.owner(key)
        if entry is not None and entry.identities is not None:
            identities = dict(entry.identities)
            identities[key] = (identities[key][0], True)
            self._hot.set_identities(entry, identities)

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]:
        entry = self._hot.get(customer_id)
        if entry is None:
            return super().customer_identities(customer_id)
        if entry.identities is None:
            rows = self._x(
                "SELECT tenant, kind, value, created_at, verified FROM identities WHERE customer_id = ?",
                (customer_id,),
            ).fetchall()
            identities = {(t, k, v): (created, bool(ver)) for t, k, v, created, ver in rows}
            self._hot.set_identities(entry, identities)
        if entry.view is None:
            # The order of the SQL (created_at, kind, value): str order is UTF-8 byte order.
            ordered = sorted(((c, k, v, ver) for (_, k, v), (c, ver) in (entry.identities or {}).items()))
            entry.view = tuple(Identity(kind=k, value=v, verified=ver) for _, k, v, ver in ordered)
        return entry.view

    def move_identities(
        self, tenant: str, keys: Sequence[tuple[str, str]], from_customer: str, to_customer: str
    ) -> list[Identity]:
        self._hot.forget()
        return super().move_identities(tenant, keys, from_customer, to_customer)

    def set_merged_into(self, customer_id: str, into: str | None) -> None:
        self._hot.forget()
        super().set_merged_into(customer_id, into)

    # -- threads -------------------------------------------------------------------------------

    def open_threads(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> list[ThreadRecord]:
        entry = self._hot.get(customer_id)
        if entry is None:
            return super().open_threads(
                customer_id=customer_id, tenant=tenant, inbox=inbox, active_since=active_since
            )
        threads = entry.threads
        if threads is None:
            rows = self._x(
                f"SELECT {THREAD_COLUMNS}, next_sequence FROM threads"  # noqa: S608
                " WHERE customer_id = ? AND status = 'open'",
                (customer_id,),
            ).fetchall()
            threads = {
                r[0]: _Thread(record=thread_record(self._d, r), next_sequence=r[-1], last_activity=r[6])
                for r in rows
            }
            self._hot.set_threads(entry, threads)
        found = [
            t.record
            for t in threads.values()
            if (t.record.tenant, t.record.inbox) == (tenant, inbox) and t.record.last_activity >= active_since
        ]
        return sorted(found, key=lambda t: t.number)

    def customer_thread_ids(self, customer_id: str) -> list[str]:
        entry = self._hot.get(customer_id)
        if entry is None:
            return super().customer_thread_ids(customer_id)
        if entry.thread_ids is None:
            rows = self._x(
                "SELECT number, id FROM threads WHERE customer_id = ? ORDER BY number", (customer_id,)
            ).fetchall()
            entry.thread_ids = [(int(number), thread_id) for number, thread_id in rows]
        return [thread_id for _, thread_id in entry.thread_ids]

    def next_thread_number(self, tenant: str) -> int:
        number = self._hot.thread_numbers.get(tenant)
        if number is None:
            number = super().next_thread_number(tenant)
        else:
            # The number is known: a plain UPDATE, not the upsert's RETURNING (SQLite buffers
            # RETURNING rows in a temporary b-tree: ~4 us of a new thread's placement).
            changed = self._x(
                "UPDATE tenant_counters SET next_thread_number = ? WHERE tenant = ?", (number + 1, tenant)
            ).rowcount
            if changed != 1:
                raise StoreError(f"thread numbers of tenant {tenant!r} are gone")
        self._hot.thread_numbers[tenant] = number + 1
        return number

    def create_thread(self, thread: ThreadRecord) -> None:
        super().create_thread(thread)
        entry = self._hot.get(thread.customer_id)
        if entry is None:
            return
        if entry.thread_ids is not None:
            bisect.insort(entry.thread_ids, (thread.number, thread.id))
        if entry.threads is None or not thread.open or thread.merged_into is not None:
            return
        # As it reads back: the stored time has microseconds in UTC.
        at = self._d.ts(thread.last_activity)
        stored = replace(thread, last_activity=self._d.dt(at))
        kept = _Thread(record=stored, next_sequence=1, last_activity=at)
        self._hot.set_threads(entry, {**entry.threads, thread.id: kept})

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        entry = self._hot.thread_owner(thread_id)
        if entry is None or entry.threads is None:
            return super().advance_thread(thread_id, now)
        thread = entry.threads[thread_id]
        sequence, at = thread.next_sequence, self._d.ts(now)
        # The sequence is known: no RETURNING (SQLite buffers its rows in a temporary b-tree).
        changed = self._x(
            "UPDATE threads SET next_sequence = ?, last_activity = {greatest}(last_activity, ?) WHERE id = ?",
            (sequence + 1, at, thread_id),
        ).rowcount
        if changed != 1:
            raise StoreError(f"unknown thread {thread_id!r}")
        thread.next_sequence = sequence + 1
        if at > thread.last_activity:
            thread.last_activity = at
            thread.record = replace(thread.record, last_activity=self._d.dt(at))
        return sequence

    # -- recent texts --------------------------------------------------------------------------

    def recent_texts(self, customer_id: str, since: datetime, *, not_channel: str) -> list[RecentText]:
        texts = self._texts(customer_id)
        if texts is None:
            return super().recent_texts(customer_id, since, not_channel=not_channel)
        since_us = self._d.ts(since)
        found: list[RecentText] = []
        # Newest first, as the SQL orders them (at, then message id, descending).
        for at, message_id, thread_id, channel, text in reversed(texts):
            if at < since_us or len(found) == RECENT_TEXTS_KEPT:
                break
            if channel != not_channel:
                found.append(
                    RecentText(
                        customer_id=customer_id,
                        message_id=message_id,
                        thread_id=thread_id,
                        channel=channel,
                        text=text,
                        at=self._d.dt(at),
                    )
                )
        return found

    def add_recent_text(self, text: RecentText) -> None:
        entry = self._hot.get(text.customer_id)
        texts = entry.texts if entry is not None else None
        if entry is None or texts is None:
            super().add_recent_text(text)
            return
        customer, channel, at = text.customer_id, text.channel, self._d.ts(text.at)
        self._x(RECENT_TEXT_INSERT, (customer, channel, at, text.message_id, text.thread_id, text.text))
        index = bisect.bisect_left(texts, (at, text.message_id))
        if index < len(texts) and texts[index][:2] == (at, text.message_id):
            return  # the same (at, message id) is there already: the insert did nothing
        texts.insert(index, (at, text.message_id, text.thread_id, channel, text.text))
        chars = entry.text_chars + text_weight(text.text)
        of_channel = [t for t in texts if t[3] == channel]
        if len(of_channel) > RECENT_TEXTS_KEPT:
            # Only now can the cap delete anything: the statement runs when it has work.
            self._x(RECENT_TEXT_CAP, (customer, channel, customer, channel, RECENT_TEXTS_KEPT - 1))
            cutoff = of_channel[-RECENT_TEXTS_KEPT][0]
            chars -= sum(text_weight(t[4]) for t in of_channel if t[0] < cutoff)
            texts = [t for t in texts if t[3] != channel or t[0] >= cutoff]
        self._hot.set_texts(entry, texts if len(texts) <= _TEXTS_KEPT else None, chars)

    def _texts(self, customer_id: str) -> list[_Text] | None:
        """The customer's recent texts, read once; ``None`` when not kept in memory."""
        entry = self._hot.get(customer_id)
        if entry is None:
            return None
        if entry.texts is None:
            rows = self._x(
                "SELECT at, message_id, thread_id, channel, text FROM recent_texts WHERE customer_id = ?",
                (customer_id,),
            ).fetchall()
            if len(rows) > _TEXTS_KEPT:
                return None
            self._hot.set_texts(entry, sorted(rows), sum(text_weight(row[4]) for row in rows))
        return entry.texts

    def set_thread_status(self, thread_id: str, open: bool, at: datetime) -> bool:
        self._hot.forget()
        return super().set_thread_status(thread_id, open, at)

    def merge_thread(self, thread_id: str, into: str, now: datetime) -> None:
        self._hot.forget()
        super().merge_thread(thread_id, into, now)

    def move_threads(self, thread_ids: Sequence[str], to_customer: str) -> None:
        self._hot.forget()
        super().move_threads(thread_ids, to_customer)

