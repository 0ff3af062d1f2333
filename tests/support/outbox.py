"""An in-memory outbox (the four outbox methods of the Store protocol) and row builders."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from core import events
from core.events import CustomerView, Event
from core.model import CanonicalMessage, Identity, Placement
from gateway.store.base import OutboxRow, OutboxStatus


class FakeOutbox:
    """Keeps rows in a dict by position; ``changed`` is notified on every enqueue and mark."""

    def __init__(self) -> None:
        self.rows: dict[int, OutboxRow] = {}
        self.published: set[int] = set()
        self.mark_calls: list[list[int]] = []
        self.fail_fetch: Exception | None = None
        self._next = 1
        self.changed = asyncio.Condition()

    async def enqueue(self, items: Sequence[Event]) -> list[OutboxRow]:
        added = []
        for event in items:
            row = row_from_event(event, self._next)
            self.rows[row.position] = row
            added.append(row)
            self._next += 1
        async with self.changed:
            self.changed.notify_all()
        return added

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        if self.fail_fetch is not None:
            raise self.fail_fetch
        pending = sorted(p for p in self.rows if p > after and p not in self.published)
        return [self.rows[p] for p in pending[:limit]]

    async def outbox_mark_published(self, positions: Sequence[int]) -> None:
        self.mark_calls.append(list(positions))
        self.published.update(positions)
        async with self.changed:
            self.changed.notify_all()

    async def outbox_status(self) -> OutboxStatus:
        pending = [self.rows[p] for p in self.rows if p not in self.published]
        return OutboxStatus(
            backlog=len(pending),
            oldest_created_at=min((r.created_at for r in pending), default=None),
            published_total=len(self.published),
        )

    @property
    def backlog(self) -> int:
        return len(self.rows) - len(self.published)

    async def wait(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(predicate)


def row_from_event(event: Event, position: int) -> OutboxRow:
    return OutboxRow(
        position=position,
        event_id=event.event_id,
        type=event.type,
        routing_key=event.routing_key,
        tenant=event.tenant,
        channel=event.channel,
        thread_id=event.thread_id,
        sequence=event.sequence,
        body=event.body,
        created_at=event.occurred_at,
    )


def thread_event(
    thread: str, sequence: int, *, tenant: str = "acme", channel: str = "email", text: str = "hello"
) -> Event:
    """A real ``message.received`` event on ``thread`` with the given per-thread sequence."""
    now = datetime.now(UTC)
    message = CanonicalMessage(
        channel=channel, tenant=tenant, inbox="support@acme.test", external_id=f"{thread}-{sequence}",
        received_at=now, subject="Order", text=text,
        identities=(Identity(kind="email", value="ana@example.test", verified=True),),
    )
    placement = Placement(
        message_id=message.message_id(), thread_id=thread, customer_id="c-1", sequence=sequence,
        is_new_thread=sequence == 1,
    )
    customer = CustomerView(id="c-1", identities=message.identities, display_name="Ana")
    return events.message_received(
        message, placement=placement, customer=customer, thread_subject="Order", raw_ref=None,
        signature_verified=True, retry=0, public_url=None, occurred_at=now,
    )


def thread_rows(threads: int, per_thread: int, *, start: int = 1) -> list[OutboxRow]:
    """Rows interleaved across threads ``t0..tN`` with sequences 1..per_thread, in outbox order."""
    rows = []
    position = start
    for sequence in range(1, per_thread + 1):
        for t in range(threads):
            rows.append(row_from_event(thread_event(f"t{t}", sequence), position))
            position += 1
    return rows
