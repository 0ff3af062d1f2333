"""PostgreSQL store: what only a shared store has to get right (several handles on one database).

Each handle stands for one gateway instance; the contract suite covers the single-store behaviour.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from storekit import POLICY, build_event, envelope, message, outbox_settings, store_settings

from gateway.errors import BacklogFull
from gateway.model import CanonicalMessage, Identity, Placement
from gateway.store.postgres import MIGRATIONS, PostgresStore
from tests.support.postgres import admin_dsn, fresh_database, require_postgres

pytestmark = pytest.mark.integration

MakeStore = Callable[..., PostgresStore]


@pytest.fixture
def dsn() -> Iterator[str]:
    admin = admin_dsn()
    require_postgres(admin)
    with fresh_database(admin) as database:
        yield database


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
