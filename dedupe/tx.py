"""The small synchronous transaction the placement engine runs against.

A store implements :class:`Tx` on top of one open database transaction (SQLite savepoint,
PostgreSQL transaction); the engine never commits, so a failure anywhere leaves nothing behind.
Times are timezone-aware UTC datetimes. Every method is a handful of plain SQL statements on
indexed columns; none may commit, roll back or open a nested transaction of its own.

Concurrency (for stores with several writers, e.g. PostgreSQL with several gateway instances).
The engine takes its locks in this fixed order, so no two placements can deadlock:

1. :meth:`Tx.lock_identities` — the identity keys of the message, sorted;
2. :meth:`Tx.lock_customers` — the customers those identities belong to, sorted;
3. row locks on threads, taken implicitly by :meth:`Tx.advance_thread` and the other thread writes.

With 1 and 2 held until commit, placement is serialized per customer: two messages of one customer
arriving at the same moment on two instances end in one thread, and a customer cannot be merged
away while a message is being placed on it. A single-writer store (SQLite) may implement both lock
methods as no-ops. A store that takes a placement's locks before the placement starts (PostgreSQL
locks those of a whole group of placements first) says so through :meth:`Tx.holds_customers`; the
placement then neither locks those customers nor reads their identities again.

Events the engine produces besides ``message.received`` (``thread.merged``, ``customer.merged``,
``customer.unmerged``) are returned to the store (:class:`dedupe.engine.Placed.events`,
:data:`TxWork` results), which enqueues them in the outbox in the same transaction, before the
message's own event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from core.events import Event
from core.model import Identity, Placement

T = TypeVar("T")


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
    # Set while this customer is merged into another one (its identities and threads moved there).
    merged_into: str | None = None


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
    # Set when this thread was merged into another: later messages for it go to that thread.
    merged_into: str | None = None
    # The closed thread this one continues (a message referred to it after it was closed).
    previous_id: str | None = None


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


# Duplicate detection compares a message with at most this many of the customer's recent texts
# from other channels; per (customer, channel) the stores keep no more than that.
RECENT_TEXTS_KEPT = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class RecentText:
    """A customer's recent message text, normalised, for duplicate-touchpoint detection."""

    customer_id: str
    message_id: str
    thread_id: str
    channel: str
    text: str  # normalised (see dedupe.similarity.normalize_text)
    at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class MergeRecord:
    """One customer merge: what moved where, and why. Enough to undo it."""

    id: str
    tenant: str
    surviving_customer: str
    merged_customers: tuple[str, ...]
    # (customer the identity came from, identity) for every identity moved to the survivor.
    identities: tuple[tuple[str, Identity], ...]
    # (customer the thread came from, thread id) for every thread moved to the survivor.
    threads: tuple[tuple[str, str], ...]
    evidence: Mapping[str, Any]
    created_at: datetime
    undone_at: datetime | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedLink:
    """Claimed (unverified) evidence that two existing customers are one person; not merged."""

    id: str
    tenant: str
    customer_id: str  # the customer the message was placed on
    other_customer_id: str
    identities: tuple[Identity, ...]  # the message's identities that connect them
    message_id: str | None
    created_at: datetime


class ThreadReads(Protocol):
    """What thread assignment and the event read of a known customer, asked for at once
    (:meth:`Tx.thread_reads`); each answer is what the :class:`Tx` method of its name returns."""

    def recent_texts(self) -> list[RecentText]: ...

    def open_threads(self) -> list[ThreadRecord]: ...

    def identities(self) -> tuple[Identity, ...]: ...


class Tx(Protocol):
    """Reads and writes inside one open transaction."""

    #: True when no other transaction can run meanwhile (SQLite's single writer): what was read
    #: stays true until the transaction ends, so nothing needs reading again after a lock.
    serialized: bool

    # -- idempotency ---------------------------------------------------------------------------

    def claim_key(
        self, key: str, message_id: str, now: datetime, fingerprint: str | None = None
    ) -> Placement | None:
        """Atomically claim an idempotency key (insert-if-absent), keeping ``fingerprint`` with it.

        ``None`` when this call claimed it; otherwise the first placement, with ``duplicate=True``
        and ``conflict=True`` when both deliveries have fingerprints and they differ.
        On a multi-writer store a concurrent claimer of the same key must block until the first
        transaction ends (a unique-constraint insert does that) and then see its placement.
        """
        ...

    def complete_claim(self, key: str, placement: Placement) -> None:
        """Record where the message of a key claimed in this transaction went."""
        ...

    # -- locks ---------------------------------------------------------------------------------

    def lock_identities(self, tenant: str, keys: Sequence[tuple[str, str]]) -> None:
        """Take exclusive locks on these (kind, value) identity keys of ``tenant`` until commit.

        The keys need not exist yet (PostgreSQL: ``pg_advisory_xact_lock`` on a hash of
        tenant/kind/value). ``keys`` come sorted; lock in that order. This is what stops two
        instances from creating two customers for the same new identity at the same moment.
        """
        ...

    def lock_customers(self, customer_ids: Sequence[str]) -> None:
        """Row-lock these customers until commit (``SELECT ... FOR UPDATE``), in the given sorted order.

        The store must serialize placement per customer: thread assignment, merges and duplicate
        detection of one customer run under this lock.
        """
        ...

    def holds_customers(self, customer_ids: Sequence[str]) -> bool:
        """Whether this transaction row-locked all of these customers before the placement running
        in it read anything (PostgreSQL: a group of placements locks its customers first).

        What the placement read of them is then current, and stays so: no lock is needed, and
        nothing needs reading again. ``False`` when unsure.
        """
        ...

    # -- customers and identities --------------------------------------------------------------

    def prefetch_identities(self, tenant: str, identities: Sequence[Identity]) -> None:
        """A hint: the placement will look these up next (:meth:`find_identities`, after
        :meth:`claim_key` and :meth:`lock_identities`). A store may send that read now, with the
        claim, where nothing can change the answer meanwhile (PostgreSQL: in a group holding the
        identities' locks), and answer the lookup from it. Nothing to do otherwise."""
        ...

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        """The stored identities among ``identities`` (matched on tenant, kind, value), in the order given."""
        ...

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None: ...

    def get_customer(self, customer_id: str) -> CustomerRecord:
        """The customer (``merged_into`` included); raises ``core.errors.StoreError`` if unknown."""
        ...

    def find_customer(self, customer_id: str) -> CustomerRecord | None:
        """The customer, or ``None`` if unknown."""
        ...

    def set_display_name(self, customer_id: str, display_name: str) -> None: ...

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        """Insert an identity; it does not exist yet (the caller holds its lock and looked it up)."""
        ...

    def mark_verified(self, tenant: str, identity: Identity) -> None: ...

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]:
        """The customer's identities, oldest first (then by kind, value)."""
        ...

    def move_identities(
        self, tenant: str, keys: Sequence[tuple[str, str]], from_customer: str, to_customer: str
    ) -> list[Identity]:
        """Move the listed (kind, value) identities that belong to ``from_customer`` to ``to_customer``.

        Identities listed but owned by someone else are left alone. Returns the moved identities
        (with their verified flag), in the order listed.
        """
        ...

    def set_merged_into(self, customer_id: str, into: str | None) -> None:
        """Mark the customer merged into ``into`` (``None``: not merged any more)."""
        ...

    def add_merge(self, merge: MergeRecord) -> None: ...

    def get_merge(self, merge_id: str) -> MergeRecord | None: ...

    def mark_merge_undone(self, merge_id: str, at: datetime) -> None: ...

    def customer_merges(self, customer_id: str) -> list[MergeRecord]:
        """Merges where the customer survived or was merged away, oldest first."""
        ...

    def add_claimed_link(self, link: ClaimedLink) -> None: ...

    def claimed_links(self, customer_id: str) -> list[ClaimedLink]:
        """Claimed links naming the customer on either side, oldest first."""
        ...

    # -- threads -------------------------------------------------------------------------------

    def find_open_thread(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> ThreadRecord | None:
        """The most recently active open thread of the customer in tenant+inbox, if any is recent."""
        ...

    def open_threads(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> list[ThreadRecord]:
        """Open threads of the customer in tenant+inbox active since ``active_since``, lowest number first."""
        ...

    def get_thread(self, thread_id: str) -> ThreadRecord | None: ...

    def find_successor(self, thread_id: str) -> ThreadRecord | None:
        """The newest thread whose ``previous_id`` is ``thread_id`` (it continues a closed thread)."""
        ...

    def find_thread_by_number(self, tenant: str, number: int) -> ThreadRecord | None:
        """The tenant's thread with this ticket number (unique per tenant)."""
        ...

    def find_thread_by_rfc822(self, tenant: str, rfc822_message_id: str) -> ThreadRecord | None:
        """The thread of the tenant's most recent stored message with this RFC 5322 Message-ID."""
        ...

    def find_thread_by_key(self, tenant: str, channel: str, inbox: str, key: str) -> ThreadRecord | None:
        """The thread a channel thread key (Slack thread_ts, chat session) was first seen on."""
        ...

    def add_thread_key(
        self, tenant: str, channel: str, inbox: str, key: str, thread_id: str, now: datetime
    ) -> None:
        """Remember a channel thread key's thread; insert-if-absent (the first thread keeps the key)."""
        ...

    def customer_thread_ids(self, customer_id: str) -> list[str]:
        """Ids of every thread whose customer is ``customer_id``, lowest number (oldest) first."""
        ...

    def move_threads(self, thread_ids: Sequence[str], to_customer: str) -> None:
        """Set the customer of these threads."""
        ...

    def next_thread_number(self, tenant: str) -> int:
        """The next per-tenant thread number (1, 2, 3, ... without reuse); locks the tenant's counter."""
        ...

    def create_thread(self, thread: ThreadRecord) -> None:
        """Insert a thread (``previous_id`` included) whose first sequence number will be 1."""
        ...

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        """Take the thread's next sequence number (no gaps) and set its last activity to ``now``.

        Must take a row lock on the thread (``UPDATE ... RETURNING`` does), so concurrent
        placements on one thread get strictly increasing sequences without gaps.
        """
        ...

    def set_thread_status(self, thread_id: str, open: bool, at: datetime) -> bool:
        """Open or close a thread (row lock); ``False`` when the thread is unknown.

        A merged thread stays merged (and closed): reopening it changes nothing but still
        returns ``True``. Reopening sets last activity to ``max(last_activity, at)``.
        """
        ...

    def merge_thread(self, thread_id: str, into: str, now: datetime) -> None:
        """Close ``thread_id`` and point it at ``into`` (its ``merged_into``)."""
        ...

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
        """The customer's :meth:`recent_texts` (since ``texts_since``; ``None``: not wanted),
        :meth:`open_threads` and :meth:`customer_identities`, read together.

        A store may read them all now (PostgreSQL: one round trip for the three) or each when
        first asked for, so the caller writes none of those rows before it has asked.
        """
        ...

    # -- messages ------------------------------------------------------------------------------

    def add_message(self, message: MessageRecord) -> None:
        """Insert-if-absent by ``message_id`` (a resend after its key expired keeps the first record)."""
        ...

    def recent_texts(self, customer_id: str, since: datetime, *, not_channel: str) -> list[RecentText]:
        """The customer's texts at or after ``since`` from channels other than ``not_channel``.

        Newest first, at most :data:`RECENT_TEXTS_KEPT`.
        """
        ...

    def add_recent_text(self, text: RecentText) -> None:
        """Insert a recent text, and delete all but the newest :data:`RECENT_TEXTS_KEPT` of its
        customer and channel.

        The table only needs what :meth:`recent_texts` can return, so a customer busy on one
        channel (an alert sender, a flood) keeps it small, and reading it stays cheap. Texts older
        than the duplicate window are never returned; ``Store.purge_recent_texts`` deletes them.
        """
        ...


# Work a store runs in one transaction (``Store.transact``): gets the Tx and the store's clock
# reading, returns its value and the events to enqueue in the same commit.
TxWork = Callable[[Tx, datetime], "tuple[T, Sequence[Event]]"]
