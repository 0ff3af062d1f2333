"""Placement: idempotency claim, customer resolution and thread assignment for one message.

Written against :class:`dedupe.tx.Tx` so every store runs the same logic inside its own
transaction. The rules (docs/threading.md):

- Customer: the message's identities are normalised (:mod:`dedupe.identities`); unknown ones join
  the customer of the known ones. When they belong to two or more customers, the customers are
  merged only if every connecting identity is verified both by this message and in the store;
  otherwise a claimed link is recorded and the message goes to the customer of the first verified
  (else first) known identity.
- Thread, in order: an explicit reference (In-Reply-To / References, a ticket number, a channel
  thread key); a duplicate touchpoint (same text, other channel, within the duplicate window); the
  customer's open thread in tenant+inbox within the window; a new thread. A reference to a closed
  thread opens a new thread whose ``previous_id`` is the closed one (an auto-generated message joins
  the closed thread instead: an out-of-office never opens a ticket on its own); so does a message
  that the window would have put on a thread a desk closed. Two open threads
  shown to be one (referenced together, or a customer merge) are merged into the lower number.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from core.events import CustomerView, Event, customer_merged, thread_merged, uuid7_int
from core.model import CanonicalMessage, Identity, Placement
from dedupe import similarity
from dedupe.identities import normalize_all
from dedupe.policy import PlacementPolicy
from dedupe.tx import (
    ClaimedLink,
    CustomerRecord,
    MergeRecord,
    MessageRecord,
    RecentText,
    ThreadReads,
    ThreadRecord,
    Tx,
)

TICKET_PREFIX = "ticket:"
_MAX_RFC822_LOOKUPS = 10  # In-Reply-To plus the newest References
_MAX_FOLLOW = 16  # merged_into / successor hops; a longer chain is a loop or a bug
_TEXT_SCAN = 4000  # characters of text searched for a ticket reference
_CLOSED_LOOKBACK = 8  # newest threads of a customer searched for a closed predecessor


@dataclass(frozen=True, slots=True, kw_only=True)
class Placed:
    """The engine's answer. ``customer`` and ``thread_subject`` are ``None`` for a duplicate.

    ``events`` (thread and customer merges) go into the outbox in the same transaction, before
    the message's own event.
    """

    placement: Placement
    customer: CustomerView | None = None
    thread_subject: str | None = None
    events: tuple[Event, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Choice:
    thread: ThreadRecord
    is_new: bool
    duplicate_of: str | None = None
    # What was read of the customer on the way (its identities serve the event), if anything.
    reads: ThreadReads | None = None


def new_id(prefix: str) -> str:
    """A prefixed, time-ordered id such as ``cus_0190f3...`` (UUIDv7 hex)."""
    return f"{prefix}_{uuid7_int():032x}"


def place(tx: Tx, message: CanonicalMessage, policy: PlacementPolicy, *, now: datetime) -> Placed:
    """Place ``message``: claim its key, resolve its customer, assign its thread, record it."""
    key = message.idempotency_key()
    message_id = message.message_id()
    identities = normalize_all(message.identities)
    tx.prefetch_identities(message.tenant, identities)
    first = tx.claim_key(key, message_id, now, message.fingerprint())
    if first is not None:
        return Placed(placement=first)

    events: list[Event] = []
    customer, created = resolve_customer(
        tx,
        message.tenant,
        identities,
        message.display_name,
        now=now,
        message_id=message_id,
        events=events,
        merge_scope=(message.inbox, policy.window, message.channel),
    )
    choice = assign_thread(tx, message, customer.id, policy, now=now, events=events, new_customer=created)
    thread = choice.thread
    sequence = tx.advance_thread(thread.id, now)
    tx.add_message(
        MessageRecord(
            message_id=message_id,
            thread_id=thread.id,
            customer_id=customer.id,
            sequence=sequence,
            channel=message.channel,
            external_id=message.external_id,
            rfc822_message_id=message.external_id if message.channel == "email" else None,
            received_at=message.received_at,
        )
    )
    if message.thread_ref and not message.thread_ref.startswith(TICKET_PREFIX):
        tx.add_thread_key(message.tenant, message.channel, message.inbox, message.thread_ref, thread.id, now)
    _remember_text(tx, message, customer.id, message_id, thread.id, policy, now=now)
    placement = Placement(
        message_id=message_id,
        thread_id=thread.id,
        customer_id=customer.id,
        sequence=sequence,
        is_new_thread=choice.is_new,
        duplicate_of=choice.duplicate_of,
        previous_thread_id=thread.previous_id,
        thread_number=thread.number,
    )
    tx.complete_claim(key, placement)
    # A customer created here has exactly the identities just added, all of one time: what
    # customer_identities would read back (ordered by time, kind, value).
    if created:
        owned = tuple(sorted(identities, key=Identity.key))
    else:
        owned = choice.reads.identities() if choice.reads is not None else tx.customer_identities(customer.id)
    view = CustomerView(id=customer.id, identities=owned, display_name=customer.display_name)
    return Placed(placement=placement, customer=view, thread_subject=thread.subject, events=tuple(events))


# -- customers -------------------------------------------------------------------------------------


def resolve_customer(
    tx: Tx,
    tenant: str,
    identities: Sequence[Identity],
    display_name: str | None,
    *,
    now: datetime,
    events: list[Event],
    message_id: str | None = None,
    merge_scope: tuple[str, float, str] | None = None,
) -> tuple[CustomerRecord, bool]:
    """The customer of already-normalised ``identities``: found, merged, or created; and whether
    it was created here.

    ``merge_scope`` (inbox, window, channel) lets a customer merge also merge the open threads of
    that inbox active within the window.
    """
    keys = sorted(i.key() for i in identities)
    tx.lock_identities(tenant, keys)
    known = tx.find_identities(tenant, identities)
    # None known: no owner to lock, and none can appear meanwhile (adding an identity takes its
    # lock, held here; a merge moves only stored ones).
    for _ in range(0 if tx.serialized or not known else 3):
        owners = list(dict.fromkeys(s.customer_id for s in known))
        if tx.holds_customers(owners):
            break  # locked before the read: no merge can have moved an identity since
        tx.lock_customers(sorted(owners))
        # A concurrent merge may have moved an identity between the read and the lock: read again.
        again = tx.find_identities(tenant, identities)
        if again == known:
            break
        known = again
    owners = list(dict.fromkeys(s.customer_id for s in known))

    if not owners:
        customer = CustomerRecord(id=new_id("cus"), tenant=tenant, display_name=display_name)
        tx.create_customer(customer, now)
        for identity in identities:
            tx.add_identity(tenant, customer.id, identity, now)
        return customer, True

    stored = {(s.kind, s.value): s for s in known}
    if len(owners) == 1:
        chosen = owners[0]
    else:
        given = {i.key(): i for i in identities}
        connecting = [given[(s.kind, s.value)] for s in known]
        proven = all(i.verified and stored[i.key()].verified for i in connecting)
        if proven:
            chosen = min(owners)  # the oldest survives (ids are time-ordered)
            merge_customers(
                tx,
                tenant,
                chosen,
                [o for o in owners if o != chosen],
                evidence={
                    "source": "message",
                    "message_id": message_id,
                    "identities": [_identity_json(i) for i in connecting],
                },
                now=now,
                events=events,
                thread_scope=merge_scope,
            )
        else:
            strongest = next(
                (s for s in known if s.verified and given[(s.kind, s.value)].verified),
                next((s for s in known if s.verified), known[0]),
            )
            chosen = strongest.customer_id
            for other in owners:
                if other == chosen:
                    continue
                tx.add_claimed_link(
                    ClaimedLink(
                        id=new_id("lnk"),
                        tenant=tenant,
                        customer_id=chosen,
                        other_customer_id=other,
                        identities=tuple(
                            i for i in connecting if stored[i.key()].customer_id in (chosen, other)
                        ),
                        message_id=message_id,
                        created_at=now,
                    )
                )

    customer = tx.get_customer(chosen)
    if customer.display_name is None and display_name:
        tx.set_display_name(customer.id, display_name)
        customer = CustomerRecord(id=customer.id, tenant=customer.tenant, display_name=display_name)
    after_merge = (
        {(s.kind, s.value): s for s in tx.find_identities(tenant, identities)} if len(owners) > 1 else stored
    )
    for identity in identities:
        found = after_merge.get(identity.key())
        if found is None:
            tx.add_identity(tenant, chosen, identity, now)
        elif found.customer_id == chosen and identity.verified and not found.verified:
            # The channel proved an identity that was only claimed before.
            tx.mark_verified(tenant, identity)
    return customer, False


def merge_customers(
    tx: Tx,
    tenant: str,
    survivor: str,
    merged: Sequence[str],
    *,
    evidence: Mapping[str, Any],
    now: datetime,
    events: list[Event],
    thread_scope: tuple[str, float, str] | None = None,
) -> MergeRecord:
    """Move every identity and thread of ``merged`` to ``survivor``; record the merge; emit its event."""
    tx.lock_customers(sorted({survivor, *merged}))
    moved: list[tuple[str, Identity]] = []
    threads: list[tuple[str, str]] = []
    for customer_id in merged:
        keys = [i.key() for i in tx.customer_identities(customer_id)]
        moved.extend((customer_id, i) for i in tx.move_identities(tenant, keys, customer_id, survivor))
        thread_ids = tx.customer_thread_ids(customer_id)
        tx.move_threads(thread_ids, survivor)
        threads.extend((customer_id, t) for t in thread_ids)
        tx.set_merged_into(customer_id, survivor)
    record = MergeRecord(
        id=new_id("mrg"),
        tenant=tenant,
        surviving_customer=survivor,
        merged_customers=tuple(merged),
        identities=tuple(moved),
        threads=tuple(threads),
        evidence=dict(evidence),
        created_at=now,
    )
    tx.add_merge(record)
    events.append(
        customer_merged(
            tenant=tenant,
            surviving_customer=survivor,
            merged_customers=list(merged),
            evidence={**evidence, "identities_moved": [_identity_json(i) for _, i in moved]},
            merge_id=record.id,
            occurred_at=now,
        )
    )
    if thread_scope is not None:
        inbox, window, channel = thread_scope
        open_now = tx.open_threads(
            customer_id=survivor, tenant=tenant, inbox=inbox, active_since=now - timedelta(seconds=window)
        )
        if len(open_now) > 1:
            _merge_threads(tx, open_now, reason="customer.merged", channel=channel, now=now, events=events)
    return record


def undo_merge(tx: Tx, merge_id: str, *, now: datetime, events: list[Event]) -> MergeRecord | None:
    """Give every merged-away customer back its identities and threads; ``None`` if unknown or undone.

    Threads that were merged into another thread meanwhile stay merged (the desk has seen that).
    """
    record = tx.get_merge(merge_id)
    if record is None or record.undone_at is not None:
        return None
    holder = current_customer(tx, record.surviving_customer)
    tx.lock_customers(sorted({holder, *record.merged_customers}))
    for customer_id in record.merged_customers:
        keys = [i.key() for origin, i in record.identities if origin == customer_id]
        tx.move_identities(record.tenant, keys, holder, customer_id)
        tx.move_threads([t for origin, t in record.threads if origin == customer_id], customer_id)
        tx.set_merged_into(customer_id, None)
    tx.mark_merge_undone(merge_id, now)
    events.append(
        customer_merged(
            tenant=record.tenant,
            surviving_customer=record.surviving_customer,
            merged_customers=list(record.merged_customers),
            evidence=dict(record.evidence),
            merge_id=record.id,
            occurred_at=now,
            unmerge=True,
        )
    )
    return record


def current_customer(tx: Tx, customer_id: str) -> str:
    """Follow ``merged_into`` to the customer that holds the identities now."""
    for _ in range(_MAX_FOLLOW):
        customer = tx.get_customer(customer_id)
        if customer.merged_into is None:
            return customer_id
        customer_id = customer.merged_into
    return customer_id


# -- threads ---------------------------------------------------------------------------------------


def assign_thread(
    tx: Tx,
    message: CanonicalMessage,
    customer_id: str,
    policy: PlacementPolicy,
    *,
    now: datetime,
    events: list[Event] | None = None,
    new_customer: bool = False,
) -> _Choice:
    """Reference, duplicate touchpoint, open thread within the window, or a new thread.

    A ``new_customer`` (created by this placement) has no recent text and no thread yet: only a
    reference can name an existing thread.
    """
    events = events if events is not None else []
    referenced = referenced_threads(tx, message, policy)
    if referenced:
        open_refs = [t for t in referenced if t.open]
        if open_refs:
            target = open_refs[0]
            if len(open_refs) > 1:
                target = _merge_threads(
                    tx, open_refs, reason="reference", channel=message.channel, now=now, events=events
                )
            return _Choice(thread=target, is_new=False)
        closed = referenced[0]
        if message.auto_generated:
            return _Choice(thread=closed, is_new=False)
        return _Choice(thread=_new_thread(tx, message, customer_id, now, previous=closed.id), is_new=True)
    if new_customer:
        return _Choice(thread=_new_thread(tx, message, customer_id, now), is_new=True)

    text = _comparable_text(message, policy)
    since = now - _seconds(policy.window)
    # Asked for at once: on PostgreSQL one round trip instead of three.
    reads = tx.thread_reads(
        customer_id,
        tenant=message.tenant,
        inbox=message.inbox,
        active_since=since,
        texts_since=now - _seconds(policy.duplicate_window) if text is not None else None,
        not_channel=message.channel,
    )
    duplicate = _find_duplicate(tx, reads, text, policy) if text is not None else None
    if duplicate is not None:
        return duplicate
    open_now = reads.open_threads()
    if len(open_now) > 1 and _joined_by_merge(tx, customer_id, open_now):
        # A merge without a message (desk link, WeChat unionid) knew no inbox or window: merge here.
        survivor = _merge_threads(
            tx, open_now, reason="customer.merged", channel=message.channel, now=now, events=events
        )
        return _Choice(thread=survivor, is_new=False, reads=reads)
    if open_now:
        return _Choice(
            thread=max(open_now, key=lambda t: (t.last_activity, t.number)), is_new=False, reads=reads
        )
    previous = _closed_in_window(tx, message, customer_id, since=since)
    return _Choice(
        thread=_new_thread(tx, message, customer_id, now, previous=previous), is_new=True, reads=reads
    )


def _joined_by_merge(tx: Tx, customer_id: str, threads: Sequence[ThreadRecord]) -> bool:
    """Whether a customer merge brought these open threads together (they came from two customers).

    Two open threads of one customer that no merge joined (a reply to a closed thread opened the
    second while another was open) stay apart.
    """
    origins = _thread_origins(tx, customer_id)
    return len({origins.get(t.id, customer_id) for t in threads}) > 1


def _thread_origins(tx: Tx, customer_id: str) -> dict[str, str]:
    """Thread id -> the customer it belonged to before the merges still in force into ``customer_id``
    (followed through merges of merges, to the first owner)."""
    origins: dict[str, str] = {}
    pending, seen = [customer_id], {customer_id}
    while pending and len(seen) <= _MAX_FOLLOW:
        survivor = pending.pop()
        for merge in tx.customer_merges(survivor):
            if merge.surviving_customer != survivor or merge.undone_at is not None:
                continue
            for origin, thread_id in merge.threads:
                origins[thread_id] = origin  # a deeper merge, read later, names an earlier owner
            for merged in merge.merged_customers:
                if merged not in seen:
                    seen.add(merged)
                    pending.append(merged)
    return origins


def _closed_in_window(tx: Tx, message: CanonicalMessage, customer_id: str, *, since: datetime) -> str | None:
    """The thread the window would have joined had a desk not closed it, so the new one can refer to it.

    Only the customer's newest few threads are looked at: the one the window would have chosen is
    recent, and this keeps the cost flat for a customer with a long history.
    """
    best: ThreadRecord | None = None
    for thread_id in reversed(tx.customer_thread_ids(customer_id)[-_CLOSED_LOOKBACK:]):
        thread = tx.get_thread(thread_id)
        if (
            thread is None
            or thread.open
            or thread.merged_into is not None
            or (thread.tenant, thread.inbox) != (message.tenant, message.inbox)
            or thread.last_activity < since
        ):
            continue
        if best is None or thread.last_activity > best.last_activity:
            best = thread
    return best.id if best is not None else None


def referenced_threads(tx: Tx, message: CanonicalMessage, policy: PlacementPolicy) -> list[ThreadRecord]:
    """Threads the message explicitly refers to, strongest first, each followed to where it lives now."""
    found: list[ThreadRecord] = []
    tenant = message.tenant
    rfc822 = [message.in_reply_to] if message.in_reply_to else []
    rfc822 += [r for r in reversed(message.references) if r != message.in_reply_to]
    for ref in rfc822[:_MAX_RFC822_LOOKUPS]:
        thread = tx.find_thread_by_rfc822(tenant, ref)
        if thread is not None:
            found.append(thread)
            break
    number = ticket_number(message, policy.ticket_ref_pattern)
    if number is not None:
        thread = tx.find_thread_by_number(tenant, number)
        if thread is not None:
            found.append(thread)
    if message.thread_ref and not message.thread_ref.startswith(TICKET_PREFIX):
        thread = tx.find_thread_by_key(tenant, message.channel, message.inbox, message.thread_ref)
        if thread is not None:
            found.append(thread)
    resolved: dict[str, ThreadRecord] = {}
    for thread in found:
        current = follow(tx, thread)
        resolved.setdefault(current.id, current)
    return list(resolved.values())


def follow(tx: Tx, thread: ThreadRecord) -> ThreadRecord:
    """Where a thread lives now: through ``merged_into``, and from a closed thread to its open successor."""
    for _ in range(_MAX_FOLLOW):
        if thread.merged_into is not None:
            nxt = tx.get_thread(thread.merged_into)
        elif not thread.open:
            nxt = tx.find_successor(thread.id)
        else:
            return thread
        if nxt is None:
            return thread
        thread = nxt
    return thread


def ticket_number(message: CanonicalMessage, pattern: str | None) -> int | None:
    """The ticket number from ``thread_ref`` (``ticket:<n>``), else from the subject or text."""
    if message.thread_ref and message.thread_ref.startswith(TICKET_PREFIX):
        digits = message.thread_ref[len(TICKET_PREFIX) :]
        return int(digits) if digits.isdigit() else None
    if not pattern:
        return None
    compiled = _compiled(pattern)
    for text in (message.subject, (message.text or "")[:_TEXT_SCAN]):
        if not text:
            continue
        match = compiled.search(text)
        if match is not None:
            value = match.groupdict().get("number") or (match.group(1) if compiled.groups else match.group(0))
            if value and value.isdigit():
                return int(value)
    return None


@functools.lru_cache(maxsize=8)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@functools.lru_cache(maxsize=64)
def _seconds(seconds: float) -> timedelta:
    """``timedelta(seconds=seconds)``: a policy's windows are a few values, and making a timedelta
    from a float costs more than the rest of the window arithmetic of a placement."""
    return timedelta(seconds=seconds)


def _merge_threads(
    tx: Tx, threads: Sequence[ThreadRecord], *, reason: str, channel: str, now: datetime, events: list[Event]
) -> ThreadRecord:
    """Merge open threads into the one with the lowest number; returns the survivor."""
    survivor = min(threads, key=lambda t: t.number)
    merged = [t.id for t in threads if t.id != survivor.id]
    for thread_id in merged:
        tx.merge_thread(thread_id, survivor.id, now)
    events.append(
        thread_merged(
            tenant=survivor.tenant,
            channel=channel,
            surviving_thread=survivor.id,
            merged_threads=merged,
            reason=reason,
            occurred_at=now,
        )
    )
    return survivor


def _new_thread(
    tx: Tx, message: CanonicalMessage, customer_id: str, now: datetime, *, previous: str | None = None
) -> ThreadRecord:
    thread = ThreadRecord(
        id=new_id("thr"),
        tenant=message.tenant,
        inbox=message.inbox,
        customer_id=customer_id,
        subject=message.subject,
        number=tx.next_thread_number(message.tenant),
        last_activity=now,
        previous_id=previous,
    )
    tx.create_thread(thread)
    return thread


# -- duplicate touchpoints -------------------------------------------------------------------------


def _comparable_text(message: CanonicalMessage, policy: PlacementPolicy) -> str | None:
    if message.auto_generated or policy.duplicate_window <= 0:
        return None
    text = similarity.normalize_text(message.reply_text or message.text)
    return text if len(text) >= policy.duplicate_min_chars else None


def _find_duplicate(tx: Tx, reads: ThreadReads, text: str, policy: PlacementPolicy) -> _Choice | None:
    """The open thread of a recent text ``text`` repeats (``reads`` has the texts of the duplicate
    window from other channels: a repeat on one channel is a conversation, or idempotency's job)."""
    for recent in reads.recent_texts():
        if not similarity.is_duplicate(
            text, recent.text, policy.duplicate_threshold, policy.duplicate_min_chars
        ):
            continue
        thread = tx.get_thread(recent.thread_id)
        if thread is None:
            continue
        thread = follow(tx, thread)
        if thread.open:
            return _Choice(thread=thread, is_new=False, duplicate_of=recent.message_id, reads=reads)
    return None


def _remember_text(
    tx: Tx,
    message: CanonicalMessage,
    customer_id: str,
    message_id: str,
    thread_id: str,
    policy: PlacementPolicy,
    *,
    now: datetime,
) -> None:
    text = _comparable_text(message, policy)
    if text is None:
        return
    tx.add_recent_text(
        RecentText(
            customer_id=customer_id,
            message_id=message_id,
            thread_id=thread_id,
            channel=message.channel,
            text=text,
            at=now,
        )
    )


def _identity_json(identity: Identity) -> dict[str, Any]:
    return {"kind": identity.kind, "value": identity.value, "verified": identity.verified}
