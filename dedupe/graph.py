"""Desk and control operations on the identity graph and threads, as :data:`dedupe.tx.TxWork`.

Each function builds the work a store runs in one transaction (``Store.transact``): it returns its
value and the events to enqueue with it, so a merge and its ``customer.merged`` event commit together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from core.events import Event
from core.model import Identity
from dedupe.engine import current_customer, merge_customers, undo_merge
from dedupe.identities import normalize_all
from dedupe.tx import ClaimedLink, CustomerRecord, MergeRecord, Tx, TxWork


class GraphError(ValueError):
    """A desk request that cannot apply (unknown customer, other tenant, merge already undone)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerSummary:
    customer: CustomerRecord
    identities: tuple[Identity, ...]
    merges: tuple[MergeRecord, ...]
    claimed_links: tuple[ClaimedLink, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkResult:
    customer_id: str
    added: tuple[Identity, ...]
    merge: MergeRecord | None


def set_thread_status(thread_id: str, *, open: bool, at: datetime, tenant: str | None = None) -> TxWork[bool]:
    """Open or close a thread as a desk reported; ``False`` when the thread (of ``tenant``) is unknown."""

    def work(tx: Tx, now: datetime) -> tuple[bool, Sequence[Event]]:
        thread = tx.get_thread(thread_id)
        if thread is None or (tenant is not None and thread.tenant != tenant):
            return False, ()
        return tx.set_thread_status(thread_id, open, at), ()

    return work


def customer_summary(customer_id: str) -> TxWork[CustomerSummary | None]:
    def work(tx: Tx, now: datetime) -> tuple[CustomerSummary | None, Sequence[Event]]:
        customer = tx.find_customer(customer_id)
        if customer is None:
            return None, ()
        summary = CustomerSummary(
            customer=customer,
            identities=tx.customer_identities(customer_id),
            merges=tuple(tx.customer_merges(customer_id)),
            claimed_links=tuple(tx.claimed_links(customer_id)),
        )
        return summary, ()

    return work


def link(
    customer_id: str,
    *,
    identities: Sequence[Identity] = (),
    other_customer_id: str | None = None,
    evidence: Mapping[str, Any],
) -> TxWork[LinkResult]:
    """Link identities (verified by the desk) or another customer to ``customer_id``.

    Unknown identities are added to the customer, verified. Identities owned by other customers, and
    ``other_customer_id``, merge those customers into this one (a recorded, reversible merge).
    """

    def work(tx: Tx, now: datetime) -> tuple[LinkResult, Sequence[Event]]:
        customer = tx.find_customer(customer_id)
        if customer is None:
            raise GraphError("not_found", f"unknown customer {customer_id}")
        target = current_customer(tx, customer_id)
        tenant = customer.tenant
        given = [Identity(kind=i.kind, value=i.value, verified=True) for i in normalize_all(identities)]
        tx.lock_identities(tenant, sorted(i.key() for i in given))
        known = {(s.kind, s.value): s for s in tx.find_identities(tenant, given)}
        others: list[str] = []
        if other_customer_id is not None:
            other = tx.find_customer(other_customer_id)
            if other is None or other.tenant != tenant:
                raise GraphError("not_found", f"unknown customer {other_customer_id}")
            others.append(current_customer(tx, other_customer_id))
        others.extend(s.customer_id for s in known.values() if s.customer_id != target)
        others = [o for o in dict.fromkeys(others) if o != target]
        tx.lock_customers(sorted({target, *others}))
        events: list[Event] = []
        merge = None
        if others:
            merge = merge_customers(
                tx, tenant, target, others, evidence={"source": "desk", **evidence}, now=now, events=events
            )
        added: list[Identity] = []
        for identity in given:
            stored = known.get(identity.key())
            if stored is None:
                tx.add_identity(tenant, target, identity, now)
                added.append(identity)
            elif not stored.verified:
                tx.mark_verified(tenant, identity)
        return LinkResult(customer_id=target, added=tuple(added), merge=merge), events

    return work


def undo(merge_id: str) -> TxWork[MergeRecord]:
    """Reverse a merge; raises :class:`GraphError` when it is unknown or already undone."""

    def work(tx: Tx, now: datetime) -> tuple[MergeRecord, Sequence[Event]]:
        events: list[Event] = []
        record = undo_merge(tx, merge_id, now=now, events=events)
        if record is None:
            existing = tx.get_merge(merge_id)
            if existing is None:
                raise GraphError("not_found", f"unknown merge {merge_id}")
            raise GraphError("already_undone", f"merge {merge_id} was already undone")
        return record, events

    return work
