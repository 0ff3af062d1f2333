"""The Store contract. Every backend runs these through the ``make_store`` fixture."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest
from storekit import (
    POLICY,
    WINDOW,
    Clock,
    build_event,
    envelope,
    message,
    outbox_settings,
    store_settings,
)

from core.errors import BacklogFull
from core.events import Event, thread_merged
from core.model import Attachment, CanonicalMessage, Identity, Placement, RawEnvelope
from dedupe import graph
from dedupe.tx import RECENT_TEXTS_KEPT, RecentText, Tx
from gateway.app import _purge_loop, sweep_recent_texts
from gateway.store.base import Store
from gateway.store.blobs import BlobDir, sha256_hex
from gateway.store.postgres import PostgresStore
from gateway.store.sqlite import SQLiteStore
from tests.support.postgres import store_table


class MakeStore(Protocol):
    def __call__(self, *, outbox: dict[str, Any] | None = None, **store: Any) -> Store: ...


BACKENDS: dict[str, Callable[..., Store]] = {
    "sqlite": lambda settings, outbox, clock: SQLiteStore(settings, outbox, clock=clock),
    "postgresql": lambda settings, outbox, clock: PostgresStore(settings, outbox, clock=clock),
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend_settings(backend: str) -> Iterator[dict[str, Any]]:
    """Settings a backend needs besides the tmp paths: PostgreSQL gets a fresh database per test."""
    with store_table(backend) as table:
        yield table


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_store(
    backend: str, backend_settings: dict[str, Any], tmp_path: Path, clock: Clock
) -> AsyncIterator[MakeStore]:
    """Builds (unopened) stores over the same files (and database); all are closed afterwards."""
    made: list[Store] = []

    def make(*, outbox: dict[str, Any] | None = None, **store: Any) -> Store:
        instance = BACKENDS[backend](
            store_settings(tmp_path, **backend_settings, **store), outbox_settings(**(outbox or {})), clock
        )
        made.append(instance)
        return instance

    yield make
    for instance in made:
        await instance.close()


@pytest.fixture
async def store(make_store: MakeStore) -> Store:
    instance = make_store()
    await instance.open()
    return instance


async def accept(
    store: Store, *messages: CanonicalMessage, env: RawEnvelope | None = None
) -> list[Placement]:
    return await store.accept(
        env or envelope(), messages, policies=[POLICY] * len(messages), build_event=build_event
    )


async def test_concurrent_accepts_of_one_key_make_one_event(store: Store) -> None:
    results = await asyncio.gather(*(accept(store, message("wamid.1")) for _ in range(100)))

    placements = [p for (p,) in results]
    first = [p for p in placements if not p.duplicate]
    assert len(first) == 1
    assert sum(p.duplicate for p in placements) == 99
    same = {(p.message_id, p.thread_id, p.customer_id, p.sequence, p.is_new_thread) for p in placements}
    assert len(same) == 1
    rows = await store.outbox_fetch(1000)
    assert len(rows) == 1
    assert orjson.loads(rows[0].body)["message"]["id"] == first[0].message_id


async def test_batched_envelope_places_every_message_and_repeats_within_it(store: Store) -> None:
    placements = await accept(store, message("a"), message("b"), message("a"))

    assert [p.duplicate for p in placements] == [False, False, True]
    assert [p.sequence for p in placements] == [1, 2, 1]
    assert len(await store.outbox_fetch(10)) == 2


async def test_message_inside_window_joins_the_thread_outside_opens_a_new_one(
    store: Store, clock: Clock
) -> None:
    (first,) = await accept(store, message("m1"))
    clock.advance(WINDOW - 1)
    (second,) = await accept(store, message("m2", subject="Re: Order 1234 is late"))
    clock.advance(WINDOW + 1)
    (third,) = await accept(store, message("m3", subject="New question"))

    assert (first.is_new_thread, first.sequence) == (True, 1)
    assert (second.thread_id, second.is_new_thread, second.sequence) == (first.thread_id, False, 2)
    assert third.thread_id != first.thread_id
    assert (third.is_new_thread, third.sequence) == (True, 1)
    assert {first.customer_id, second.customer_id, third.customer_id} == {first.customer_id}
    bodies = [orjson.loads(r.body) for r in await store.outbox_fetch(10)]
    # The thread keeps the subject of its first message.
    assert [b["thread"]["subject"] for b in bodies] == [
        "Order 1234 is late",
        "Order 1234 is late",
        "New question",
    ]


async def test_other_inbox_or_tenant_gets_its_own_thread(store: Store) -> None:
    (first,) = await accept(store, message("m1"))
    (other_inbox,) = await accept(store, message("m2", inbox="billing"))
    (other_tenant,) = await accept(store, message("m3", tenant="globex"))

    assert other_inbox.thread_id != first.thread_id
    assert other_inbox.customer_id == first.customer_id
    assert other_tenant.customer_id != first.customer_id


async def test_identities_link_across_messages_and_display_name_is_kept(store: Store) -> None:
    (first,) = await accept(store, message("m1", email="ada@example.com", phone="+41790000001", name="Ada"))
    only_phone = message("m2", email="ada@example.com", phone="+41790000001", name="A. Lovelace")
    (second,) = await accept(store, only_phone)

    assert second.customer_id == first.customer_id
    body = orjson.loads((await store.outbox_fetch(10))[-1].body)
    assert body["customer"]["display_name"] == "Ada"
    assert {(i["kind"], i["value"]) for i in body["customer"]["identities"]} == {
        ("email", "ada@example.com"),
        ("phone", "+41790000001"),
    }


async def test_backlog_bound_refuses_then_accepts_after_publishing(make_store: MakeStore) -> None:
    store = make_store(outbox={"max_backlog": 3, "retry_after": 7})
    await store.open()
    for n in range(3):
        await accept(store, message(f"m{n}"))

    with pytest.raises(BacklogFull) as refused:
        await accept(store, message("m3"))
    assert refused.value.retry_after == 7

    rows = await store.outbox_fetch(1)
    await store.outbox_mark_published([rows[0].position])
    (placement,) = await accept(store, message("m3"))
    assert not placement.duplicate


async def test_orphaned_blob_files_are_swept_and_named_ones_stay(
    make_store: MakeStore, tmp_path: Path
) -> None:
    """A commit that fails after its files were written (here a full outbox) leaves them named by
    nothing; the sweep removes them once older than the safety age, and nothing a row names."""
    store = make_store(outbox={"max_backlog": 2}, inline_raw_max=16)
    await store.open()
    blobs = BlobDir(tmp_path / "blobs")

    def big(tag: str) -> tuple[RawEnvelope, Attachment]:
        body = f'{{"text": "a body bigger than inline_raw_max: {tag}"}}'.encode()
        return envelope(body), Attachment(name=f"{tag}.txt", content_type="text/plain", data=tag.encode() * 8)

    kept_env, kept_file = big("kept")
    await accept(store, message("m0", attachments=(kept_file,)), env=kept_env)
    quarantined = (await store.quarantine(big("quarantined")[0], "unreadable")).raw_ref.rsplit(":", 1)[1]
    media = await store.media_done("wechat/support/m1", b"fetched media", content_type="image/png", name=None)
    orphan_env, orphan_file = big("orphan")
    with pytest.raises(BacklogFull):  # written, then the commit that would name them failed
        await accept(store, message("m1", attachments=(orphan_file,)), env=orphan_env)
    orphans = [blobs.path(sha256_hex(orphan_env.body)), blobs.path(sha256_hex(orphan_file.data))]
    named = [
        blobs.path(sha256_hex(kept_env.body)), blobs.path(sha256_hex(kept_file.data)),
        blobs.path(quarantined), blobs.path(media),
    ]
    assert all(p.exists() for p in orphans + named)
    two_hours_ago = time.time() - 7200
    for path in orphans + named:
        os.utime(path, (two_hours_ago, two_hours_ago))
    young_env, young_file = big("young")  # another instance's files, its commit not yet done
    with pytest.raises(BacklogFull):
        await accept(store, message("m2", attachments=(young_file,)), env=young_env)
    young = [blobs.path(sha256_hex(young_env.body)), blobs.path(sha256_hex(young_file.data))]

    assert await store.sweep_orphans(min_age=3600) == 2

    assert not any(p.exists() for p in orphans)
    assert all(p.exists() for p in named + young)
    assert await store.read_blob(sha256_hex(kept_file.data)) == kept_file.data
    # An old orphan written again (found and touched by put) is young again: its commit may follow.
    for path in young:
        os.utime(path, (two_hours_ago, two_hours_ago))
    with pytest.raises(BacklogFull):
        await accept(store, message("m2", attachments=(young_file,)), env=young_env)
    assert await store.sweep_orphans(min_age=3600) == 0
    assert all(p.exists() for p in young)


async def test_the_daemon_sweeps_orphans_at_start_up(make_store: MakeStore, tmp_path: Path) -> None:
    store = make_store(outbox={"max_backlog": 1}, inline_raw_max=16)
    await store.open()
    await accept(store, message("m0"))
    orphan_env = envelope(b'{"text": "a raw body bigger than inline_raw_max"}')
    with pytest.raises(BacklogFull):
        await accept(store, message("m1"), env=orphan_env)
    orphan = BlobDir(tmp_path / "blobs").path(sha256_hex(orphan_env.body))
    two_hours_ago = time.time() - 7200
    os.utime(orphan, (two_hours_ago, two_hours_ago))

    loop = asyncio.create_task(_purge_loop(store, duplicate_window=900, interval=0.05, orphan_min_age=3600))
    try:
        for _ in range(100):
            if not orphan.exists():
                break
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
    assert not orphan.exists()


async def test_low_disk_refuses_with_backlog_full(make_store: MakeStore) -> None:
    store = make_store(min_free_disk_mb=10**12)
    await store.open()

    with pytest.raises(BacklogFull):
        await accept(store, message("m1"))


async def test_outbox_keeps_accept_order_and_marks_published(store: Store) -> None:
    placements = []
    for n in range(5):
        placements += await accept(store, message(f"m{n}", email=f"c{n % 2}@example.com"))

    rows = await store.outbox_fetch(10)
    assert [r.position for r in rows] == sorted(r.position for r in rows)
    assert [orjson.loads(r.body)["message"]["id"] for r in rows] == [p.message_id for p in placements]
    assert [(r.thread_id, r.sequence) for r in rows] == [(p.thread_id, p.sequence) for p in placements]
    assert [r.routing_key for r in rows] == ["acme.form.message.received"] * 5
    assert [r.position for r in await store.outbox_fetch(10, after=rows[1].position)] == [
        r.position for r in rows[2:]
    ]

    await store.outbox_mark_published([rows[0].position, rows[2].position])
    await store.outbox_mark_published([rows[0].position])  # repeated marks count once

    assert [r.position for r in await store.outbox_fetch(10)] == [
        rows[1].position,
        *(r.position for r in rows[3:]),
    ]
    status = await store.outbox_status()
    assert (status.backlog, status.published_total) == (3, 2)
    assert status.oldest_created_at is not None


async def test_enqueue_adds_events_after_accepted_ones(store: Store) -> None:
    await accept(store, message("m1"))
    (row,) = await store.outbox_fetch(1)
    event = thread_merged(
        tenant="acme",
        channel="form",
        surviving_thread="thr_a",
        merged_threads=["thr_b"],
        reason="test",
        occurred_at=row.created_at,
    )
    await store.enqueue([event])

    rows = await store.outbox_fetch(10)
    assert [r.type for r in rows] == ["message.received", "thread.merged"]
    assert (rows[1].event_id, rows[1].body, rows[1].thread_id) == (event.event_id, event.body, "thr_a")


async def test_quarantine_round_trip(store: Store) -> None:
    raw = envelope(b"\x00not json\xff")
    record = await store.quarantine(raw, "normalizer: unexpected token")

    assert (record.tenant, record.channel, record.inbox, record.size) == (
        "acme",
        "form",
        "support",
        len(raw.body),
    )
    assert record.raw_ref == f"blob:sha256:{sha256_hex(raw.body)}"
    assert [r.id for r in await store.quarantine_list()] == [record.id]
    counts = await store.quarantine_counts()
    assert (counts.held, counts.total) == (1, 1)

    got = await store.quarantine_get(record.id)
    assert got is not None
    stored, rebuilt = got
    assert stored == record
    assert rebuilt == raw
    assert rebuilt.body == raw.body
    assert dict(rebuilt.headers) == dict(raw.headers)
    assert dict(rebuilt.meta) == dict(raw.meta)

    (row,) = await store.outbox_fetch(10)
    body = orjson.loads(row.body)
    assert (row.type, row.routing_key) == ("message.quarantined", "acme.form.message.quarantined")
    assert body["quarantine"]["id"] == record.id
    assert body["quarantine"]["reason"] == "normalizer: unexpected token"

    await store.quarantine_mark_replayed(record.id, "accepted")
    (listed,) = await store.quarantine_list()
    assert listed.replay_result == "accepted"
    assert listed.replayed_at is not None
    counts = await store.quarantine_counts()
    assert (counts.held, counts.total) == (0, 1)
    assert await store.quarantine_get("qua_missing") is None


async def test_read_blob_serves_archived_bytes_and_refuses_paths(store: Store) -> None:
    raw = envelope(b"raw bytes of a message")
    await accept(store, message("m1"), env=raw)

    assert await store.read_blob(sha256_hex(raw.body)) == raw.body
    assert await store.read_blob("0" * 64) is None
    assert await store.read_blob("../../etc/passwd") is None


async def test_blobs_keep_the_content_type_they_were_stored_with(store: Store) -> None:
    page = Attachment(name="a.html", content_type="text/html", data=b"<script>alert(1)</script>")
    again = Attachment(name="b.bin", content_type="application/octet-stream", data=page.data)
    big = envelope(b"x" * 300_000)  # past inline_raw_max: a raw body kept as a file, with no type
    await accept(store, message("m1", attachments=(page,)), env=big)
    await accept(store, message("m2", attachments=(again,)))
    digest = await store.media_done("wechat/m", b"\x89PNG", content_type="image/png", name="p.png")

    assert await store.blob_content_type(page.sha256) == "text/html"  # the first type is kept
    assert await store.blob_content_type(sha256_hex(big.body)) is None
    assert await store.blob_content_type(digest) == "image/png"
    assert await store.blob_content_type("0" * 64) is None
    assert await store.blob_content_type("../../etc/passwd") is None


async def test_committed_state_survives_close_and_reopen(make_store: MakeStore) -> None:
    store = make_store(outbox={"max_backlog": 2})
    await store.open()
    (first,) = await accept(store, message("m1"))
    await accept(store, message("m2"))
    await store.close()

    reopened = make_store(outbox={"max_backlog": 2})
    await reopened.open()
    (again,) = await accept(reopened, message("m1"))
    assert again == Placement(
        message_id=first.message_id,
        thread_id=first.thread_id,
        customer_id=first.customer_id,
        sequence=first.sequence,
        is_new_thread=first.is_new_thread,
        duplicate=True,
    )
    assert len(await reopened.outbox_fetch(10)) == 2
    # The backlog bound counts rows committed before the reopen.
    with pytest.raises(BacklogFull):
        await accept(reopened, message("m3"))


async def test_purge_drops_expired_keys_only(store: Store, clock: Clock) -> None:
    await accept(store, message("old"))
    clock.advance(9 * 86400)
    await accept(store, message("new"))

    purged = await store.purge_expired(clock())

    assert purged == 1
    (old_again,) = await accept(store, message("old"))
    (new_again,) = await accept(store, message("new"))
    assert not old_again.duplicate
    assert new_again.duplicate


async def test_ping_succeeds_on_an_open_store(store: Store) -> None:
    await store.ping()


async def test_state_is_durable_and_overwritten(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    assert await store.state_get("imap/support/INBOX") is None
    await store.state_put("imap/support/INBOX", b'{"uidvalidity": 7, "uid": 41}')
    await store.state_put("imap/support/INBOX", b'{"uidvalidity": 7, "uid": 42}')
    await store.close()
    reopened = make_store()
    await reopened.open()
    try:
        assert await reopened.state_get("imap/support/INBOX") == b'{"uidvalidity": 7, "uid": 42}'
    finally:
        await reopened.close()


async def test_state_cas_sets_only_over_the_expected_value(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    key = "wechat/kf/cursor"
    assert await store.state_cas(key, None, b"1") is True  # absent -> set
    assert await store.state_cas(key, None, b"2") is False  # present now: absent is not expected
    assert await store.state_cas(key, b"0", b"2") is False  # wrong expected value
    assert await store.state_get(key) == b"1"  # unchanged by the refused ones
    assert await store.state_cas(key, b"1", b"2") is True
    assert await store.state_get(key) == b"2"
    await store.close()
    reopened = make_store()
    await reopened.open()
    assert await reopened.state_get(key) == b"2"  # durable like state_put


async def test_concurrent_state_cas_of_one_expected_value_has_one_winner(make_store: MakeStore) -> None:
    """Two store instances over one database race from the same expected value: exactly one wins."""
    first, second = make_store(), make_store()
    await first.open()
    await second.open()
    for expected, key in ((None, "absent"), (b"0", "present")):
        if expected is not None:
            await first.state_put(key, expected)
        values = [f"v{i}".encode() for i in range(16)]
        results = await asyncio.gather(
            *(
                (first if i % 2 else second).state_cas(key, expected, value)
                for i, value in enumerate(values)
            )
        )
        assert results.count(True) == 1, (key, results)
        assert await first.state_get(key) == values[results.index(True)]


# -- identity graph and threading through the store (dedupe rules, backend-neutral) -----------------


def _msg(external_id: str, *identities: Identity, channel: str = "form", **fields: Any) -> CanonicalMessage:
    return dataclasses.replace(message(external_id, channel=channel), identities=identities, **fields)


async def test_verified_merge_enqueues_customer_merged_before_the_message(store: Store) -> None:
    openid = Identity(kind="wechat_openid", value="wx1:o", verified=True)
    unionid = Identity(kind="wechat_unionid", value="u", verified=True)
    (a,) = await accept(store, _msg("w1", openid, channel="wechat"))
    (b,) = await accept(store, _msg("w2", unionid, channel="wechat", inbox="other"))

    (c,) = await accept(store, _msg("w3", openid, unionid, channel="wechat"))

    rows = await store.outbox_fetch(10)
    assert [r.type for r in rows] == ["message.received"] * 2 + ["customer.merged", "message.received"]
    merged = orjson.loads(rows[2].body)
    assert merged["customer"] == {"id": a.customer_id, "merged": [b.customer_id]}
    assert c.customer_id == a.customer_id
    last = orjson.loads(rows[3].body)
    assert {i["value"] for i in last["customer"]["identities"]} == {"wx1:o", "u"}

    # Undo through the store's transaction: identities go back, and the event goes out.
    summary = await store.transact(graph.customer_summary(a.customer_id))
    assert summary is not None
    (merge,) = summary.merges
    await store.transact(graph.undo(merge.id))
    rows = await store.outbox_fetch(10)
    assert rows[-1].type == "customer.unmerged"
    (d,) = await accept(store, _msg("w4", unionid, channel="wechat", inbox="other"))
    assert d.customer_id == b.customer_id


async def test_a_link_without_a_message_merges_the_threads_at_the_next_message(
    store: Store, clock: Clock
) -> None:
    # Two Official Accounts, one inbox: the same person is two customers with a thread each until
    # the unionid (from the user-info API, after the messages) links them, as link_verified does.
    unionid = Identity(kind="wechat_unionid", value="u", verified=True)
    first, second = (Identity(kind="wechat_openid", value=f"wx{n}:o", verified=True) for n in (1, 2))
    (a,) = await accept(store, _msg("w1", first, channel="wechat"))
    (b,) = await accept(store, _msg("w2", second, channel="wechat"))
    await store.transact(graph.link(a.customer_id, identities=[unionid], evidence={"source": "wechat_api"}))
    await store.transact(graph.link(b.customer_id, identities=[unionid], evidence={"source": "wechat_api"}))
    clock.advance(60)

    (c,) = await accept(store, _msg("w3", second, channel="wechat"))

    rows = await store.outbox_fetch(10)
    assert [r.type for r in rows][-3:] == ["customer.merged", "thread.merged", "message.received"]
    merged = orjson.loads(rows[-2].body)["thread"]
    assert merged == {"id": a.thread_id, "merged": [b.thread_id], "reason": "customer.merged"}
    assert (c.customer_id, c.thread_id) == (b.customer_id, a.thread_id)
    (d,) = await accept(store, _msg("w4", first, channel="wechat"))
    assert d.thread_id == a.thread_id
    assert (await store.outbox_fetch(10))[-1].type == "message.received"


async def test_duplicate_touchpoint_joins_the_first_thread_with_duplicate_of(
    store: Store, clock: Clock
) -> None:
    text = "My parcel 1234 arrived damaged and the box was open. Please help."
    mail = Identity(kind="email", value="ada@example.com", verified=True)
    (first,) = await accept(store, _msg("f1", mail, channel="form", inbox="web", text=text))
    clock.advance(300)
    (second,) = await accept(store, _msg("e1", mail, channel="email", text=text.lower()))

    assert (second.thread_id, second.duplicate_of) == (first.thread_id, first.message_id)
    bodies = [orjson.loads(r.body) for r in await store.outbox_fetch(10)]
    assert [b["message"]["duplicate_of"] for b in bodies] == [None, first.message_id]


async def test_recent_texts_are_capped_per_channel_without_changing_what_is_found(store: Store) -> None:
    """A customer busy on one channel (an alert sender, a flood): with the table capped per channel,
    recent_texts returns exactly what it returned when the table kept everything."""
    rng = random.Random(7)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    texts = [
        RecentText(
            customer_id="cus_busy",
            message_id=f"m{i:04}",
            thread_id="thr_busy",
            channel=rng.choice(("email",) * 8 + ("chat", "form")),
            text=f"text {i}",
            at=start + timedelta(seconds=i),
        )
        for i in range(300)
    ]

    def add(batch: list[RecentText]) -> Callable[[Tx, datetime], tuple[None, list[Event]]]:
        def work(tx: Tx, now: datetime) -> tuple[None, list[Event]]:
            for text in batch:
                tx.add_recent_text(text)
            return None, []

        return work

    def found(not_channel: str) -> Callable[[Tx, datetime], tuple[list[str], list[Event]]]:
        def work(tx: Tx, now: datetime) -> tuple[list[str], list[Event]]:
            return [t.message_id for t in tx.recent_texts("cus_busy", start, not_channel=not_channel)], []

        return work

    for offset in range(0, len(texts), 60):
        await store.transact(add(texts[offset : offset + 60]))

    for channel in ("email", "chat", "form", "sms"):
        # What the uncapped table answered: the newest RECENT_TEXTS_KEPT from other channels.
        newest_first = [t.message_id for t in reversed(texts) if t.channel != channel]
        assert await store.transact(found(channel)) == newest_first[:RECENT_TEXTS_KEPT]


def _texts(start: datetime, count: int) -> list[RecentText]:
    return [
        RecentText(
            customer_id=f"cus_{i % 7}",
            message_id=f"m{i:03}",
            thread_id="thr",
            channel=("email", "chat")[i % 2],
            text=f"text {i}",
            at=start + timedelta(seconds=i),
        )
        for i in range(count)
    ]


async def _add_texts(store: Store, texts: list[RecentText]) -> None:
    def work(tx: Tx, now: datetime) -> tuple[None, list[Event]]:
        for text in texts:
            tx.add_recent_text(text)
        return None, []

    await store.transact(work)


async def _kept_texts(store: Store, since: datetime) -> list[str]:
    def work(tx: Tx, now: datetime) -> tuple[list[str], list[Event]]:
        customers = [f"cus_{i}" for i in range(7)]
        found = [t.message_id for c in customers for t in tx.recent_texts(c, since, not_channel="sms")]
        return sorted(found), []

    return await store.transact(work)


async def test_recent_texts_past_the_window_are_swept_oldest_first_in_chunks(store: Store) -> None:
    """Texts of customers who never write again must not stay for good (their text included)."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    await _add_texts(store, _texts(start, 30))
    before = start + timedelta(seconds=23)  # m000 .. m022 are older

    assert await store.purge_recent_texts(before, 5) == 5
    assert await _kept_texts(store, start) == [f"m{i:03}" for i in range(5, 30)]
    assert await sweep_recent_texts(store, before, chunk=5) == 18
    assert await _kept_texts(store, start) == [f"m{i:03}" for i in range(23, 30)]
    assert await store.purge_recent_texts(before, 5) == 0


async def test_the_daemon_sweeps_texts_past_the_duplicate_window(store: Store) -> None:
    now = datetime.now(UTC)
    await _add_texts(store, _texts(now - timedelta(minutes=20), 30))  # 20 min old, window 15 min
    fresh = [dataclasses.replace(t, message_id=f"n{i:03}", at=now) for i, t in enumerate(_texts(now, 3))]
    await _add_texts(store, fresh)

    loop = asyncio.create_task(_purge_loop(store, duplicate_window=15 * 60, interval=0.05))
    try:
        for _ in range(100):
            if await _kept_texts(store, now - timedelta(hours=1)) == ["n000", "n001", "n002"]:
                break
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
    assert await _kept_texts(store, now - timedelta(hours=1)) == ["n000", "n001", "n002"]


async def test_exact_retry_answers_the_whole_first_placement(store: Store, clock: Clock) -> None:
    text = "My parcel 1234 arrived damaged and the box was open. Please help."
    mail = Identity(kind="email", value="ada@example.com", verified=True)
    (first,) = await accept(store, _msg("q1@ada", mail, channel="email"))
    assert await store.transact(graph.set_thread_status(first.thread_id, open=False, at=clock()))
    (form,) = await accept(store, _msg("f1", mail, channel="form", text=text))
    clock.advance(60)
    (mail_copy,) = await accept(store, _msg("e1", mail, channel="email", text=text))

    (form_again,) = await accept(store, _msg("f1", mail, channel="form", text=text))
    (mail_again,) = await accept(store, _msg("e1", mail, channel="email", text=text))

    assert form.previous_thread_id == first.thread_id
    assert mail_copy.duplicate_of == form.message_id
    assert form_again == dataclasses.replace(form, duplicate=True)
    assert mail_again == dataclasses.replace(mail_copy, duplicate=True)
    assert len(await store.outbox_fetch(10)) == 3


async def test_closed_thread_then_reference_opens_a_new_thread_with_previous_id(
    store: Store, clock: Clock
) -> None:
    mail = Identity(kind="email", value="ada@example.com", verified=True)
    (first,) = await accept(store, _msg("q1@ada", mail, channel="email"))

    assert await store.transact(graph.set_thread_status(first.thread_id, open=False, at=clock()))
    assert not await store.transact(graph.set_thread_status("thr_unknown", open=False, at=clock()))
    (reply,) = await accept(store, _msg("r1@ada", mail, channel="email", in_reply_to="q1@ada"))

    assert reply.is_new_thread
    assert reply.previous_thread_id == first.thread_id
    body = orjson.loads((await store.outbox_fetch(10))[-1].body)
    assert body["thread"]["previous_id"] == first.thread_id


async def test_in_reply_to_joins_after_the_window(store: Store, clock: Clock) -> None:
    mail = Identity(kind="email", value="ada@example.com", verified=True)
    (first,) = await accept(store, _msg("q1@ada", mail, channel="email"))
    clock.advance(WINDOW * 3)
    (fresh,) = await accept(store, _msg("n1@ada", mail, channel="email"))
    (reply,) = await accept(store, _msg("r1@ada", mail, channel="email", references=("q1@ada",)))

    assert fresh.thread_id != first.thread_id
    assert (reply.thread_id, reply.sequence) == (first.thread_id, 2)


async def test_transact_rolls_back_on_error(store: Store) -> None:
    (first,) = await accept(store, message("m1"))

    def work(tx: Tx, now: datetime) -> tuple[None, list[Event]]:
        tx.set_thread_status(first.thread_id, False, now)
        raise graph.GraphError("nope", "refused")

    with pytest.raises(graph.GraphError):
        await store.transact(work)
    (second,) = await accept(store, message("m2"))
    assert second.thread_id == first.thread_id
