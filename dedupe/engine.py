"""Placement: idempotency claim, customer resolution and thread assignment for one message.

Written against :class:`dedupe.tx.Tx` so every store runs the same logic inside its own
transaction. This first engine threads by the customer's recent open thread only; explicit
references, identity merging and duplicate touchpoints come later.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from dedupe.tx import CustomerRecord, MessageRecord, ThreadRecord, Tx
from gateway.events import CustomerView, new_event_id
from gateway.model import CanonicalMessage, Identity, Placement
from gateway.store.base import PlacementPolicy


@dataclass(frozen=True, slots=True, kw_only=True)
class Placed:
    """The engine's answer. ``customer`` and ``thread_subject`` are ``None`` for a duplicate."""

    placement: Placement
    customer: CustomerView | None = None
    thread_subject: str | None = None


def new_id(prefix: str) -> str:
    """A prefixed, time-ordered id such as ``cus_0190f3...`` (UUIDv7 hex)."""
    return f"{prefix}_{uuid.UUID(new_event_id()).hex}"


def place(tx: Tx, message: CanonicalMessage, policy: PlacementPolicy, *, now: datetime) -> Placed:
    """Place ``message``: claim its key, resolve its customer, assign its thread, record it."""
    key = message.idempotency_key()
    message_id = message.message_id()
    first = tx.claim_key(key, message_id, now)
    if first is not None:
        return Placed(placement=first)

    customer = resolve_customer(tx, message, now=now)
    thread, is_new = assign_thread(tx, message, customer.id, policy, now=now)
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
    placement = Placement(
        message_id=message_id,
        thread_id=thread.id,
        customer_id=customer.id,
        sequence=sequence,
        is_new_thread=is_new,
    )
    tx.complete_claim(key, placement)
    view = CustomerView(
        id=customer.id, identities=tx.customer_identities(customer.id), display_name=customer.display_name
    )
    return Placed(placement=placement, customer=view, thread_subject=thread.subject)


def resolve_customer(tx: Tx, message: CanonicalMessage, *, now: datetime) -> CustomerRecord:
    """The customer owning the first known identity of the message, else a new one.

    The message's unknown identities are attached to that customer. Identities already owned by
    another customer stay where they are: merging customers needs verified evidence and emits
    events, which is the identity graph's job, not this one's.
    """
    identities = _unique(message.identities)
    known = tx.find_identities(message.tenant, identities)
    if known:
        customer = tx.get_customer(known[0].customer_id)
        if customer.display_name is None and message.display_name:
            tx.set_display_name(customer.id, message.display_name)
            customer = CustomerRecord(
                id=customer.id, tenant=customer.tenant, display_name=message.display_name
            )
    else:
        customer = CustomerRecord(id=new_id("cus"), tenant=message.tenant, display_name=message.display_name)
        tx.create_customer(customer, now)

    stored = {(s.kind, s.value): s for s in known}
    for identity in identities:
        found = stored.get(identity.key())
        if found is None:
            tx.add_identity(message.tenant, customer.id, identity, now)
        elif identity.verified and not found.verified:
            # The channel proved an identity that was only claimed before.
            tx.mark_verified(message.tenant, identity)
    return customer


def assign_thread(
    tx: Tx, message: CanonicalMessage, customer_id: str, policy: PlacementPolicy, *, now: datetime
) -> tuple[ThreadRecord, bool]:
    """The customer's open thread active within the window, else a new thread; ``(thread, is_new)``."""
    current = tx.find_open_thread(
        customer_id=customer_id,
        tenant=message.tenant,
        inbox=message.inbox,
        active_since=now - timedelta(seconds=policy.window),
    )
    if current is not None:
        return current, False
    thread = ThreadRecord(
        id=new_id("thr"),
        tenant=message.tenant,
        inbox=message.inbox,
        customer_id=customer_id,
        subject=message.subject,
        number=tx.next_thread_number(message.tenant),
        last_activity=now,
    )
    tx.create_thread(thread)
    return thread, True


def _unique(identities: tuple[Identity, ...]) -> list[Identity]:
    """Identities in order, one per (kind, value); a verified copy wins over a claimed one."""
    seen: dict[tuple[str, str], Identity] = {}
    for identity in identities:
        prior = seen.get(identity.key())
        if prior is None or (identity.verified and not prior.verified):
            seen[identity.key()] = identity
    return list(seen.values())
