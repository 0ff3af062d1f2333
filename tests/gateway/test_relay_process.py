"""The relay child's view of the outbox when the parent's writer records what it published."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.relay_process import MarkThroughParent
from gateway.store.base import OutboxRow
from tests.support.outbox import FakeOutbox, thread_rows


class GatedOutbox(FakeOutbox):
    """A fetch that reads at once but returns only when the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.gate = asyncio.Event()

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        rows = await super().outbox_fetch(limit, after)  # the snapshot is taken now
        self.reading.set()
        await self.gate.wait()
        return rows


async def test_rows_sent_for_marking_are_not_fetched_again_before_the_parent_commits() -> None:
    store = FakeOutbox()
    store.rows.update({row.position: row for row in thread_rows(threads=2, per_thread=2)})
    sent: list[dict[str, Any]] = []
    view = MarkThroughParent(store, sent.append)  # type: ignore[arg-type]
    first = await view.outbox_fetch(10)
    await view.outbox_mark_published([row.position for row in first])
    assert sent == [{"op": "mark", "positions": [row.position for row in first]}]
    assert await view.outbox_fetch(10) == []  # not committed as published yet, but hidden
    await store.outbox_mark_published([row.position for row in first])
    view.settled([row.position for row in first])
    assert await view.outbox_fetch(10) == []


async def test_a_mark_settled_while_a_read_is_in_flight_does_not_republish() -> None:
    """The read may predate the parent's commit: what was pending when it started stays hidden."""
    store = GatedOutbox()
    store.rows.update({row.position: row for row in thread_rows(threads=1, per_thread=3)})
    view = MarkThroughParent(store, lambda message: None)  # type: ignore[arg-type]
    store.gate.set()
    first = await view.outbox_fetch(10)
    positions = [row.position for row in first]
    await view.outbox_mark_published(positions)
    store.gate.clear()
    store.reading.clear()

    fetch = asyncio.create_task(view.outbox_fetch(10))
    await store.reading.wait()  # the read saw the rows still unpublished ...
    await store.outbox_mark_published(positions)  # ... then the parent committed ...
    view.settled(positions)  # ... and said so before the read returned
    store.gate.set()
    assert await fetch == []


async def test_a_mark_the_parent_could_not_commit_is_fetched_again() -> None:
    store = FakeOutbox()
    store.rows.update({row.position: row for row in thread_rows(threads=1, per_thread=1)})
    view = MarkThroughParent(store, lambda message: None)  # type: ignore[arg-type]
    [row] = await view.outbox_fetch(10)
    await view.outbox_mark_published([row.position])
    view.settled([row.position])  # "unmarked": the parent's commit failed
    assert [r.position for r in await view.outbox_fetch(10)] == [row.position]


class CountingOutbox(FakeOutbox):
    """Records the positions of every row a fetch read from the store."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[list[int]] = []

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        rows = await super().outbox_fetch(limit, after)
        self.read.append([row.position for row in rows])
        return rows


async def test_a_round_does_not_read_the_rows_still_being_marked_again() -> None:
    store = CountingOutbox()
    rows = thread_rows(threads=2, per_thread=3)
    store.rows.update({row.position: row for row in rows[:4]})
    view = MarkThroughParent(store, lambda message: None)  # type: ignore[arg-type]
    first = await view.outbox_fetch(10)
    await view.outbox_mark_published([row.position for row in first])  # the parent has not answered
    store.rows.update({row.position: row for row in rows[4:]})
    second = await view.outbox_fetch(10)
    assert [row.position for row in second] == [5, 6]
    assert store.read[-1] == [5, 6]  # rows 1-4 were not read again


async def test_a_row_not_confirmed_is_fetched_again_after_later_rows_were_marked() -> None:
    store = CountingOutbox()
    store.rows.update({row.position: row for row in thread_rows(threads=3, per_thread=1)})
    view = MarkThroughParent(store, lambda message: None)  # type: ignore[arg-type]
    await view.outbox_fetch(10)
    await view.outbox_mark_published([1, 3])  # 2 was nacked
    assert [row.position for row in await view.outbox_fetch(10)] == [2]
    await view.outbox_mark_published([2])
    await store.outbox_mark_published([1, 3])
    view.settled([1, 3], published=True)
    assert await view.outbox_fetch(10) == []


async def test_a_row_whose_mark_failed_after_later_rounds_is_fetched_again() -> None:
    store = CountingOutbox()
    rows = thread_rows(threads=1, per_thread=4)
    store.rows.update({row.position: row for row in rows[:2]})
    view = MarkThroughParent(store, lambda message: None)  # type: ignore[arg-type]
    await view.outbox_mark_published([r.position for r in await view.outbox_fetch(10)])
    store.rows.update({row.position: row for row in rows[2:]})
    await view.outbox_mark_published([r.position for r in await view.outbox_fetch(10)])
    await store.outbox_mark_published([3, 4])
    view.settled([3, 4], published=True)
    view.settled([1, 2])  # "unmarked": the parent's commit of the first round failed
    assert [row.position for row in await view.outbox_fetch(10)] == [1, 2]
