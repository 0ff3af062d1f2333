"""Retention and erasure, on every backend (the ``make_store`` fixture of the store contract)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import test_store_contract as contract
from storekit import T0, Clock, envelope, message, outbox_settings, store_settings

from core.events import Event
from core.media import MediaFetch
from core.model import Attachment, Identity, MediaRef, Placement
from core.settings import RetentionSettings
from dedupe import graph
from dedupe.engine import new_id
from dedupe.tx import Tx
from gateway.app import _purge_loop, purge_kinds, purge_retention, sweep_recent_texts
from gateway.metrics import Metrics
from gateway.store.base import Store
from gateway.store.blobs import BlobDir, sha256_hex
from gateway.store.replies import ReplyRequest
from gateway.store.sqlite import SQLiteStore, vacuum_file

DAY = 86400.0
MakeStore = contract.MakeStore
accept = contract.accept
# The store contract's fixtures: every test here runs on each backend.
backend = contract.backend
backend_settings = contract.backend_settings
clock = contract.clock
make_store = contract.make_store
store = contract.store


def _checkpoint(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        for _ in range(100):  # the store's reader may hold a snapshot for a moment
            if not conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]:
                return
            time.sleep(0.01)


def _age_files(*paths: Path) -> None:
    old = time.time() - 2 * DAY
    for path in paths:
        os.utime(path, (old, old))


async def test_retention_removes_old_content_and_keeps_young_and_idempotency(
    make_store: MakeStore, clock: Clock, tmp_path: Path
) -> None:
    store = make_store(inline_raw_max=64)
    await store.open()
    blobs = BlobDir(tmp_path / "blobs")
    old_file = Attachment(name="old.txt", content_type="text/plain", data=b"old attachment " * 4)
    old_env = envelope(b'{"text": "an old raw body, longer than inline_raw_max: ' + b"x" * 64 + b'"}')
    await accept(store, message("old-1", attachments=(old_file,)), env=old_env)
    await accept(store, message("old-2", text="old inline"), env=envelope(b'{"text": "old inline"}'))
    held = await store.quarantine(envelope(b"\x00 quarantined, old"), "unreadable")
    clock.advance(40 * DAY)
    young_file = Attachment(name="young.txt", content_type="text/plain", data=b"young attachment")
    young = dataclasses.replace(message("young", attachments=(young_file,)), received_at=clock())
    await accept(store, young, env=envelope(b'{"text": "young"}'))
    _age_files(blobs.path(sha256_hex(old_env.body)), blobs.path(old_file.sha256))

    retention = RetentionSettings(raw_bodies=30 * DAY, blobs=30 * DAY, messages=30 * DAY, batch=1)
    metrics = Metrics()
    removed = await purge_retention(store, retention, clock(), 8 * DAY, metrics)

    assert removed >= 5  # 2 messages, 2 raw bodies (one inline, one file), 1 attachment
    assert await store.read_blob(sha256_hex(old_env.body)) is None
    assert await store.read_blob(sha256_hex(b'{"text": "old inline"}')) is None
    assert await store.read_blob(old_file.sha256) is None
    assert not blobs.path(old_file.sha256).exists()
    assert await store.read_blob(young_file.sha256) == young_file.data
    assert await store.read_blob(sha256_hex(b'{"text": "young"}')) == b'{"text": "young"}'
    assert await store.quarantine_get(held.id) is not None  # a quarantined body waits for its replay
    samples = metrics.samples("ticketgate_retention_purged")
    purged = {labels["kind"]: value for name, labels, value in samples if name.endswith("_total")}
    assert purged == {"messages": 2, "raw_bodies": 2, "blobs": 1}
    assert next(metrics.samples("ticketgate_retention_last_round_timestamp_seconds"))[2] > 0
    # The idempotency key outlives the message row: a late retry is still a repeat.
    (again,) = await accept(store, message("young"))
    assert again.duplicate


async def _ids(store: Store) -> tuple[str, str]:
    rows = await store.outbox_fetch(100)
    body = orjson.loads(rows[0].body)
    return body["customer"]["id"], body["thread"]["id"]


async def test_erasure_removes_the_customer_and_leaves_others(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(inline_raw_max=64)
    await store.open()
    shared = Attachment(name="logo.png", content_type="image/png", data=b"the shop's logo")
    own = Attachment(name="invoice.pdf", content_type="application/pdf", data=b"Ada's invoice " * 8)
    big = envelope(b'{"text": "Ada writes a long message: ' + b"y" * 80 + b'"}')
    ada = message("a1", email="ada@example.com", phone="+41791234567", text="Ada's secret question")
    ada = dataclasses.replace(ada, attachments=(shared, own), media=(MediaRef(kind="image", ref="m-ada"),))
    await accept(store, ada, env=big)
    customer, thread = await _ids(store)
    # The connector fetched the image the message announced (WeChat media_id).
    media_key = "form/support/m-ada"
    await store.media_enqueue([MediaFetch(key=media_key, channel="form", inbox="support", account="a",
                                          ref="m-ada", kind="image", created_at=T0)])  # fmt: skip
    media_sha = await store.media_done(media_key, b"Ada's photo bytes", content_type="image/jpeg", name=None)
    await accept(store, message("a2", email="ada@example.com", text="Ada again, second message"))
    # Bob mentions Ada's address: his message is his, and reaches the desks unchanged.
    await accept(store, message("b1", email="bob@example.com", name="Bob", attachments=(shared,),
                                text="Please also answer ada@example.com"))  # fmt: skip
    published = await store.outbox_fetch(100)
    await store.outbox_mark_published([published[0].position])  # one published, two waiting

    erasure = await store.erase_customer(customer, requested_by="test")

    assert erasure is not None
    assert (erasure.customer_id, erasure.threads, erasure.tenant) == (customer, (thread,), "acme")
    assert erasure.counts["messages"] == 2
    assert erasure.counts["identities"] == 2
    assert erasure.counts["events"] == 2
    rows = await store.outbox_fetch(100)
    assert [r.type for r in rows] == ["message.received", "customer.erased"]
    assert b"bob@example.com" in rows[0].body
    assert b"Please also answer ada@example.com" in rows[0].body
    erased = orjson.loads(rows[1].body)
    assert erased["customer"]["id"] == customer
    assert erased["erasure"]["id"] == erasure.id
    assert b"ada@example.com" not in rows[1].body
    assert (await store.outbox_status()).backlog == 2  # Bob's message and the erasure
    assert await store.read_blob(sha256_hex(big.body)) is None
    assert await store.read_blob(own.sha256) is None
    assert not BlobDir(tmp_path / "blobs").path(own.sha256).exists()
    assert await store.read_blob(shared.sha256) == shared.data  # Bob's message names it too
    assert await store.media_get(media_key) is None
    assert await store.read_blob(media_sha) is None
    assert not BlobDir(tmp_path / "blobs").path(media_sha).exists()

    def summary(tx: Tx, now: datetime) -> tuple[Any, Sequence[Event]]:
        return (tx.find_customer(customer), tx.customer_identities(customer), tx.get_thread(thread)), ()

    found, identities, kept_thread = await store.transact(summary)
    assert found is not None
    assert found.display_name is None
    assert identities == ()
    assert kept_thread is not None
    assert (kept_thread.subject, kept_thread.open) == (None, False)
    # A provider's retry of an erased message is a repeat, not a new customer.
    (retry,) = await accept(store, message("a1", email="ada@example.com", text="Ada's secret question"))
    assert retry.duplicate
    # A new message from the same address makes a new customer.
    (fresh,) = await accept(store, message("a3", email="ada@example.com"))
    assert not fresh.duplicate
    assert fresh.customer_id != customer
    # Erasing again is harmless and announces it again.
    twice = await store.erase_customer(customer, requested_by="test")
    assert twice is not None
    assert twice.counts["messages"] == 0
    assert await store.erase_customer("cus_" + "0" * 32) is None
    assert await store.erase_customer(customer, tenant="other") is None


async def test_erasure_removes_the_reply_ledger_of_the_customer(store: Store) -> None:
    (ada,) = await accept(store, message("a1", email="ada@example.com"))
    (bob,) = await accept(store, message("b1", email="bob@example.com", name="Bob"))
    mine = await store.reply_request(reply(ada.thread_id, "c-ada", "Dear Ada, your order ships today"))
    theirs = await store.reply_request(reply(bob.thread_id, "c-bob", "Dear Bob"))
    assert mine.record is not None
    assert theirs.record is not None

    erasure = await store.erase_customer(ada.customer_id)

    assert erasure is not None
    assert erasure.counts["replies"] == 1
    assert await store.reply_get(mine.record.id) is None  # nothing is sent to an erased customer
    assert await store.reply_get(theirs.record.id) is not None
    assert await store.reply_context(mine.record.id) is None
    bodies = b"".join(r.body for r in await store.outbox_fetch(100))
    assert b"Dear Ada" not in bodies


def reply(thread_id: str, command_id: str, text: str) -> ReplyRequest:
    return ReplyRequest(
        reply_id=new_id("rpl"), tenant="acme", command_id=command_id, thread_id=thread_id,
        fingerprint=f"fp:{text}", command={"text": text, "agent_name": "Bo"},
    )  # fmt: skip


async def test_erasure_covers_customers_merged_into_it(store: Store) -> None:
    await accept(store, message("p1", email="pat@example.com", phone=None, name="Pat"))
    await accept(store, message("p2", email="pat.work@example.com", phone=None, name="Pat W"))
    rows = await store.outbox_fetch(100)
    first, second = (orjson.loads(r.body)["customer"]["id"] for r in rows)
    work = Identity(kind="email", value="pat.work@example.com", verified=True)
    link = graph.link(first, identities=[work], other_customer_id=None, evidence={"by": "desk"})
    await store.transact(link)

    erasure = await store.erase_customer(second)  # the merged one: its survivor is erased with it

    assert erasure is not None
    assert erasure.customer_id == first
    assert erasure.merged_customers == (second,)
    assert erasure.counts["messages"] == 2
    assert erasure.counts["merges"] == 1
    assert all(b"@example.com" not in r.body for r in await store.outbox_fetch(100))


async def test_sqlite_file_stops_growing_once_retention_runs(tmp_path: Path) -> None:
    """Day after day of messages, with what the daemon's purge loop does each day (recent texts past
    the duplicate window, idempotency keys past 8 days, a 3-day [retention]): once the keys' 8 days
    are reached, the file (database and WAL) stays the same size; before, it grew with every day."""
    days = Clock()
    sqlite = SQLiteStore(store_settings(tmp_path), outbox_settings(max_backlog=10**6), clock=days)
    await sqlite.open()
    retention = RetentionSettings(raw_bodies=3 * DAY, messages=3 * DAY, events=3 * DAY, batch=500)
    db = tmp_path / "tg.db"
    sizes: list[int] = []
    try:
        for day in range(14):
            for n in range(200):
                text = f"day {day} message {n}: " + "lorem ipsum dolor sit amet " * 25
                body = orjson.dumps({"text": text, "n": n, "day": day})
                await accept(sqlite, message(f"d{day}-{n}", email=f"c{n % 50}@example.com", text=text),
                             env=envelope(body))  # fmt: skip
            rows = await sqlite.outbox_fetch(10_000)
            await sqlite.outbox_mark_published([r.position for r in rows])
            now = days()
            await sweep_recent_texts(sqlite, now - timedelta(minutes=15))
            await purge_kinds(sqlite, {"keys": 8 * DAY}, now, retention)
            await purge_retention(sqlite, retention, now, 8 * DAY)
            await asyncio.to_thread(_checkpoint, db)
            sizes.append(db.stat().st_size + db.with_name("tg.db-wal").stat().st_size)
            days.advance(DAY)
    finally:
        await sqlite.close()
    print("file size per day:", sizes)
    plateau = sizes[9:]
    assert max(plateau) <= min(plateau) * 1.05, sizes  # stopped growing
    assert sizes[3] > sizes[0] * 2, sizes  # where it grew before retention removed anything


async def test_vacuum_file_turns_an_old_database_incremental(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x BLOB)")
    conn.executemany("INSERT INTO t VALUES (?)", [(b"x" * 1000,)] * 500)
    conn.commit()
    conn.execute("DELETE FROM t")
    conn.commit()
    assert conn.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    conn.close()

    before, after = vacuum_file(path)

    assert after < before
    assert sqlite3.connect(path).execute("PRAGMA auto_vacuum").fetchone() == (2,)
    assert vacuum_file(path)[1] == after  # again: nothing to do


@pytest.mark.parametrize("days", [1])
def test_retention_settings_refuse_less_than_a_day(days: int) -> None:
    with pytest.raises(ValueError, match="at least 1 day"):
        RetentionSettings(raw_bodies=days * DAY - 1)
    assert RetentionSettings(raw_bodies=timedelta(days=days).total_seconds()).raw_bodies == DAY


async def test_erasure_finds_the_content_of_messages_stored_before_content_links(tmp_path: Path) -> None:
    """A message stored by an older ticketgate has no message_content rows; its outbox event (kept
    for store.idempotency_retention) still names its raw body and files."""
    sqlite = SQLiteStore(store_settings(tmp_path, inline_raw_max=16), outbox_settings())
    await sqlite.open()
    try:
        file = Attachment(name="a.txt", content_type="text/plain", data=b"an older attachment")
        env = envelope(b'{"text": "an older raw body"}')
        (placed,) = await accept(sqlite, message("old", attachments=(file,)), env=env)
        with contextlib.closing(sqlite3.connect(tmp_path / "tg.db")) as conn:
            conn.execute("DELETE FROM message_content")
            conn.commit()

        erasure = await sqlite.erase_customer(placed.customer_id)

        assert erasure is not None
        assert (erasure.counts["raw_bodies"], erasure.counts["files"]) == (0, 2)  # both are files here
        assert await sqlite.read_blob(sha256_hex(env.body)) is None
        assert await sqlite.read_blob(file.sha256) is None
    finally:
        await sqlite.close()


async def test_erasure_removes_connector_state_keyed_by_the_customer(store: Store) -> None:
    openid = Identity(kind="wechat_openid", value="wx0123456789abcdef:oAbCdEfGhIjKlMnOp", verified=True)
    wechat = dataclasses.replace(message("w1", channel="wechat"), identities=(openid,))
    (placed,) = await accept(store, wechat)
    await store.state_put("wechat/unionid/wx0123456789abcdef/oAbCdEfGhIjKlMnOp", b'{"unionid": null}')
    await store.state_put(f"wechat/reply:{placed.thread_id}", b'{"sent": 1}')
    await store.state_put("telegram/bot/cursor", b"1234567")

    erasure = await store.erase_customer(placed.customer_id)

    assert erasure is not None
    assert erasure.counts["state"] == 2
    assert await store.state_get("wechat/unionid/wx0123456789abcdef/oAbCdEfGhIjKlMnOp") is None
    assert await store.state_get(f"wechat/reply:{placed.thread_id}") is None
    assert await store.state_get("telegram/bot/cursor") == b"1234567"


async def test_the_daemon_runs_retention_rounds(store: Store) -> None:
    """The purge loop the daemon starts removes what [retention] lets go (here everything stored at
    the test clock's 2025 date is months old) and records the round in the metrics."""
    env = envelope(b'{"text": "months old"}')
    await accept(store, message("m-old"), env=env)
    metrics = Metrics()
    retention = RetentionSettings(raw_bodies=DAY, interval=0.05)
    loop = asyncio.create_task(
        _purge_loop(store, duplicate_window=900, interval=0.05, retention=retention, metrics=metrics)
    )
    try:
        for _ in range(200):
            if await store.read_blob(sha256_hex(env.body)) is None:
                break
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert await store.read_blob(sha256_hex(env.body)) is None
    assert next(metrics.samples("ticketgate_retention_last_round_timestamp_seconds"))[2] > 0


async def test_an_old_sqlite_file_is_named_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tg.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE made_by_an_older_ticketgate (x)")  # auto_vacuum NONE, for good
        conn.commit()
    old = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await old.open()
    await old.close()
    assert "ticketgate store vacuum" in caplog.text
    vacuum_file(path)
    caplog.clear()
    rebuilt = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await rebuilt.open()
    await rebuilt.close()
    assert "ticketgate store vacuum" not in caplog.text


async def test_messages_arriving_during_an_erasure_are_erased_or_start_afresh(store: Store) -> None:
    (first,) = await accept(store, message("c-0", email="busy@example.com"))

    async def more(n: int) -> Placement:
        (placed,) = await accept(store, message(f"c-{n}", email="busy@example.com", text=f"message {n}"))
        return placed

    placed, erasure = await asyncio.gather(
        asyncio.gather(*(more(n) for n in range(1, 21))), store.erase_customer(first.customer_id)
    )

    assert erasure is not None

    def check(tx: Tx, now: datetime) -> tuple[Any, Sequence[Event]]:
        return (tx.customer_identities(first.customer_id), [tx.get_thread(t) for t in erasure.threads]), ()

    identities, threads = await store.transact(check)
    assert identities == ()  # nothing of the erased customer came back
    assert all(t is not None and t.subject is None for t in threads)
    survivors = {p.customer_id for p in placed} - {first.customer_id}
    assert len(survivors) <= 1  # messages after the erasure make one new customer
    rows = await store.outbox_fetch(1000)
    received = [orjson.loads(r.body) for r in rows if r.type == "message.received"]
    assert all(e["customer"]["id"] != first.customer_id for e in received)
