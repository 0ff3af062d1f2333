"""PostgreSQL store: how many statements and round trips a placement costs, counted on the wire, and
that what the group of placements locked first is used without changing any placement.

A group begins with one round trip: its locks, the owners of its messages' identities and all of
their identities, and which of its idempotency keys exist. Then a placement of a known customer
waits once, for the customer's recent texts + open threads (their rows locked, with their
sequences); a first message waits for nothing but its tenant's thread number, and only the
group's first new thread reads that. The writes go with the next read, and the group adds one
wait, its commit.

Each fold removed adds a statement or a round trip: a savepoint of its own and a sync at its end
(jobs run together unless one fails), the claim and the lookup of identities (read with the
group's locks), the job's own identity lock (the group holds it), the customer lock and the re-read
of the identities (the group locked the customer before the job read anything), the customer row
(read as the group locked it), the three thread reads one after another, a thread's sequence or a
tenant's thread number read back, a wait for the BEGIN or syncs around the COMMIT.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from storekit import POLICY, T0, Clock, build_event, envelope, outbox_settings, store_settings

from core.errors import StoreError
from core.model import CanonicalMessage, Identity, Placement
from gateway.store.base import Store
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore
from tests.support.pgwire import PgWireRecorder, Sent

pytestmark = pytest.mark.integration

# A placement's first statement: it archives the envelope's raw bytes.
JOB_START = "INSERT INTO raw_archive"
# What a group adds after its last job.
GROUP_END = ("UPDATE outbox_backlog", "COMMIT")


@pytest.fixture
async def wire(dsn: str) -> AsyncIterator[PgWireRecorder]:
    proxy = await PgWireRecorder(dsn).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def store(wire: PgWireRecorder, tmp_path: Path) -> AsyncIterator[PostgresStore]:
    instance = PostgresStore(
        store_settings(tmp_path, backend="postgresql", dsn=wire.dsn()), outbox_settings()
    )
    await instance.open()
    yield instance
    await instance.close()


def _message(external_id: str, *identities: Identity, text: str, channel: str = "form") -> CanonicalMessage:
    return CanonicalMessage(
        channel=channel,
        tenant="acme",
        inbox="support",
        external_id=external_id,
        received_at=T0,
        identities=identities,
        display_name="Ada",
        subject="Order 1234 is late",
        text=text,
    )


ADA = Identity(kind="email", value="ada@example.com", verified=True)


async def accept(store: Store, *messages: CanonicalMessage) -> list[Placement]:
    return await store.accept(
        envelope(), messages, policies=[POLICY] * len(messages), build_event=build_event
    )


def jobs(wire: PgWireRecorder) -> list[list[Sent]]:
    """The jobs of the one group transaction recorded: each from its first statement to the next
    job's, or to what the group sends after its jobs."""
    found: list[list[Sent]] = []
    for message in group_transaction(wire):
        if message.kind in "EQ" and message.sql.startswith(GROUP_END):
            break
        if message.kind == "E" and JOB_START in message.sql:
            found.append([])
        if found:
            found[-1].append(message)
    return found


def group_transaction(wire: PgWireRecorder) -> list[Sent]:
    """The one group transaction recorded: from its BEGIN to the waits after its COMMIT."""
    (sent,) = [s.sent for s in wire.sessions if any(m.kind == "E" and m.sql == "BEGIN" for m in s.sent)]
    begin = next(n for n, m in enumerate(sent) if m.kind == "E" and m.sql == "BEGIN")
    end = next(n for n, m in enumerate(sent) if m.kind == "E" and m.sql == "COMMIT")
    while end + 1 < len(sent) and sent[end + 1].kind in "SH":
        end += 1
    return sent[begin : end + 1]


def customer_lock(sent: Sent) -> bool:
    return "FROM customers" in sent.sql and "FOR UPDATE" in sent.sql


def listing(job: list[Sent]) -> str:
    return "\n".join(f"{m.kind} {' '.join(m.sql.split())[:100]}" for m in job)


def statements(job: list[Sent]) -> int:
    return sum(m.kind in "EQ" for m in job)


def round_trips(sent: list[Sent]) -> int:
    """Waits: every Sync, Flush or Query, but a Flush right after a Sync (psycopg ends a pipeline
    by sending both, then waits once)."""
    return sum(
        m.kind in "SHQ" and not (m.kind == "H" and n and sent[n - 1].kind == "S") for n, m in enumerate(sent)
    )


async def test_a_known_customers_placement_makes_one_round_trip(
    store: PostgresStore, wire: PgWireRecorder
) -> None:
    (first,) = await accept(store, _message("m1", ADA, text="Where is my order? It is late."))
    wire.forget()

    (second,) = await accept(store, _message("m2", ADA, text="And where is my refund, please?"))

    (job,) = jobs(wire)
    assert (second.customer_id, second.thread_id, second.sequence) == (first.customer_id, first.thread_id, 2)
    # Before: 14 statements, 9 round trips (claim, lock + identities, customer lock + identities
    # again, customer, recent texts, open threads, sequence, identities, sync), then 9 and 4 with
    # the sync and its savepoint's two statements around them; the raw bytes now go with the
    # claim's lookup, the recent text with the rest of the tail, and the thread's sequence is
    # read (its row locked) with the open threads, not read back from its update; the claim, the
    # lookup and the customer's identities (for the event) go with the group's locks.
    assert (statements(job), round_trips(job)) == (3, 1), listing(job)
    assert not any("pg_advisory_xact_lock" in m.sql or customer_lock(m) for m in job), listing(job)
    assert sum("FOR UPDATE" in m.sql for m in job) == 1, listing(job)  # the open threads
    # The group around it: locks, the identities' owners, the keys and the backlog read in one
    # round trip; BEGIN waits for nothing, and the COMMIT is the one more wait (before: 22
    # statements, 12 round trips; then 17 and 5).
    group = group_transaction(wire)
    assert (statements(group), round_trips(group)) == (10, 3), listing(group)


async def test_a_first_message_makes_one_round_trip(store: PostgresStore, wire: PgWireRecorder) -> None:
    (placed,) = await accept(store, _message("f1", ADA, text="Where is my order? It is late."))

    (job,) = jobs(wire)
    assert (placed.is_new_thread, placed.sequence) == (True, 1)
    # Claim + identities, the thread's number: the new thread's first sequence is known
    # without reading it back, and the thread is inserted as advanced. Before: 10 statements, 5
    # round trips, the group 18 and 8; then 8 and 3 with the job's sync, the group 16 and 4; the
    # new customer's rows now go with the thread number's upsert, and the claim and the lookup
    # with the group's locks.
    assert (statements(job), round_trips(job)) == (2, 1), listing(job)
    group = group_transaction(wire)
    assert (statements(group), round_trips(group)) == (9, 3), listing(group)

    # Later messages of the thread, in the same envelope (one job, one Tx) and after it.
    batch = await accept(store, *(_message(f"f{n}", ADA, text=f"Message number {n}.") for n in (2, 3)))
    (later,) = await accept(store, _message("f4", ADA, text="And one more."))
    assert [p.sequence for p in [*batch, later]] == [2, 3, 4]
    assert {p.thread_id for p in [*batch, later]} == {placed.thread_id}


async def test_a_groups_first_new_thread_reads_the_tenants_thread_number_and_the_others_count_on(
    store: PostgresStore, wire: PgWireRecorder
) -> None:
    people = [Identity(kind="email", value=f"p{n}@example.com", verified=True) for n in range(4)]

    placed = await asyncio.gather(
        *(accept(store, _message(f"n{n}", who, text=f"Hello from {n}.")) for n, who in enumerate(people))
    )

    assert all(p.is_new_thread for (p,) in placed)
    # The first job reads the number (the counter row stays locked to the commit); the others
    # add to it unread, and wait for nothing.
    assert [round_trips(job) for job in jobs(wire)] == [1, 0, 0, 0]
    await accept(store, _message("n9", ADA, text="And a fifth customer."))  # the next group reads it
    numbers = [orjson.loads(row.body)["thread"]["number"] for row in await store.outbox_fetch(10)]
    assert numbers == [1, 2, 3, 4, 5]


async def test_after_a_job_rolled_back_the_thread_number_is_read_again(store: PostgresStore) -> None:
    def takes_a_number_and_fails(conn: Any) -> None:
        store._tx(conn).next_thread_number("acme")
        raise RuntimeError("failed after taking a thread number")

    # One group; run again isolated for the failing job: the first job reads the number, the
    # second takes the next one and is rolled back (its count with it), the third reads again.
    people = [Identity(kind="email", value=f"q{n}@example.com", verified=True) for n in range(3)]
    first, failed, third = await asyncio.gather(
        accept(store, _message("q0", people[0], text="First.")),
        store._write_placement(takes_a_number_and_fails, ()),
        accept(store, _message("q2", people[2], text="Third.")),
        return_exceptions=True,
    )
    assert isinstance(failed, RuntimeError)
    assert isinstance(first, list)
    assert isinstance(third, list)
    await accept(store, _message("q3", people[1], text="Later."))

    numbers = [orjson.loads(row.body)["thread"]["number"] for row in await store.outbox_fetch(10)]
    assert numbers == [1, 2, 3]


def begins(wire: PgWireRecorder) -> int:
    """Group transactions begun (a group that runs again begins again)."""
    return sum(m.kind == "E" and m.sql == "BEGIN" for session in wire.sessions for m in session.sent)


async def test_what_an_earlier_job_of_the_group_changed_is_read_again_not_taken_as_the_group_read_it(
    store: PostgresStore, wire: PgWireRecorder
) -> None:
    message = _message("d1", ADA, text="A first message of a new customer.")
    # One group: the first job claims the key and adds the identity the others look up; the group
    # read neither. Read as the group read them, the second claim and the third job's new
    # customer would fail on the unique keys, and the group run again isolated.
    first, again, other = await asyncio.gather(
        accept(store, message),
        accept(store, message),
        accept(store, _message("d2", ADA, text="Another message, same customer.")),
    )

    assert begins(wire) == 1
    assert again[0].duplicate
    assert again[0].thread_id == first[0].thread_id
    assert (other[0].customer_id, other[0].sequence) == (first[0].customer_id, 2)


async def test_an_identity_an_earlier_job_of_the_group_added_is_in_the_next_jobs_event(
    store: PostgresStore,
) -> None:
    await accept(store, _message("a1", ADA, text="A first message."))
    phone = Identity(kind="phone", value="+41790000001", verified=True)

    # One group: the group reads Ada's identities with its locks; the first job adds her phone.
    await asyncio.gather(
        accept(store, _message("a2", ADA, phone, text="With my phone number this time.")),
        accept(store, _message("a3", ADA, text="And one more.")),
    )

    bodies = [orjson.loads(row.body) for row in await store.outbox_fetch(10)]
    assert [[i["kind"] for i in b["customer"]["identities"]] for b in bodies] == [
        ["email"],
        ["email", "phone"],
        ["email", "phone"],
    ]


async def test_a_key_another_instance_claims_after_the_group_began_runs_the_group_again_isolated(
    store: PostgresStore, wire: PgWireRecorder, dsn: str
) -> None:
    message = _message("o1", ADA, text="Also delivered to another instance.")

    def another_instance_claims(conn: Any) -> None:
        with psycopg.connect(dsn, autocommit=True) as elsewhere:
            elsewhere.execute(
                "INSERT INTO idempotency_keys (key, message_id, created_at, thread_id, customer_id,"
                " sequence, is_new_thread) VALUES (%s, %s, now(), 'thr_x', 'cus_x', 1, true)"
                " ON CONFLICT DO NOTHING",
                (message.idempotency_key(), message.message_id()),
            )

    _, (placed,) = await asyncio.gather(
        store._write_placement(another_instance_claims, ()), accept(store, message)
    )

    assert begins(wire) == 2
    assert placed.duplicate
    assert (placed.thread_id, placed.customer_id) == ("thr_x", "cus_x")
    assert not await store.outbox_fetch(10)


async def test_a_customer_the_group_did_not_lock_is_locked_and_read_again_by_the_job(
    store: PostgresStore, wire: PgWireRecorder
) -> None:
    # One group: the first job creates the customer, so the group's lock of owners (taken before
    # any job) found none; the second job must lock it itself and read its identities again.
    first, second = await asyncio.gather(
        accept(store, _message("n1", ADA, text="First message of a new customer.")),
        accept(store, _message("n2", ADA, text="Second message, same group.")),
    )

    assert first[0].customer_id == second[0].customer_id
    assert (first[0].thread_id, second[0].thread_id) == (first[0].thread_id, first[0].thread_id)
    assert [first[0].sequence, second[0].sequence] == [1, 2]
    _, known = jobs(wire)
    assert any(customer_lock(m) for m in known), listing(known)
    identity_reads = [m for m in known if "SELECT kind, value, customer_id, verified" in m.sql]
    assert len(identity_reads) == 2, listing(known)


async def test_a_customer_row_a_job_of_the_group_wrote_is_read_again_by_the_next(
    store: PostgresStore,
) -> None:
    # The customer has no name when the group locks it; the first job names it, the second must
    # see that name (not the row as the group locked it), as it would one transaction later.
    nameless = dataclasses.replace(_message("k1", ADA, text="No name given here."), display_name=None)
    await accept(store, nameless)
    named = [
        dataclasses.replace(_message(f"k{n}", ADA, text=f"Message number {n}."), display_name=name)
        for n, name in ((2, "Ada"), (3, "Grace"), (4, None))
    ]

    await asyncio.gather(*(accept(store, m) for m in named))

    bodies = [orjson.loads(row.body) for row in await store.outbox_fetch(10)]
    assert [b["customer"]["display_name"] for b in bodies] == [None, "Ada", "Ada", "Ada"]


# -- the same placements on both stores ------------------------------------------------------------

_TEXTS = [
    "Where is my order 1234? It was due on Monday.",
    "My parcel arrived damaged and the box was open.",
    "Can I change the delivery address for my order?",
    "hello?",
    "Please cancel my subscription at the end of the month.",
]
_CHANNELS = ["form", "email", "chat"]


def _scenario(seed: int) -> list[list[CanonicalMessage]]:
    """Batches of messages from a few people with overlapping identities (some verified, so
    customers merge; some claimed, so links are recorded), repeated texts across channels
    (duplicate touchpoints), retries of the same message, and display names given late."""
    rng = random.Random(seed)
    people = [
        [
            Identity(kind="email", value=f"p{n}@example.com", verified=rng.random() < 0.7),
            Identity(kind="phone", value=f"+4179000000{n}", verified=rng.random() < 0.5),
            Identity(kind="telegram", value=f"{1000 + n}", verified=True),
        ]
        for n in range(5)
    ]
    batches: list[list[CanonicalMessage]] = []
    sent: list[CanonicalMessage] = []
    for b in range(12):
        batch: list[CanonicalMessage] = []
        for n in range(rng.randint(1, 8)):
            if sent and rng.random() < 0.1:
                batch.append(rng.choice(sent))  # a provider retry
                continue
            person = rng.choice(people)
            # Mostly one identity, sometimes two (of one person or, rarely, of two: a merge or a link).
            chosen = rng.sample(person, rng.choice([1, 1, 1, 2]))
            if rng.random() < 0.08:
                chosen.append(rng.choice(rng.choice(people)))
            ids = tuple({i.key(): i for i in chosen}.values())
            message = CanonicalMessage(
                channel=rng.choice(_CHANNELS),
                tenant="acme",
                inbox=rng.choice(["support", "support", "sales"]),
                external_id=f"b{b}m{n}",
                received_at=T0,
                identities=ids,
                display_name=rng.choice([None, "Ada", "Grace"]),
                subject="About my order",
                text=rng.choice(_TEXTS),
            )
            batch.append(message)
            sent.append(message)
        batches.append(batch)
    return batches


async def _run(store: Store, clock: Clock, batches: list[list[CanonicalMessage]]) -> list[Any]:
    """Each batch as concurrent accepts (one group of placements on PostgreSQL); what came out,
    with generated ids replaced by their order of first appearance."""
    outcome: list[Any] = []
    for batch in batches:
        results = await asyncio.gather(*(accept(store, m) for m in batch))
        outcome += [p for (p,) in results]
        clock.advance(400)
    names: dict[str, str] = {}

    def name(value: Any) -> Any:
        if isinstance(value, str) and value[:4] in ("cus_", "thr_", "mrg_", "lnk_", "evt_"):
            return names.setdefault(value, f"{value[:3]}{len(names)}")
        if isinstance(value, dict):
            return {k: name(v) for k, v in value.items() if k not in ("event_id", "occurred_at")}
        if isinstance(value, list):
            return [name(v) for v in value]
        return value

    placed = [name(dataclasses.asdict(p)) for p in outcome]
    events = [name(orjson.loads(row.body)) for row in await store.outbox_fetch(1000)]
    return [placed, events]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_grouped_placements_on_postgresql_come_out_as_on_sqlite(
    seed: int, dsn: str, tmp_path: Path
) -> None:
    batches = _scenario(seed)
    outcomes = []
    for backend in ("sqlite", "postgresql"):
        clock = Clock()
        settings = store_settings(tmp_path / backend, backend=backend, dsn=dsn)
        store: Store = (
            SQLiteStore(settings, outbox_settings(), clock=clock)
            if backend == "sqlite"
            else PostgresStore(settings, outbox_settings(), clock=clock)
        )
        await store.open()
        try:
            outcomes.append(await _run(store, clock, batches))
        finally:
            await store.close()
    sqlite, postgresql = outcomes
    assert len(sqlite[0]) == sum(len(b) for b in batches)
    assert postgresql[0] == sqlite[0]
    assert postgresql[1] == sqlite[1]


async def test_after_a_failing_job_groups_run_their_jobs_isolated_until_one_has_none_failing(
    store: PostgresStore, wire: PgWireRecorder
) -> None:
    def fails(conn: Any) -> None:
        conn.execute("SELECT 1 / 0").fetchone()

    def savepoints() -> int:
        return sum(m.sql == "SAVEPOINT tg_job" for session in wire.sessions for m in session.sent)

    # Run together first; the failure rolls the group back and runs it again, its job isolated.
    ok, failed = await asyncio.gather(
        accept(store, _message("i1", ADA, text="A first message.")),
        store._write_placement(fails, ()),
        return_exceptions=True,
    )
    assert isinstance(ok, list)
    assert isinstance(failed, StoreError)
    assert "division by zero" in str(failed)
    assert savepoints() == 2
    wire.forget()
    # The next group runs isolated (a failure tends to come again: a full outbox); none failing,
    await accept(store, _message("i2", ADA, text="A second message."))
    assert savepoints() == 1
    wire.forget()
    # so the one after runs together again.
    (placed,) = await accept(store, _message("i3", ADA, text="A third message."))
    assert savepoints() == 0
    assert placed.sequence == 3
