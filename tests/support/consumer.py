"""A consumer that records what the bus actually delivered, for asserting on outcomes."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aio_pika
import aio_pika.abc


@dataclass(frozen=True, slots=True, kw_only=True)
class Received:
    """One delivered message with the properties a desk sees."""

    routing_key: str
    body: bytes
    message_id: str | None
    correlation_id: str | None
    type: str | None
    content_type: str | None
    delivery_mode: int | None
    timestamp: datetime | None
    app_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False


class Consumer:
    """Binds a queue to an exchange and records every delivery (acked after recording).

    Without ``queue`` it declares an exclusive auto-delete queue; with ``queue`` it consumes an
    existing one (e.g. a queue the publisher declared from settings).
    """

    def __init__(
        self, url: str, exchange: str, bindings: tuple[str, ...] = ("#",), *, queue: str | None = None
    ) -> None:
        self.url = url
        self.exchange = exchange
        self.bindings = bindings
        self.queue_name = queue
        self.received: list[Received] = []
        self._changed = asyncio.Condition()
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def start(self) -> Consumer:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=1000)
        if self.queue_name is None:
            exchange = await channel.declare_exchange(
                self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            for pattern in self.bindings:
                await queue.bind(exchange, routing_key=pattern)
        else:
            queue = await channel.get_queue(self.queue_name, ensure=True)
        await queue.consume(self._on_message)
        return self

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.received.append(
            Received(
                routing_key=message.routing_key or "",
                body=message.body,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                type=message.type,
                content_type=message.content_type,
                delivery_mode=int(message.delivery_mode) if message.delivery_mode is not None else None,
                timestamp=message.timestamp,
                app_id=message.app_id,
                headers=dict(message.headers or {}),
                redelivered=bool(message.redelivered),
            )
        )
        await message.ack()
        async with self._changed:
            self._changed.notify_all()

    def distinct(self) -> list[Received]:
        """First deliveries only, in arrival order: what a desk that drops repeats by message_id sees.

        Delivery is at-least-once (a confirm that times out under load is published again), so
        tests that count events count these; ``received`` and ``repeats()`` keep the raw stream.
        """
        seen: set[str] = set()
        first: list[Received] = []
        for delivery in self.received:
            key = delivery.message_id or f"no-id-{id(delivery)}"
            if key not in seen:
                seen.add(key)
                first.append(delivery)
        return first

    async def wait_for(self, count: int, within: float = 10.0) -> list[Received]:
        """Wait until at least ``count`` distinct messages arrived; return them (see ``distinct``)."""
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: len(self.distinct()) >= count)
        except TimeoutError:
            got = len(self.distinct())
            raise AssertionError(f"expected {count} messages within {within}s, got {got}") from None
        return self.distinct()

    async def wait_until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        """Wait until ``predicate()`` holds over what was received; AssertionError after ``within``."""
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(
                f"condition not met within {within}s ({len(self.received)} received)"
            ) from None

    async def wait_for_ids(self, ids: set[str], within: float = 10.0) -> list[Received]:
        """Wait until every message id in ``ids`` arrived at least once."""

        def done() -> bool:
            return ids <= {r.message_id for r in self.received}

        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            missing = ids - {r.message_id for r in self.received}
            raise AssertionError(f"{len(missing)} of {len(ids)} messages missing after {within}s") from None
        return list(self.received)

    def repeats(self) -> int:
        """How many deliveries were repeats of a message id already seen."""
        return sum(n - 1 for n in Counter(r.message_id for r in self.received).values())

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
