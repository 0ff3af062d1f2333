"""The placement engine against an in-memory :class:`dedupe.tx.Tx`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from dedupe.engine import new_id, place
from dedupe.tx import CustomerRecord, MessageRecord, StoredIdentity, ThreadRecord
from gateway.model import CanonicalMessage, Identity, Placement
from gateway.store.base import PlacementPolicy

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
POLICY = PlacementPolicy(window=3600)


class MemoryTx:
    """Dict-backed Tx (mypy checks it against the protocol at every ``place`` call)."""

    def __init__(self) -> None:
        self.keys: dict[str, Placement | None] = {}
        self.customers: dict[str, CustomerRecord] = {}
        self.identities: dict[tuple[str, str, str], StoredIdentity] = {}
        self.threads: dict[str, ThreadRecord] = {}
        self.next_seq: dict[str, int] = {}
        self.numbers: dict[str, int] = {}
        self.messages: list[MessageRecord] = []

    def claim_key(self, key: str, message_id: str, now: datetime) -> Placement | None:
        if key not in self.keys:
            self.keys[key] = None
            return None
        first = self.keys[key]
        assert first is not None
        return dataclasses.replace(first, duplicate=True)

    def complete_claim(self, key: str, placement: Placement) -> None:
        self.keys[key] = placement

    def find_identities(self, tenant: str, identities: Sequence[Identity]) -> list[StoredIdentity]:
        return [
            self.identities[(tenant, *i.key())] for i in identities if (tenant, *i.key()) in self.identities
        ]

    def create_customer(self, customer: CustomerRecord, now: datetime) -> None:
        self.customers[customer.id] = customer

    def get_customer(self, customer_id: str) -> CustomerRecord:
        return self.customers[customer_id]

    def set_display_name(self, customer_id: str, display_name: str) -> None:
        self.customers[customer_id] = dataclasses.replace(
            self.customers[customer_id], display_name=display_name
        )

    def add_identity(self, tenant: str, customer_id: str, identity: Identity, now: datetime) -> None:
        key = (tenant, *identity.key())
        assert key not in self.identities
        self.identities[key] = StoredIdentity(
            kind=identity.kind, value=identity.value, customer_id=customer_id, verified=identity.verified
        )

    def mark_verified(self, tenant: str, identity: Identity) -> None:
        key = (tenant, *identity.key())
        self.identities[key] = dataclasses.replace(self.identities[key], verified=True)

    def customer_identities(self, customer_id: str) -> tuple[Identity, ...]:
        return tuple(
            Identity(kind=s.kind, value=s.value, verified=s.verified)
            for s in self.identities.values()
            if s.customer_id == customer_id
        )

    def find_open_thread(
        self, *, customer_id: str, tenant: str, inbox: str, active_since: datetime
    ) -> ThreadRecord | None:
        found = [
            t
            for t in self.threads.values()
            if (t.customer_id, t.tenant, t.inbox, t.open) == (customer_id, tenant, inbox, True)
            and t.last_activity >= active_since
        ]
        return max(found, key=lambda t: t.last_activity, default=None)

    def next_thread_number(self, tenant: str) -> int:
        self.numbers[tenant] = self.numbers.get(tenant, 0) + 1
        return self.numbers[tenant]

    def create_thread(self, thread: ThreadRecord) -> None:
        self.threads[thread.id] = thread
        self.next_seq[thread.id] = 1

    def advance_thread(self, thread_id: str, now: datetime) -> int:
        sequence = self.next_seq[thread_id]
        self.next_seq[thread_id] = sequence + 1
        thread = self.threads[thread_id]
        self.threads[thread_id] = dataclasses.replace(thread, last_activity=max(thread.last_activity, now))
        return sequence

    def add_message(self, message: MessageRecord) -> None:
        self.messages.append(message)


@pytest.fixture
def tx() -> MemoryTx:
    return MemoryTx()


def msg(
    external_id: str,
    *identities: Identity,
    name: str | None = None,
    inbox: str = "support",
    channel: str = "email",
) -> CanonicalMessage:
    return CanonicalMessage(
        channel=channel,
        tenant="acme",
        inbox=inbox,
        external_id=external_id,
        received_at=T0,
        identities=identities,
        display_name=name,
        subject=f"subject of {external_id}",
    )


EMAIL = Identity(kind="email", value="ada@example.com", verified=True)
PHONE = Identity(kind="phone", value="+41790000001")


def test_first_message_creates_customer_thread_and_sequence_one(tx: MemoryTx) -> None:
    placed = place(tx, msg("<a@x>", EMAIL, PHONE, name="Ada"), POLICY, now=T0)

    p = placed.placement
    assert (p.sequence, p.is_new_thread, p.duplicate) == (1, True, False)
    assert p.customer_id.startswith("cus_")
    assert p.thread_id.startswith("thr_")
    assert placed.customer is not None
    assert placed.customer.display_name == "Ada"
    assert set(placed.customer.identities) == {EMAIL, PHONE}
    assert placed.thread_subject == "subject of <a@x>"
    assert tx.threads[p.thread_id].number == 1
    assert tx.messages[0].rfc822_message_id == "<a@x>"


def test_repeat_returns_first_placement_as_duplicate(tx: MemoryTx) -> None:
    first = place(tx, msg("<a@x>", EMAIL), POLICY, now=T0).placement
    again = place(tx, msg("<a@x>", EMAIL), POLICY, now=T0 + timedelta(seconds=5))

    assert again.placement == dataclasses.replace(first, duplicate=True)
    assert again.customer is None
    assert len(tx.messages) == 1


def test_known_identity_resolves_customer_and_attaches_new_ones(tx: MemoryTx) -> None:
    first = place(tx, msg("1", PHONE, name="Ada"), POLICY, now=T0).placement
    second = place(tx, msg("2", PHONE, EMAIL, name="Someone else"), POLICY, now=T0)

    assert second.placement.customer_id == first.customer_id
    assert second.customer is not None
    assert second.customer.display_name == "Ada"
    assert set(second.customer.identities) == {PHONE, EMAIL}


def test_display_name_is_filled_when_missing(tx: MemoryTx) -> None:
    place(tx, msg("1", PHONE), POLICY, now=T0)
    second = place(tx, msg("2", PHONE, name="Ada"), POLICY, now=T0)

    assert second.customer is not None
    assert second.customer.display_name == "Ada"


def test_claimed_identity_becomes_verified_when_proved(tx: MemoryTx) -> None:
    claimed = Identity(kind="email", value="ada@example.com", verified=False)
    place(tx, msg("1", claimed), POLICY, now=T0)
    second = place(tx, msg("2", EMAIL), POLICY, now=T0)

    assert second.customer is not None
    assert second.customer.identities == (EMAIL,)


def test_identities_of_two_customers_are_not_merged_here(tx: MemoryTx) -> None:
    a = place(tx, msg("1", EMAIL), POLICY, now=T0).placement
    b = place(tx, msg("2", PHONE), POLICY, now=T0).placement
    both = place(tx, msg("3", EMAIL, PHONE), POLICY, now=T0).placement

    assert a.customer_id != b.customer_id
    assert both.customer_id == a.customer_id
    assert tx.identities[("acme", "phone", PHONE.value)].customer_id == b.customer_id


def test_window_decides_between_same_and_new_thread(tx: MemoryTx) -> None:
    first = place(tx, msg("1", EMAIL), POLICY, now=T0).placement
    inside = place(tx, msg("2", EMAIL), POLICY, now=T0 + timedelta(seconds=3600)).placement
    # The window counts from the last activity, which the second message moved.
    still = place(tx, msg("3", EMAIL), POLICY, now=T0 + timedelta(seconds=7000)).placement
    outside = place(tx, msg("4", EMAIL), POLICY, now=T0 + timedelta(seconds=7000 + 3601)).placement

    assert (inside.thread_id, inside.sequence, inside.is_new_thread) == (first.thread_id, 2, False)
    assert (still.thread_id, still.sequence) == (first.thread_id, 3)
    assert (outside.sequence, outside.is_new_thread) == (1, True)
    assert outside.thread_id != first.thread_id
    assert [t.number for t in tx.threads.values()] == [1, 2]


def test_closed_thread_is_not_joined(tx: MemoryTx) -> None:
    first = place(tx, msg("1", EMAIL), POLICY, now=T0).placement
    tx.threads[first.thread_id] = dataclasses.replace(tx.threads[first.thread_id], open=False)

    second = place(tx, msg("2", EMAIL), POLICY, now=T0).placement

    assert second.thread_id != first.thread_id


def test_message_without_identities_gets_its_own_customer(tx: MemoryTx) -> None:
    a = place(tx, msg("1"), POLICY, now=T0).placement
    b = place(tx, msg("2"), POLICY, now=T0).placement

    assert a.customer_id != b.customer_id


def test_new_ids_are_prefixed_and_time_ordered() -> None:
    ids = [new_id("thr") for _ in range(100)]

    assert ids == sorted(ids)
    assert all(i.startswith("thr_") and len(i) == 36 for i in ids)
