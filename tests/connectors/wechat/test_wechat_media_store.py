"""The media fetch queue of the SQLite store (``Store.media_*``): durable, claimed with a lease."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.media import MediaFetch
from core.settings import OutboxSettings, StoreSettings
from gateway.store.sqlite import SQLiteStore

T0 = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


def settings(tmp_path: Path) -> StoreSettings:
    return StoreSettings.model_validate(
        {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = SQLiteStore(settings(tmp_path), OutboxSettings())
    await instance.open()
    yield instance
    await instance.close()


def fetch(ref: str, at: datetime = T0) -> MediaFetch:
    return MediaFetch(
        key=f"wechat/demo/{ref}",
        channel="wechat",
        inbox="demo",
        account="demo",
        ref=ref,
        kind="image",
        created_at=at,
    )


async def test_enqueue_is_insert_if_absent_and_claim_leases(store: SQLiteStore) -> None:
    await store.media_enqueue([fetch("a"), fetch("b", T0 + timedelta(seconds=1))])
    await store.media_enqueue([fetch("a")])  # a provider retry: nothing new

    claimed = await store.media_claim(T0 + timedelta(seconds=5), limit=10, lease=60, channel="wechat")
    assert [(f.ref, f.attempts) for f in claimed] == [("a", 1), ("b", 1)]
    # Leased: not due again until the lease runs out.
    assert await store.media_claim(T0 + timedelta(seconds=30), limit=10, lease=60, channel="wechat") == []
    again = await store.media_claim(T0 + timedelta(seconds=70), limit=1, lease=60, channel="wechat")
    assert [(f.ref, f.attempts) for f in again] == [("a", 2)]


async def test_done_keeps_the_bytes_and_failed_retries_or_gives_up(store: SQLiteStore) -> None:
    await store.media_enqueue([fetch("a"), fetch("b"), fetch("c")])
    await store.media_claim(T0, limit=10, lease=60, channel="wechat")

    digest = await store.media_done("wechat/demo/a", b"\x89PNG bytes", content_type="image/png", name="a.png")
    done = await store.media_get("wechat/demo/a")
    assert done is not None
    assert done.state == "done"
    assert (done.sha256, done.size, done.content_type, done.name) == (digest, 10, "image/png", "a.png")
    assert await store.read_blob(digest) == b"\x89PNG bytes"

    await store.media_failed("wechat/demo/b", "busy", retry_at=T0 + timedelta(seconds=120))
    await store.media_failed("wechat/demo/c", "invalid media_id", retry_at=None)
    assert await store.media_claim(T0 + timedelta(seconds=119), 10, 60, channel="wechat") == []
    # Each channel's fetcher claims only its own.
    assert await store.media_claim(T0 + timedelta(days=1), 10, 60, channel="wecom") == []
    due = await store.media_claim(T0 + timedelta(seconds=120), 10, 60, channel="wechat")
    assert [f.ref for f in due] == ["b"]
    failed = await store.media_get("wechat/demo/c")
    assert failed is not None
    assert (failed.state, failed.error) == ("failed", "invalid media_id")
    assert await store.media_get("wechat/demo/nope") is None


async def test_the_queue_survives_a_restart(tmp_path: Path) -> None:
    first = SQLiteStore(settings(tmp_path), OutboxSettings())
    await first.open()
    await first.media_enqueue([fetch("a")])
    await first.close()

    second = SQLiteStore(settings(tmp_path), OutboxSettings())
    await second.open()
    try:
        assert [f.ref for f in await second.media_claim(T0, 10, 60, channel="wechat")] == ["a"]
    finally:
        await second.close()
