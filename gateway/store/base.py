"""The store protocol every backend satisfies, and the plain records it returns.

Every write method is one durable transaction: when it returns, the data is committed with fsync
(that is what lets a connector acknowledge). Backends group concurrent writers into one commit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, TypeVar

from core.channel import DeliveryStatus, ReplyFailure
from core.events import CustomerView, Event
from core.media import MediaFetch
from core.model import CanonicalMessage, Placement, RawEnvelope
from dedupe.policy import PlacementPolicy
from gateway.store.replies import (
    ReplyBacklog,
    ReplyContext,
    ReplyOutcome,
    ReplyRecord,
    ReplyRequest,
    ReplyRequested,
)

if TYPE_CHECKING:
    from dedupe.tx import TxWork

T = TypeVar("T")


# Builds the message.received event once the store knows customer, thread and sequence.
# Called inside the transaction (so it must be pure and fast).
EventBuilder = Callable[[CanonicalMessage, Placement, CustomerView, "str | None", "str | None"], Event]
"""(message, placement, customer, thread_subject, raw_ref) -> Event"""


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxRow:
    """An event waiting in the outbox. ``position`` orders the outbox (and so each thread)."""

    position: int
    event_id: str
    type: str
    routing_key: str
    tenant: str
    channel: str
    thread_id: str | None
    sequence: int | None
    body: bytes
    created_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboxStatus:
    backlog: int
    oldest_created_at: datetime | None
    published_total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QuarantineCounts:
    held: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class QuarantineRecord:
    id: str
    tenant: str
    channel: str
    inbox: str
    reason: str
    raw_ref: str
    size: int
    received_at: datetime
    replayed_at: datetime | None = None
    replay_result: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Erasure:
    """The audit record of one erasure: no personal data, only ids, counts and a digest.

    ``digest`` is the SHA-256 of the manifest of what was removed (customer, thread, message,
    blob and event ids, key tombstones), so an auditor holding a copy can check it.
    """

    id: str
    tenant: str
    customer_id: str
    merged_customers: tuple[str, ...]
    threads: tuple[str, ...]
    requested_by: str | None
    requested_at: datetime
    counts: Mapping[str, int]
    digest: str


class Store(Protocol):
    """Durable state of the gateway. Implementations: ``SQLiteStore``, ``PostgresStore``."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def accept(
        self,
        envelope: RawEnvelope,
        messages: Sequence[CanonicalMessage],
        *,
        policies: Sequence[PlacementPolicy],
        build_event: EventBuilder,
    ) -> list[Placement]:
        """In ONE transaction: archive the raw bytes and attachments, and for each message claim its
        idempotency key (a claimed key yields the first placement with ``duplicate=True`` and no
        event), resolve the customer, assign the thread, and enqueue its event in the outbox.

        Raises :class:`core.errors.BacklogFull` when the outbox is at its bound and
        :class:`core.errors.StoreError` when the commit fails; nothing is kept then.
        """
        ...

    async def quarantine(self, envelope: RawEnvelope, reason: str) -> QuarantineRecord:
        """Keep the raw bytes and the reason, and enqueue a ``message.quarantined`` event."""
        ...

    async def transact(self, work: TxWork[T]) -> T:
        """Run ``work(tx, now)`` in ONE durable transaction and return its value.

        ``work`` gets the store's :class:`dedupe.tx.Tx` and the store's clock reading; the events it
        returns are enqueued in the outbox in the same commit (not bounded by ``max_backlog``: they
        record decisions already made). Desk and control operations (link, unmerge, thread status)
        run through this. An exception from ``work`` rolls everything back and propagates.
        """
        ...

    async def enqueue(self, events: Sequence[Event]) -> None:
        """Durably enqueue events that are not tied to an inbound message (merges, control)."""
        ...

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        """Unpublished events in outbox order, after position ``after``."""
        ...

    async def outbox_mark_published(self, positions: Sequence[int]) -> None: ...

    async def outbox_status(self) -> OutboxStatus: ...

    async def quarantine_list(self, limit: int = 100) -> list[QuarantineRecord]: ...

    async def quarantine_counts(self) -> QuarantineCounts:
        """How many quarantined messages are held (never replayed into the store), of how many."""
        ...

    async def quarantine_get(self, quarantine_id: str) -> tuple[QuarantineRecord, RawEnvelope] | None:
        """The record and the envelope rebuilt from the archived raw bytes (for replay)."""
        ...

    async def quarantine_mark_replayed(self, quarantine_id: str, result: str) -> None: ...

    async def read_blob(self, sha256: str) -> bytes | None:
        """An archived raw body or attachment by content hash."""
        ...

    async def blob_content_type(self, sha256: str) -> str | None:
        """The content type the bytes were first stored with (an attachment's, fetched media's);
        ``None`` for a raw body, an unknown hash, or a blob stored before types were kept."""
        ...

    async def blob_put(self, data: bytes, content_type: str | None) -> str:
        """Durably keep ``data`` as a blob (indexed, so the orphan sweep keeps it); its sha256."""
        ...

    async def purge_expired(self, now: datetime) -> int:
        """Drop idempotency keys older than the retention; returns how many."""
        ...

    async def purge_recent_texts(self, before: datetime, limit: int = 500) -> int:
        """Delete up to ``limit`` of the oldest recent texts older than ``before``; returns how many.

        Texts past the duplicate window are never compared again; without this sweep, those of
        every customer who wrote once would stay for good (text included).
        """
        ...

    async def purge_retained(self, kind: str, before: datetime, limit: int) -> int:
        """Remove up to ``limit`` of the oldest rows of ``kind`` older than ``before`` in one
        transaction, then their blob files; returns how many rows went. Kinds
        (:data:`gateway.store.erase.RETAINED_KINDS`): ``keys`` (idempotency keys), ``events``
        (published outbox rows), ``messages`` (message rows), ``raw_bodies``, ``blobs``
        (attachment and fetched-media files)."""
        ...

    async def reclaim_space(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the file system (SQLite's incremental vacuum);
        returns how many. PostgreSQL leaves this to autovacuum (0)."""
        ...

    async def erase_customer(
        self, customer_id: str, *, requested_by: str | None = None, tenant: str | None = None
    ) -> Erasure | None:
        """Erase a customer (followed to the customer it was merged into, with every customer merged
        into that one): see :mod:`gateway.store.erase`. Publishes ``customer.erased`` through the
        outbox in the same commit. ``None`` when the customer is unknown (or not of ``tenant``).
        Erasing again is harmless: it finds nothing more and announces the erasure again."""
        ...

    async def sweep_orphans(self, min_age: float) -> int:
        """Remove blob files that no committed row names and that are older than ``min_age``
        seconds (left by a commit that failed after its files were written); returns how many."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot write right now (readiness)."""
        ...

    async def state_put(self, key: str, value: bytes) -> None:
        """Durably keep a small piece of connector state (an IMAP watermark, a pull cursor)."""
        ...

    async def state_get(self, key: str) -> bytes | None: ...

    async def state_cas(self, key: str, expected: bytes | None, value: bytes) -> bool:
        """Durably set ``value`` only if the current value is ``expected`` (``None``: the key is
        absent), atomically against every other writer (other instances included); returns whether
        it was set. Lets two pollers of one cursor agree on who advances it."""
        ...

    # -- media fetch queue: media announced by a committed message, fetched after the answer ------

    async def media_enqueue(self, fetches: Sequence[MediaFetch]) -> None:
        """Durably add pending fetches, due at ``next_attempt_at`` (``created_at`` when unset), with
        their ``name`` and ``content_type`` if known. A key already present (pending, done or failed)
        is left as it is (insert-if-absent): a provider's retry or a re-pulled page adds nothing."""
        ...

    async def media_claim(self, now: datetime, limit: int, lease: float, *, channel: str) -> list[MediaFetch]:
        """Up to ``limit`` pending fetches of ``channel`` due at ``now`` (oldest ``next_attempt_at``
        first; each channel's connector fetches its own), claimed in one transaction: each one's
        ``attempts`` goes up by one and its ``next_attempt_at`` moves to ``now + lease`` seconds, so
        a fetcher that dies mid-fetch leaves it due again after the lease and another instance does
        not take it meanwhile (PostgreSQL: ``FOR UPDATE SKIP LOCKED``). The returned records show
        the incremented ``attempts``."""
        ...

    async def media_done(self, key: str, data: bytes, *, content_type: str, name: str | None) -> str:
        """Keep ``data`` in the blob store (durably, before the commit that names it) and mark the fetch
        done with its sha256, size, content type and file name; returns the sha256."""
        ...

    async def media_failed(self, key: str, error: str, *, retry_at: datetime | None) -> None:
        """Record a failed attempt: pending again, due at ``retry_at``; or, when ``retry_at`` is
        ``None``, failed for good (the provider no longer has it, or it is too large)."""
        ...

    async def media_get(self, key: str) -> MediaFetch | None:
        """The fetch record by key (for the media endpoint), or ``None``."""
        ...

    # -- the reply ledger (gateway.store.replies) -------------------------------------------------

    async def reply_request(self, request: ReplyRequest) -> ReplyRequested:
        """Record a desk's reply command, once per ``(tenant, command_id)``: ``created``, or
        ``duplicate`` (same fingerprint: nothing changes), ``conflict`` (another body: refused),
        ``unknown_thread`` (no such thread in that tenant). Committed when it returns."""
        ...

    async def reply_get(self, reply_id: str) -> ReplyRecord | None: ...

    async def reply_by_command(self, tenant: str, command_id: str) -> ReplyRecord | None: ...

    async def reply_list(self, thread_id: str) -> list[ReplyRecord]:
        """The replies of a thread, in their order."""
        ...

    async def reply_claim(self, now: datetime, limit: int, lease: float, owner: str) -> list[ReplyRecord]:
        """Lease up to ``limit`` due replies, each the first unfinished one of its thread, until
        ``now + lease`` seconds; ``owner`` is the lease's token, new for every call."""
        ...

    async def reply_context(self, reply_id: str) -> ReplyContext | None:
        """The thread, its messages and the customer's channels, to resolve one reply."""
        ...

    async def reply_finish(self, outcome: ReplyOutcome) -> bool:
        """Record an attempt's outcome and (sent, failed) its event in one commit."""
        ...

    async def reply_report(
        self,
        channel: str,
        provider_message_id: str,
        status: DeliveryStatus,
        at: datetime,
        reason: ReplyFailure | None = None,
        detail: str | None = None,
    ) -> bool:
        """A provider's delivery report; ``False`` when no reply of ``channel`` has that id."""
        ...

    async def reply_delivered(self, reply_id: str) -> bool:
        """Whether a client reported ``reply_id`` delivered or read."""
        ...

    async def reply_fallback_cancel(self, channel: str, provider_message_id: str) -> int:
        """Drop the mail fallbacks still waiting of the reply a client received; how many."""
        ...

    async def reply_fallback_drop(self, reply_id: str, lease_owner: str) -> bool:
        """Drop a claimed mail fallback that must not go out (delivered meanwhile, nobody to
        mail), under its lease; no event."""
        ...

    async def reply_backlog(self) -> ReplyBacklog: ...
