"""The SQLite writer's hot rows (gateway.store.hotrows): a placement never acts on a row that is gone."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import random
import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from storekit import (
    POLICY,
    Clock,
    broken_builder,
    build_event,
    envelope,
    message,
    outbox_settings,
    store_settings,
)
from test_postgres_round_trips import _scenario

from core.events import Event
from core.model import CanonicalMessage, Placement
from dedupe.tx import RECENT_TEXTS_KEPT, CustomerRecord, RecentText
from gateway.store.engine import Connection, SqlTx
from gateway.store.hotrows import HotRows, HotTx, _Customer, text_weight
from gateway.store.sqlite import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await instance.open()
    yield instance
    await instance.close()


async def accept(store: SQLiteStore, *messages: CanonicalMessage) -> list[Placement]:
    policies = [POLICY] * len(messages)
    return await store.accept(envelope(), messages, policies=policies, build_event=build_event)


def owner_of(path: Path, email: str) -> str | None:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT i.customer_id FROM identities i JOIN customers c ON c.id = i.customer_id"
            " WHERE i.kind = 'email' AND i.value = ?",
            (email,),
        ).fetchone()
        return row[0] if row else None
    finally:
        conn.close()


async def test_a_job_rolled_back_in_the_middle_of_a_batch_leaves_nothing_in_memory(
    store: SQLiteStore, tmp_path: Path
) -> None:
    (known,) = await accept(store, message("m0", email="bob@example.com"))
    store.gather_next_batch(4)
    results = await asyncio.gather(
        accept(store, message("m1", email="bob@example.com")),
        # Creates a customer, its identity and a thread, and advances bob's thread; rolled back.
        store.accept(
            envelope(b"broken"),
            [message("m2", email="carol@example.com")],
            policies=[POLICY],
            build_event=broken_builder,
        ),
        accept(store, message("m3", email="carol@example.com")),
        accept(store, message("m4", email="bob@example.com")),
        return_exceptions=True,
    )

    assert isinstance(results[1], RuntimeError)
    first, carol, second = (r[0] for n, r in enumerate(results) if n != 1 and isinstance(r, list))
    assert owner_of(tmp_path / "tg.db", "carol@example.com") == carol.customer_id
    assert carol.is_new_thread
    assert carol.sequence == 1
    assert first.thread_id == second.thread_id == known.thread_id
    assert [first.sequence, second.sequence] == [2, 3]


async def test_thread_numbers_stay_consecutive_through_rollbacks_and_other_writers(
    store: SQLiteStore, tmp_path: Path
) -> None:
    # The writer keeps each tenant's next thread number in memory; a rolled-back placement and a
    # thread numbered by another process must not make it skip or repeat a number.
    (first,) = await accept(store, message("m1", email="a@example.com"))
    with pytest.raises(RuntimeError):
        await store.accept(
            envelope(b"broken"), [message("m2", email="b@example.com")], policies=[POLICY],
            build_event=broken_builder,
        )  # fmt: skip
    (second,) = await accept(store, message("m3", email="c@example.com"))
    conn = sqlite3.connect(tmp_path / "tg.db")
    with conn:  # another process numbers a thread of its own
        conn.execute(
            "INSERT INTO threads (id, tenant, inbox, customer_id, subject, status, number, last_activity,"
            " created_at) VALUES ('thr_other', 'acme', 'support', ?, NULL, 'closed', 3, 0, 0)",
            (first.customer_id,),
        )
        conn.execute("UPDATE tenant_counters SET next_thread_number = 4 WHERE tenant = 'acme'")
    conn.close()
    (third,) = await accept(store, message("m4", email="d@example.com"))

    assert [first.thread_number, second.thread_number, third.thread_number] == [1, 2, 4]


async def test_an_erasure_by_another_process_is_seen_by_the_next_placement(
    store: SQLiteStore, tmp_path: Path
) -> None:
    (first,) = await accept(store, message("m1"))
    # `ticketgate customer erase` opens a store of its own on the same file.
    cli = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await cli.open()
    try:
        assert await cli.erase_customer(first.customer_id, requested_by="test") is not None
    finally:
        await cli.close()

    (second,) = await accept(store, message("m2"))

    assert second.customer_id != first.customer_id
    assert second.is_new_thread
    assert owner_of(tmp_path / "tg.db", "ada@example.com") == second.customer_id


async def test_an_erasure_by_the_gateway_itself_is_seen_by_the_next_placement(
    store: SQLiteStore, tmp_path: Path
) -> None:
    (first,) = await accept(store, message("m1"))
    assert await store.erase_customer(first.customer_id, requested_by="test") is not None

    (second,) = await accept(store, message("m2"))

    assert second.customer_id != first.customer_id
    assert owner_of(tmp_path / "tg.db", "ada@example.com") == second.customer_id


async def test_a_store_job_writing_rows_with_sql_of_its_own_is_seen_by_the_next_placement(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """Erasure and retention write these tables with their own SQL on the writer (no other
    connection notices); whatever the writer knew before such a job is forgotten."""
    (first,) = await accept(store, message("m1"))

    def unlink(conn: Connection) -> None:
        conn.execute("DELETE FROM identities WHERE customer_id = ?", (first.customer_id,))

    await store._write(unlink)
    (second,) = await accept(store, message("m2"))

    assert second.customer_id != first.customer_id
    assert owner_of(tmp_path / "tg.db", "ada@example.com") == second.customer_id


async def test_a_readiness_probe_leaves_the_rows_kept_in_memory(store: SQLiteStore) -> None:
    # /ready writes a counter every few seconds; the writer must not read every customer back.
    await accept(store, message("m1"))
    forgotten = store._hot.forgotten

    await store.ping()
    (second,) = await accept(store, message("m2"))

    assert store._hot.forgotten == forgotten
    assert second.sequence == 2


async def test_a_connection_that_commits_nothing_leaves_the_rows_kept_in_memory(store: SQLiteStore) -> None:
    # Only another connection's commit makes the writer forget (PRAGMA data_version). reclaim_space
    # connects, finds no free page and commits nothing, as the checkpointer does when it starts.
    await store.reclaim_space(2**31 - 1)  # the pages the migrations freed
    await accept(store, message("m1"))
    forgotten = store._hot.forgotten

    assert await store.reclaim_space(100) == 0
    (second,) = await accept(store, message("m2"))

    assert store._hot.forgotten == forgotten
    assert second.sequence == 2


async def test_a_job_writing_no_kept_table_leaves_the_rows_kept_in_memory(store: SQLiteStore) -> None:
    # The reply dispatcher claims due replies every second; its job writes the replies table only.
    await accept(store, message("m1"))
    forgotten = store._hot.forgotten

    assert await store.reply_claim(datetime.now(UTC), 10, 30.0, "test/lease") == []
    await store.state_put("imap/watermark", b"42")
    (second,) = await accept(store, message("m2"))

    assert store._hot.forgotten == forgotten
    assert second.sequence == 2


@pytest.mark.parametrize(
    "write",
    [
        lambda conn: conn.execute("UPDATE customers SET display_name = 'Eve'"),
        lambda conn: conn.cursor().executemany(
            "UPDATE threads SET status = ? WHERE status = 'open'", [("closed",), ("closed",)]
        ),
        lambda conn: conn.total_changes,  # not a statement: taken as a write
    ],
    ids=["execute", "executemany", "other"],
)
async def test_a_job_writing_a_kept_table_by_any_way_is_seen_by_the_next_placement(
    store: SQLiteStore, write: Callable[[Connection], Any]
) -> None:
    await accept(store, message("m1"))
    await store.state_put("imap/watermark", b"42")  # its statement is known not to write one
    forgotten = store._hot.forgotten

    await store._write(write)
    await accept(store, message("m2"))

    assert store._hot.forgotten == forgotten + 1


async def test_a_thread_closed_by_a_desk_is_not_joined_again(store: SQLiteStore) -> None:
    (first,) = await accept(store, message("m1"))

    def close(tx: SqlTx, now: datetime) -> tuple[bool, list[Event]]:
        return tx.set_thread_status(first.thread_id, open=False, at=now), []

    assert await store.transact(close)
    (second,) = await accept(store, message("m2"))

    assert second.is_new_thread
    assert second.thread_id != first.thread_id
    assert second.previous_thread_id == first.thread_id


async def test_a_thread_advanced_in_memory_keeps_what_it_continues(store: SQLiteStore) -> None:
    # The writer's copy of a thread gets a new last_activity per message; nothing else may change.
    (first,) = await accept(store, message("m1"))

    def close(tx: SqlTx, now: datetime) -> tuple[bool, list[Event]]:
        return tx.set_thread_status(first.thread_id, open=False, at=now), []

    assert await store.transact(close)
    second, third, fourth = [(await accept(store, message(f"m{n}")))[0] for n in (2, 3, 4)]

    assert second.is_new_thread
    assert second.previous_thread_id == first.thread_id
    for later in (third, fourth):
        assert later.thread_id == second.thread_id
        assert (later.previous_thread_id, later.thread_number) == (first.thread_id, second.thread_number)
    threads = [orjson.loads(e.body)["thread"] for e in await store.outbox_fetch(10)][1:]
    assert [t["previous_id"] for t in threads] == [first.thread_id] * 3
    assert [t["subject"] for t in threads] == ["Order 1234 is late"] * 3
    assert [t["sequence"] for t in threads] == [1, 2, 3]


async def test_the_event_names_every_identity_of_the_customer_oldest_first(store: SQLiteStore) -> None:
    await accept(store, message("m1", phone="+41 44 668 18 00"))
    await store.close()
    await store.open()  # nothing in memory: the identities are read back
    (placed,) = await accept(store, message("m2", email="ada@example.com"))
    await accept(store, message("m3", email="ada@example.com", phone="+41 44 668 18 01"))

    events = [orjson.loads(e.body) for e in await store.outbox_fetch(10)]
    identities = [[(i["kind"], i["value"]) for i in e["customer"]["identities"]] for e in events]
    assert identities[1] == identities[0] == [("email", "ada@example.com"), ("phone", "+41446681800")]
    assert identities[2] == [*identities[0], ("phone", "+41446681801")]
    assert placed.sequence == 2


def test_the_rows_kept_are_bounded_least_recently_used_first() -> None:
    hot = HotRows(2)
    for name in ("a", "b", "c"):
        hot.add(
            _Customer(
                record=CustomerRecord(id=name, tenant="t", display_name=None),
                identities={("t", "email", f"{name}@example.com"): (0, True)},
                threads={},
            )
        )
        if name == "b":
            assert hot.get("a") is not None  # b is now the least recently used

    assert len(hot) == 2
    assert hot.get("b") is None
    assert hot.owner(("t", "email", "b@example.com")) is None
    assert hot.owner(("t", "email", "a@example.com")) is not None


# Tx methods that write no customer, identity, thread, recent text or tenant counter row, or only read them
# (HotTx answers the hot reads it overrides; the rest read the database).
_NO_HOT_WRITES = {
    "claim_key",
    "complete_claim",
    "lock_identities",
    "lock_customers",
    "holds_customers",
    "prefetch_identities",
    "thread_reads",  # through recent_texts, open_threads and customer_identities
    "get_customer",  # through find_customer
    "add_merge",
    "get_merge",
    "mark_merge_undone",
    "customer_merges",
    "add_claimed_link",
    "claimed_links",
    "find_open_thread",
    "get_thread",
    "find_successor",
    "find_thread_by_number",
    "find_thread_by_rfc822",
    "find_thread_by_key",
    "add_thread_key",
    "add_message",
}


def test_every_tx_write_of_a_hot_row_keeps_the_rows_current_or_forgets_them() -> None:
    public = {name for name, _ in inspect.getmembers(SqlTx, inspect.isfunction) if not name.startswith("_")}
    overridden = {name for name in public if name in HotTx.__dict__}
    # A new Tx method must be sorted into one of the two sets: does it write a row HotTx keeps?
    assert public - overridden == _NO_HOT_WRITES



async def test_a_key_repeated_within_one_envelope_is_placed_once(store: SQLiteStore) -> None:
    # On SQLite the key's row is written when its placement completes: the repeat must see it.
    first, repeat = await accept(store, message("m1"), message("m1"))

    assert not first.duplicate
    assert repeat.duplicate
    assert (repeat.thread_id, repeat.sequence) == (first.thread_id, first.sequence)
    assert len(await store.outbox_fetch(10)) == 1


async def test_recent_texts_kept_in_memory_answer_and_cap_as_the_table_does(
    store: SQLiteStore, tmp_path: Path
) -> None:
    (placed,) = await accept(store, message("m1"))
    customer = placed.customer_id
    rng = random.Random(11)
    start = datetime.now(UTC) + timedelta(days=1)  # after the placed message's own text
    texts = [
        RecentText(
            customer_id=customer,
            message_id=f"m{i:04}",
            thread_id=placed.thread_id,
            channel=rng.choice(("email",) * 8 + ("chat", "form")),
            text=f"text {i}",
            # Some share a moment: the order is then by message id, as in SQL.
            at=start + timedelta(seconds=i // 3),
        )
        for i in range(300)
    ]

    def found(tx: SqlTx) -> dict[str, list[str]]:
        return {
            c: [t.message_id for t in tx.recent_texts(customer, start, not_channel=c)]
            for c in ("email", "chat", "form", "sms")
        }

    def add_and_find(tx: SqlTx, now: datetime) -> tuple[dict[str, list[str]], list[Event]]:
        assert tx.find_customer(customer) is not None
        for text in texts:
            tx.add_recent_text(text)
        return found(tx), []

    in_memory = await store.transact(add_and_find)
    # The transact forgot the rows: this reads the table.
    from_table = await store.transact(lambda tx, now: (found(tx), []))

    newest_first = sorted(texts, key=lambda t: (t.at, t.message_id), reverse=True)
    for channel in ("email", "chat", "form", "sms"):
        expected = [t.message_id for t in newest_first if t.channel != channel][:RECENT_TEXTS_KEPT]
        assert in_memory[channel] == from_table[channel] == expected
    conn = sqlite3.connect(tmp_path / "tg.db")
    try:
        kept = dict(conn.execute("SELECT channel, count(*) FROM recent_texts GROUP BY channel").fetchall())
    finally:
        conn.close()
    # The newest RECENT_TEXTS_KEPT, and those of the same moment as the last of them.
    emails = [t.at for t in newest_first if t.channel == "email"]
    assert kept["email"] == sum(1 for at in emails if at >= emails[RECENT_TEXTS_KEPT - 1]) < len(emails)


async def test_the_recent_text_sweep_forgets_only_the_texts(store: SQLiteStore) -> None:
    """The sweep runs every minute: the writer keeps the customers it knows, and a text the sweep
    deleted is not found in memory afterwards (it would mark a new message a duplicate)."""
    text = "My parcel 88231 never arrived and the tracking page has not moved since Monday."
    (first,) = await accept(store, message("m1", channel="form", text=text))
    forgotten = store._hot.forgotten

    swept = await store.purge_recent_texts(datetime.now(UTC) + timedelta(days=1))
    (again,) = await accept(store, message("m2", channel="email", text=text))

    assert swept == 1
    assert again.customer_id == first.customer_id
    assert again.duplicate_of is None
    assert store._hot.forgotten == forgotten
    assert len(store._hot) == 1


async def test_without_a_sweep_the_same_text_on_another_channel_is_a_duplicate(store: SQLiteStore) -> None:
    # The counterpart of the test above: what it checks is not absent by accident.
    text = "My parcel 88231 never arrived and the tracking page has not moved since Monday."
    (first,) = await accept(store, message("m1", channel="form", text=text))
    (again,) = await accept(store, message("m2", channel="email", text=text))

    assert again.duplicate_of == first.message_id


def _chars_kept(hot: HotRows) -> int:
    return sum(text_weight(t[4]) for entry in hot._customers.values() for t in entry.texts or ())


async def test_the_texts_kept_are_bounded_in_characters_least_recently_used_first(store: SQLiteStore) -> None:
    """A text is up to 2,000 characters: past the budget, the texts of the customers used least
    recently go (read from the table again when needed); their duplicates are still found."""
    store._hot = HotRows(100, text_chars=400)
    text = "The parcel for order {} never arrived and the tracking page has not moved since Monday."
    placed = [
        (await accept(store, message(f"m{n}", email=f"c{n}@example.com", text=text.format(n))))[0]
        for n in range(4)
    ]
    kept = {c: e.texts is not None for c, e in store._hot._customers.items()}

    assert store._hot.text_chars == _chars_kept(store._hot) <= 400
    assert [kept[p.customer_id] for p in placed] == [False, False, True, True]
    # The first customer's text is no longer in memory, and still makes a repeat a duplicate.
    repeat = message("m9", email="c0@example.com", channel="email", text=text.format(0))
    (again,) = await accept(store, repeat)
    assert again.duplicate_of == placed[0].message_id
    assert store._hot.text_chars == _chars_kept(store._hot) <= 400


async def test_the_characters_counted_match_the_texts_kept_through_caps_and_drops(store: SQLiteStore) -> None:
    store._hot = HotRows(2, text_chars=1_000_000)
    (placed,) = await accept(store, message("m1"))
    start = datetime.now(UTC) + timedelta(days=1)
    counted: list[tuple[int, int]] = []

    def add(tx: SqlTx, now: datetime) -> tuple[None, list[Event]]:
        assert tx.find_customer(placed.customer_id) is not None
        for i in range(RECENT_TEXTS_KEPT + 30):  # the cap deletes the oldest of the channel
            tx.add_recent_text(
                RecentText(
                    customer_id=placed.customer_id, message_id=f"t{i:04}", thread_id=placed.thread_id,
                    channel="email", text="x" * (i % 7 + 1), at=start + timedelta(seconds=i),
                )
            )
            counted.append((store._hot.text_chars, _chars_kept(store._hot)))
        return None, []

    await store.transact(add)
    # Three customers with texts through a bound of 2: the first is dropped with its texts.
    text = "My parcel {} never arrived and the tracking page has not moved since Monday."
    first, *_ = [
        (await accept(store, message(f"n{n}", email=f"d{n}@example.com", text=text.format(n))))[0]
        for n in range(3)
    ]

    assert all(a == b for a, b in counted)
    assert counted[-1][0] > 0
    assert first.customer_id not in store._hot._customers
    normalised = text.format(0).lower().replace(".", "")
    assert store._hot.text_chars == _chars_kept(store._hot) == 2 * text_weight(normalised)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_placements_answered_from_memory_equal_those_read_from_the_database(
    seed: int, tmp_path: Path
) -> None:
    # The seeded scenarios of the PostgreSQL comparison (merges, links, retries, touchpoints, late
    # names), with a desk closing a thread midway: once as they run, once with the writer made to
    # forget what it keeps before every batch, so every first read of a batch goes to the database.
    outcomes = []
    for forget in (False, True):
        clock = Clock()
        store = SQLiteStore(store_settings(tmp_path / str(forget)), outbox_settings(), clock=clock)
        await store.open()
        try:
            placed: list[Placement] = []
            for number, batch in enumerate(_scenario(seed)):
                if forget:  # a desk's status change forgets everything first (HotTx)
                    forgotten = store._hot.forgotten
                    assert not await store.transact(functools.partial(_reopen, "thr_unknown"))
                    assert store._hot.forgotten == forgotten + (number > 0)
                if number == 6:
                    close = functools.partial(_close, placed[0].thread_id)
                    assert await store.transact(close)
                placed += [p for (p,) in await asyncio.gather(*(accept(store, m) for m in batch))]
                await store.ping()
                clock.advance(400)
            bodies = [orjson.loads(row.body) for row in await store.outbox_fetch(1000)]
        finally:
            await store.close()
        for body in bodies:
            del body["event_id"], body["occurred_at"]
        outcomes.append(_by_first_appearance([[dataclasses.asdict(p) for p in placed], bodies]))

    assert outcomes[0] == outcomes[1]


def _by_first_appearance(value: Any, names: dict[str, str] | None = None) -> Any:
    """``value`` with generated ids (time-ordered, so different in every run) named by their order."""
    names = {} if names is None else names
    if isinstance(value, str) and value[:4] in ("cus_", "thr_", "mrg_", "lnk_"):
        return names.setdefault(value, f"{value[:3]}{len(names)}")
    if isinstance(value, dict):
        return {k: _by_first_appearance(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_by_first_appearance(v, names) for v in value]
    return value


def _close(thread_id: str, tx: SqlTx, now: datetime) -> tuple[bool, list[Event]]:
    return tx.set_thread_status(thread_id, open=False, at=now), []


def _reopen(thread_id: str, tx: SqlTx, now: datetime) -> tuple[bool, list[Event]]:
    return tx.set_thread_status(thread_id, open=True, at=now), []
