"""SQLite specifics: group commit, batch isolation, blob files, schema versions, crash durability."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from storekit import POLICY, broken_builder, build_event, envelope, message, outbox_settings, store_settings

from core.errors import BacklogFull, StoreError
from core.model import Attachment, CanonicalMessage, Placement, RawEnvelope
from gateway.store.blobs import sha256_hex
from gateway.store.engine import OPEN_THREADS
from gateway.store.sqlite import MIGRATIONS, SQLiteStore

HERE = Path(__file__).parent


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = SQLiteStore(store_settings(tmp_path, inline_raw_max=1024), outbox_settings())
    await instance.open()
    yield instance
    await instance.close()


async def accept(
    store: SQLiteStore, *messages: CanonicalMessage, env: RawEnvelope | None = None
) -> list[Placement]:
    return await store.accept(
        env or envelope(), messages, policies=[POLICY] * len(messages), build_event=build_event
    )


async def test_concurrent_accepts_share_commits(store: SQLiteStore) -> None:
    before = store.stats.commits

    await asyncio.gather(*(accept(store, message(f"m{n}", email=f"c{n}@example.com")) for n in range(200)))

    commits = store.stats.commits - before
    assert 1 <= commits < 200
    assert store.stats.largest_batch > 1
    assert len(await store.outbox_fetch(500)) == 200


async def test_a_failing_job_does_not_fail_its_batch_siblings(store: SQLiteStore) -> None:
    before = store.stats.commits
    store.gather_next_batch(10)
    calls = [
        store.accept(
            envelope(f"body {n}".encode()),
            [message(f"m{n}")],
            policies=[POLICY],
            build_event=broken_builder if n == 4 else build_event,
        )
        for n in range(10)
    ]

    results = await asyncio.gather(*calls, return_exceptions=True)

    assert store.stats.commits - before == 1
    assert isinstance(results[4], RuntimeError)
    placed = [r[0] for n, r in enumerate(results) if n != 4 and isinstance(r, list)]
    assert len(placed) == 9
    # The failed job's sequence number was rolled back with it: no gap in the thread.
    assert sorted(p.sequence for p in placed) == list(range(1, 10))
    assert len({p.thread_id for p in placed}) == 1
    assert len(await store.outbox_fetch(20)) == 9
    (retried,) = await accept(store, message("m4"))
    assert not retried.duplicate
    assert retried.sequence == 10


async def test_batches_respect_commit_max_batch(tmp_path: Path) -> None:
    store = SQLiteStore(store_settings(tmp_path, commit_max_batch=4), outbox_settings())
    await store.open()
    try:
        store.gather_next_batch(10)
        await asyncio.gather(*(accept(store, message(f"m{n}")) for n in range(10)))
        assert store.stats.largest_batch == 4
    finally:
        await store.close()


async def test_large_raw_bodies_and_attachments_are_files_small_bodies_are_not(
    store: SQLiteStore, tmp_path: Path
) -> None:
    blobs = tmp_path / "blobs"
    small = envelope(b"s" * 1024)
    large = envelope(b"L" * 4096)
    attachment = Attachment(name="invoice.pdf", content_type="application/pdf", data=b"%PDF-1.7 ...")

    await accept(store, message("m1"), env=small)
    await accept(store, message("m2", attachments=(attachment,)), env=large)

    files = {p.name: p for p in blobs.rglob("*") if p.is_file()}
    large_sha, attachment_sha = sha256_hex(large.body), attachment.sha256
    assert set(files) == {large_sha, attachment_sha}
    assert files[large_sha] == blobs / large_sha[:2] / large_sha
    assert files[large_sha].read_bytes() == large.body
    assert await store.read_blob(sha256_hex(small.body)) == small.body
    assert await store.read_blob(large_sha) == large.body
    assert await store.read_blob(attachment_sha) == attachment.data
    provenance = [orjson.loads(r.body)["provenance"]["raw_ref"] for r in await store.outbox_fetch(10)]
    assert provenance == [f"blob:sha256:{sha256_hex(small.body)}", f"blob:sha256:{large_sha}"]


async def test_quarantined_large_body_round_trips_through_a_file(store: SQLiteStore) -> None:
    raw = envelope(bytes(range(256)) * 40)
    record = await store.quarantine(raw, "undecodable")

    got = await store.quarantine_get(record.id)

    assert got is not None
    assert got[1].body == raw.body


async def test_schema_is_versioned_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    settings = store_settings(tmp_path)
    store = SQLiteStore(settings, outbox_settings())
    await store.open()
    await store.close()
    with sqlite3.connect(settings.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    with pytest.raises(StoreError, match="newer"):
        await SQLiteStore(settings, outbox_settings()).open()


async def test_texts_and_threads_from_before_migrations_14_and_15_are_found_after_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Migration 14 rebuilds recent_texts under another key, 15 re-indexes open threads: what was
    # stored before them must still be found.
    text = "My parcel 88231 never arrived and the tracking page has not moved since Monday."
    settings = store_settings(tmp_path)
    monkeypatch.setattr("gateway.store.sqlite.MIGRATIONS", MIGRATIONS[:13])
    old = SQLiteStore(settings, outbox_settings())
    await old.open()
    (first,) = await accept(old, message("m1", channel="form", text=text))
    await old.close()
    monkeypatch.setattr("gateway.store.sqlite.MIGRATIONS", MIGRATIONS)

    new = SQLiteStore(settings, outbox_settings())
    await new.open()
    try:
        (again,) = await accept(new, message("m2", channel="email", text=text))
        (later,) = await accept(new, message("m3", channel="email", text="And no one answers my mails."))
    finally:
        await new.close()

    assert again.duplicate_of == first.message_id
    assert again.thread_id == first.thread_id
    assert (later.thread_id, later.sequence, later.is_new_thread) == (first.thread_id, 3, False)


def test_open_threads_are_read_through_the_open_threads_index(tmp_path: Path) -> None:
    # Without an index that starts with the customer, SQLite reads a tenant's every thread in
    # number order (the UNIQUE (tenant, number) index) to find one customer's open threads.
    conn = sqlite3.connect(tmp_path / "plan.db")
    for migration in MIGRATIONS:
        conn.executescript(migration)
    plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {OPEN_THREADS}", (1, 2, 3, 4)))
    conn.close()

    assert "USING INDEX threads_open (customer_id=? AND tenant=? AND inbox=?)" in plan


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    store = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await store.open()
    await store.close()

    with pytest.raises(StoreError):
        await accept(store, message("m1"))


async def test_a_store_opened_for_reading_reads_the_outbox_and_writes_nothing(tmp_path: Path) -> None:
    """The relay process's handle: what the gateway committed, without a writer or checkpointer."""
    writing = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await writing.open()
    threads_before = {t.name for t in threading.enumerate()}
    reading = SQLiteStore(store_settings(tmp_path), outbox_settings(), reads_only=True)
    await reading.open()
    try:
        started = {t.name for t in threading.enumerate()} - threads_before
        assert not any(name.startswith(("tg-store-writer", "tg-store-checkpoint")) for name in started)
        await accept(writing, message("m1"))
        rows = await reading.outbox_fetch(10)
        assert len(rows) == 1
        assert (await reading.outbox_status()).backlog == 1
        with pytest.raises(StoreError, match="reading only"):
            await reading.outbox_mark_published([rows[0].position])
        assert (await writing.outbox_status()).backlog == 1
    finally:
        await reading.close()
        await writing.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from storekit import POLICY, build_event, envelope, message, outbox_settings, store_settings
    from gateway.store.sqlite import SQLiteStore

    async def one(store, n):
        await store.accept(envelope(f"body {n}".encode()), [message(f"m{n}", email=f"c{n % 7}@example.com")],
                           policies=[POLICY], build_event=build_event)
        print(f"m{n}", flush=True)

    async def main():
        store = SQLiteStore(store_settings(Path(sys.argv[1])), outbox_settings())
        await store.open()
        n = 0
        while True:
            await asyncio.gather(*(one(store, n + k) for k in range(16)))
            n += 16

    asyncio.run(main())
    """
)


async def test_acknowledged_accepts_survive_sigkill(tmp_path: Path) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(tmp_path), str(HERE), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    acked: list[str] = []
    try:
        while len(acked) < 300:
            line = await child.stdout.readline()
            assert line, "child exited early"
            acked.append(line.decode().strip())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    store = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await store.open()
    try:
        again = await asyncio.gather(*(accept(store, message(ext, email="x@example.com")) for ext in acked))
        assert all(p.duplicate for (p,) in again)
        rows = await store.outbox_fetch(100_000)
        assert len(rows) >= len(acked)
        # Per-thread sequences are gap-free even for the commit the kill interrupted.
        by_thread: dict[str | None, list[int | None]] = {}
        for row in rows:
            by_thread.setdefault(row.thread_id, []).append(row.sequence)
        assert all(seqs == list(range(1, len(seqs) + 1)) for seqs in by_thread.values())
    finally:
        await store.close()
    with sqlite3.connect(tmp_path / "tg.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_events_published_by_another_process_free_room_in_the_backlog(tmp_path: Path) -> None:
    """The relay may run in its own process with its own store handle; the bound must see its marks."""
    accepting = SQLiteStore(store_settings(tmp_path), outbox_settings(max_backlog=3))
    relaying = SQLiteStore(store_settings(tmp_path), outbox_settings(max_backlog=3))
    await accepting.open()
    await relaying.open()
    try:
        for n in range(3):
            await accepting.accept(envelope(), [message(f"m{n}")], policies=[POLICY], build_event=build_event)
        with pytest.raises(BacklogFull):
            await accepting.accept(envelope(), [message("m3")], policies=[POLICY], build_event=build_event)
        rows = await relaying.outbox_fetch(10)
        await relaying.outbox_mark_published([row.position for row in rows[:2]])
        await accepting.accept(envelope(), [message("m3")], policies=[POLICY], build_event=build_event)
        await accepting.accept(envelope(), [message("m4")], policies=[POLICY], build_event=build_event)
        with pytest.raises(BacklogFull):
            await accepting.accept(envelope(), [message("m5")], policies=[POLICY], build_event=build_event)
    finally:
        await relaying.close()
        await accepting.close()


async def test_a_batch_run_again_after_its_last_job_failed_keeps_siblings_once(store: SQLiteStore) -> None:
    """Placements and outbox marks share a batch without savepoints; when a job fails the batch is
    rolled back and run again, each job in its own savepoint."""
    (earlier,) = await accept(store, message("m0"))
    (row,) = await store.outbox_fetch(10)
    before = store.stats.commits
    store.gather_next_batch(5)
    results = await asyncio.gather(
        *(accept(store, message(f"m{n}")) for n in range(1, 4)),
        store.outbox_mark_published([row.position]),
        store.accept(envelope(b"broken"), [message("m9")], policies=[POLICY], build_event=broken_builder),
        return_exceptions=True,
    )

    assert store.stats.commits - before == 1
    assert isinstance(results[4], RuntimeError)
    placed = [r[0] for r in results[:3] if isinstance(r, list)]
    assert [p.sequence for p in placed] == [2, 3, 4]
    assert {p.thread_id for p in placed} == {earlier.thread_id}
    assert [r.sequence for r in await store.outbox_fetch(10)] == [2, 3, 4]
    assert (await store.outbox_status()).published_total == 1
