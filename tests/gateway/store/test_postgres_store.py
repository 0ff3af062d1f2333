"""PostgreSQL store: what only a shared store has to get right (several handles on one database).

Each handle stands for one gateway instance; the contract suite covers the single-store behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from storekit import POLICY, build_event, envelope, message, outbox_settings, store_settings

from core.errors import BacklogFull, StoreError
from core.events import Event
from core.model import CanonicalMessage, Identity, Placement
from dedupe.tx import RECENT_TEXTS_KEPT, RecentText, Tx
from gateway.publisher import MemoryPublisher
from gateway.relay import OutboxRelay
from gateway.store.postgres import MIGRATIONS, OUTBOX_CHANNEL, PostgresStore, _instance, _stat_start

pytestmark = pytest.mark.integration

MakeStore = Callable[..., PostgresStore]


@pytest.fixture
async def make_store(dsn: str, tmp_path: Path) -> AsyncIterator[MakeStore]:
    made: list[PostgresStore] = []

    def make(**outbox: Any) -> PostgresStore:
        settings = store_settings(tmp_path, backend="postgresql", dsn=dsn)
        store = PostgresStore(settings, outbox_settings(**outbox))
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryPublisher]:
    publisher = MemoryPublisher()
    await publisher.start()
    yield publisher
    await publisher.close()


@pytest.fixture
async def relayed(make_store: MakeStore, bus: MemoryPublisher) -> AsyncIterator[PostgresStore]:
    """An instance whose relay polls only every 30 s; yields another instance to commit through."""
    relaying, other = make_store(), make_store()
    await relaying.open()
    await other.open()
    relay = OutboxRelay(relaying, bus, outbox_settings(poll_interval=30.0))
    await relay.start()
    yield other
    await relay.stop()


async def accept(store: PostgresStore, *messages: CanonicalMessage) -> list[Placement]:
    return await store.accept(
        envelope(), messages, policies=[POLICY] * len(messages), build_event=build_event
    )


async def test_instances_starting_together_migrate_once(make_store: MakeStore, dsn: str) -> None:
    stores = [make_store() for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))

    with psycopg.connect(dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


async def test_recent_texts_keep_only_the_newest_of_each_channel(make_store: MakeStore, dsn: str) -> None:
    store = make_store()
    await store.open()
    start = datetime(2026, 1, 1, tzinfo=UTC)

    def work(tx: Tx, now: datetime) -> tuple[None, list[Event]]:
        for n in range(RECENT_TEXTS_KEPT * 3):
            text = RecentText(
                customer_id="cus_busy",
                message_id=f"m{n:04}",
                thread_id="thr_busy",
                channel="email" if n % 10 else "chat",
                text="the same alert again",
                at=start + timedelta(seconds=n),
            )
            tx.add_recent_text(text)
        return None, []

    await store.transact(work)

    with psycopg.connect(dsn) as conn:
        kept = dict(conn.execute("SELECT channel, count(*) FROM recent_texts GROUP BY channel").fetchall())
        oldest_email = conn.execute("SELECT min(at) FROM recent_texts WHERE channel = 'email'").fetchone()
    assert kept == {"email": RECENT_TEXTS_KEPT, "chat": 15}
    emails = [n for n in range(RECENT_TEXTS_KEPT * 3) if n % 10]
    assert oldest_email == (start + timedelta(seconds=emails[-RECENT_TEXTS_KEPT]),)


async def test_one_customer_through_two_identities_on_two_instances_gets_one_gapless_thread(
    make_store: MakeStore,
) -> None:
    a, b = make_store(), make_store()
    await asyncio.gather(a.open(), b.open())
    (linked,) = await accept(a, message("link", email="ada@example.com", phone="+41790000001"))

    def by_phone(inbox: str, n: int) -> CanonicalMessage:
        return dataclasses.replace(
            message(f"{inbox}-p{n}", inbox=inbox, text=f"phone message {n}"),
            identities=(Identity(kind="phone", value="+41790000001"),),
        )

    # New inboxes: no thread there yet, and in each the messages race to open it under two
    # identities on two instances (several inboxes: several races per run).
    inboxes = [f"billing{i}" for i in range(8)]
    work = [accept(a, message(f"{inbox}-e{n}", inbox=inbox)) for inbox in inboxes for n in range(8)]
    work += [accept(b, by_phone(inbox, n)) for inbox in inboxes for n in range(8)]
    placements = [p for (p,) in await asyncio.gather(*work)]

    assert {p.customer_id for p in placements} == {linked.customer_id}
    threads: dict[str, list[Placement]] = defaultdict(list)
    for placement in placements:
        threads[placement.thread_id].append(placement)
    assert len(threads) == len(inboxes), "two instances opened two threads for one customer"
    for thread in threads.values():
        assert sorted(p.sequence for p in thread) == list(range(1, 17))
        assert sum(p.is_new_thread for p in thread) == 1


async def test_only_the_lease_holder_relays_and_a_standby_takes_over(make_store: MakeStore) -> None:
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    await accept(first, message("m1"))
    await accept(second, message("m2"))

    assert len(await first.outbox_fetch(10)) == 2
    assert first.relay_lease_held
    assert await second.outbox_fetch(10) == []  # standing by: no second relay, no reordering
    assert not second.relay_lease_held

    await first.close()  # the lease goes with its session
    rows = await poll(lambda: second.outbox_fetch(10), within=5.0)
    assert [r.sequence for r in rows] == [1, 2]
    assert second.relay_lease_held


async def test_the_backlog_bound_holds_across_instances(make_store: MakeStore) -> None:
    a, b = make_store(max_backlog=3), make_store(max_backlog=3)
    await a.open()
    await b.open()
    await accept(a, message("m1"))
    await accept(b, message("m2", email="bob@example.com"))
    await accept(a, message("m3"))

    with pytest.raises(BacklogFull):
        await accept(b, message("m4", email="bob@example.com"))

    rows = await a.outbox_fetch(10)
    await b.outbox_mark_published([rows[0].position])  # any instance may mark
    await accept(b, message("m4", email="bob@example.com"))
    assert (await b.outbox_status()).backlog == 3
    with pytest.raises(BacklogFull):
        await accept(a, message("m5"))


async def test_placements_waiting_together_commit_together_and_a_full_outbox_refuses_each_alone(
    make_store: MakeStore, dsn: str
) -> None:
    store = make_store(max_backlog=3)
    await store.open()
    # Queued in one pass of the event loop: one group, in this order.
    outcomes = await asyncio.gather(
        *(accept(store, message(f"m{n}", email=f"c{n}@example.com")) for n in range(5)),
        return_exceptions=True,
    )

    assert [type(o) for o in outcomes] == [list, list, list, BacklogFull, BacklogFull]
    assert (await store.outbox_status()).backlog == 3
    with psycopg.connect(dsn) as conn:
        stored = (
            conn.execute("SELECT count(*) FROM outbox").fetchone(),
            conn.execute("SELECT external_id FROM messages ORDER BY sequence, external_id").fetchall(),
        )
        claimed = conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()
    assert stored == ((3,), [("m0",), ("m1",), ("m2",)])
    assert claimed == (3,)  # the refused placements' claims were rolled back with them


async def test_a_placement_whose_write_fails_in_a_group_is_rolled_back_alone(
    make_store: MakeStore, dsn: str
) -> None:
    store = make_store()
    await store.open()

    def writes(key: str) -> Callable[[Any], int]:
        def job(conn: Any) -> int:
            conn.execute("INSERT INTO state (key, value, updated_at) VALUES (%s, 'x', now())", (key,))
            return int(conn.execute("SELECT txid_current()").fetchone()[0])

        return job

    def fails(conn: Any) -> None:
        conn.execute("INSERT INTO state (key, value, updated_at) VALUES ('second', 'x', now())")
        # Queued, not read: its error comes with the job's last round trip, still the job's own.
        conn.execute("INSERT INTO state (key, value, updated_at) VALUES ('first', 'x', now())")

    first, failed, third = await asyncio.gather(
        store._write_placement(writes("first"), ()),
        store._write_placement(fails, ()),
        store._write_placement(writes("third"), ()),
        return_exceptions=True,
    )

    assert isinstance(failed, StoreError)
    assert "duplicate key" in str(failed)
    assert first == third  # one transaction
    with psycopg.connect(dsn) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM state ORDER BY key")]
    assert keys == ["first", "third"]


async def test_a_group_whose_commit_fails_commits_none_of_its_jobs_and_the_next_group_commits(
    make_store: MakeStore, dsn: str
) -> None:
    # A constraint checked at COMMIT: the group's jobs all succeed, then its commit fails.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE checked_late (n integer UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    store = make_store()
    await store.open()

    def insert(n: int) -> Callable[[Any], int]:
        def job(conn: Any) -> int:
            conn.execute("INSERT INTO checked_late (n) VALUES (%s)", (n,))
            return n

        return job

    outcomes = await asyncio.gather(
        *(store._write_placement(insert(n), ()) for n in (1, 2, 1)), return_exceptions=True
    )
    assert all(isinstance(o, StoreError) and "duplicate key" in str(o) for o in outcomes), outcomes

    assert await store._write_placement(insert(3), ()) == 3
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT n FROM checked_late").fetchall() == [(3,)]


async def test_a_group_picked_as_deadlock_victim_runs_again_whole(make_store: MakeStore, dsn: str) -> None:
    store = make_store()
    await store.open()
    attempts: list[int] = []

    def writes(key: str) -> Callable[[Any], str]:
        def job(conn: Any) -> str:
            conn.execute("INSERT INTO state (key, value, updated_at) VALUES (%s, 'x', now())", (key,))
            return key

        return job

    def victim(conn: Any) -> str:
        attempts.append(1)
        conn.execute("INSERT INTO state (key, value, updated_at) VALUES ('victim', 'x', now())")
        if len(attempts) == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected (as PostgreSQL would say)")
        return "victim"

    placed = await asyncio.gather(
        store._write_placement(writes("before"), ()),
        store._write_placement(victim, ()),
        store._write_placement(writes("after"), ()),
    )

    assert placed == ["before", "victim", "after"]
    assert len(attempts) == 2
    with psycopg.connect(dsn) as conn:
        keys = [k for (k,) in conn.execute("SELECT key FROM state ORDER BY key")]
    assert keys == ["after", "before", "victim"]  # each once: the first attempt was rolled back


async def poll(read: Callable[[], Any], *, within: float, interval: float = 0.05) -> Any:
    """Read until the answer is non-empty: the lease is another session's state, not one of our tasks."""
    deadline = time.monotonic() + within
    while True:
        value = await read()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still empty after {within}s")
        await asyncio.sleep(interval)


async def test_a_commit_on_another_instance_wakes_the_relay_long_before_its_poll(
    relayed: PostgresStore, bus: MemoryPublisher, dsn: str
) -> None:
    await poll(lambda: listeners(dsn), within=5.0)

    for n in range(1, 4):
        await accept(relayed, message(f"m{n}"))
        await published(bus, n, within=2.0)  # the relay's next poll is 30 s away

    assert [m.headers["sequence"] for m in bus.published] == [1, 2, 3]


async def test_a_relay_skips_what_its_own_gateway_signed_which_wakes_it_itself(
    make_store: MakeStore, dsn: str
) -> None:
    store = make_store()
    await store.open()
    woken: asyncio.Queue[None] = asyncio.Queue()
    listening = asyncio.create_task(store.outbox_listen(lambda: woken.put_nowait(None)))
    try:
        await asyncio.wait_for(woken.get(), 5.0)  # listening: woken once for what came before

        def notify(payload: str) -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, payload))

        # The relay runs in a child process of its gateway, which signs its placements' notices.
        await asyncio.to_thread(notify, _instance(os.getppid()))
        await asyncio.to_thread(notify, _instance(os.getpid()))  # another store: this process's
        await asyncio.to_thread(notify, "")  # events other than placements, from anywhere

        await asyncio.wait_for(woken.get(), 5.0)
        await asyncio.wait_for(woken.get(), 5.0)
        assert woken.empty()  # notifications come in order: the first one woke nothing
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening


async def test_placements_alone_are_signed_and_other_events_are_not(make_store: MakeStore, dsn: str) -> None:
    store = make_store()
    await store.open()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"LISTEN {OUTBOX_CHANNEL}")

        def heard() -> list[str]:
            return [n.payload for n in conn.notifies(timeout=5.0, stop_after=1)]

        await accept(store, message("s1"))
        (signed,) = await asyncio.to_thread(heard)
        await store.quarantine(envelope(), "not parseable")
        (unsigned,) = await asyncio.to_thread(heard)
    assert (signed, unsigned) == (_instance(os.getpid()), "")


async def test_a_lost_listen_connection_is_opened_again(
    relayed: PostgresStore, bus: MemoryPublisher, dsn: str
) -> None:
    (first,) = await poll(lambda: listeners(dsn), within=5.0)
    await asyncio.to_thread(terminate_backend, dsn, first)

    # Committed while the listener may be away: it wakes the relay once it listens again.
    await accept(relayed, message("m1"))
    await published(bus, 1, within=2.0)
    (second,) = await poll(lambda: listeners(dsn, besides=first), within=2.0)
    # And the new connection carries notifications.
    await accept(relayed, message("m2"))
    await published(bus, 2, within=2.0)
    assert second != first


async def listeners(dsn: str, *, besides: int | None = None) -> list[int]:
    """Backend pids of the sessions that LISTEN for outbox commits."""

    def read() -> list[int]:
        with psycopg.connect(dsn) as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'ticketgate-listen %%' AND state = 'idle'"
                " AND query LIKE 'LISTEN %%' AND pid <> %s",
                (besides or 0,),
            ).fetchall()
        return [pid for (pid,) in rows]

    return await asyncio.to_thread(read)


def terminate_backend(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
    assert row == (True,)


async def published(bus: MemoryPublisher, count: int, *, within: float) -> None:
    async with asyncio.timeout(within), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)


def test_a_gateways_signature_tells_apart_processes_of_one_name_and_pid() -> None:
    # Replicas given one host name, each pid 1 in its container: the start time tells them apart.
    line = b"1 (ticketgate (run) x) S 0 1 1 0 -1 4194560 1 2 3 4 5 6 7 8 20 0 1 0 470321 1000 20"
    assert _stat_start(line) == "470321"
    assert _stat_start(b"1 (cut short) S 0 1") == ""
    ours = _instance(os.getpid())
    if not ours.split()[-1]:
        pytest.skip("no /proc start times here (not Linux)")
    code = "import os; from gateway.store.postgres import _instance; print(_instance(os.getpid()))"
    later = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
    ).stdout.strip()
    assert int(later.split()[-1]) > int(ours.split()[-1])
    assert ours.split()[2] == later.split()[2]  # one machine, one boot id
