"""Control messages applied to the store (the queue transport is covered in tests/e2e/test_support_day.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from storekit import POLICY, build_event, envelope, message, outbox_settings, store_settings

from gateway.control import Applied, apply_control
from gateway.store.sqlite import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = SQLiteStore(store_settings(tmp_path), outbox_settings())
    await instance.open()
    yield instance
    await instance.close()


def control(kind: str, thread_id: str, tenant: str = "acme") -> bytes:
    return orjson.dumps(
        {"type": kind, "thread_id": thread_id, "tenant": tenant, "at": "2025-03-01T10:00:00Z"}
    )


async def test_close_then_message_opens_new_thread_and_reopen_applies(store: SQLiteStore) -> None:
    (first,) = await store.accept(envelope(), [message("m1")], policies=[POLICY], build_event=build_event)

    assert await apply_control(store, control("thread.closed", first.thread_id)) is Applied.APPLIED
    (second,) = await store.accept(envelope(), [message("m2")], policies=[POLICY], build_event=build_event)
    assert second.thread_id != first.thread_id

    assert await apply_control(store, control("thread.closed", second.thread_id)) is Applied.APPLIED
    assert await apply_control(store, control("thread.reopened", first.thread_id)) is Applied.APPLIED
    (third,) = await store.accept(envelope(), [message("m3")], policies=[POLICY], build_event=build_event)
    assert third.thread_id == first.thread_id


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"type": "thread.deleted", "thread_id": "t", "tenant": "acme", "at": "2025-03-01T10:00:00Z"}',
        b'{"type": "thread.closed", "thread_id": "t", "tenant": "acme", "at": "2025-03-01T10:00:00"}',
        b'{"type": "thread.closed", "tenant": "acme", "at": "2025-03-01T10:00:00Z"}',
    ],
)
async def test_malformed_messages_are_rejected(store: SQLiteStore, body: bytes) -> None:
    assert await apply_control(store, body) is Applied.MALFORMED


async def test_unknown_thread_or_other_tenant_is_ignored(store: SQLiteStore) -> None:
    (first,) = await store.accept(envelope(), [message("m1")], policies=[POLICY], build_event=build_event)

    assert await apply_control(store, control("thread.closed", "thr_nope")) is Applied.UNKNOWN_THREAD
    assert (
        await apply_control(store, control("thread.closed", first.thread_id, "other"))
        is Applied.UNKNOWN_THREAD
    )
    (second,) = await store.accept(envelope(), [message("m2")], policies=[POLICY], build_event=build_event)
    assert second.thread_id == first.thread_id


async def test_store_fault_asks_for_a_retry(store: SQLiteStore) -> None:
    await store.close()
    assert await apply_control(store, control("thread.closed", "thr_x")) is Applied.RETRY
