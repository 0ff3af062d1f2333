"""Baseline: a bare aio-pika publisher with windowed confirms, no gateway code.

Publishes N persistent 1 KB messages to a fresh queue with up to ``window`` confirms outstanding and
prints msg/s. ``bench/ingest.py`` calls :func:`bare_publish_rate` to print the gateway's throughput as
a ratio of this (absolute figures vary too much between runs on the project's machines to compare).

    .venv/bin/python bench/publish_baseline.py --n 20000 --window 256
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import aio_pika

BODY = b"x" * 1024


async def bare_publish_rate(url: str, n: int, window: int) -> float:
    """Messages per second for ``n`` confirmed persistent publishes with ``window`` in flight."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(f"bench.baseline.{uuid.uuid4().hex[:8]}", durable=True)
        try:
            slots = asyncio.Semaphore(window)

            async def one(i: int) -> None:
                try:
                    message = aio_pika.Message(
                        BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(i)
                    )
                    await channel.default_exchange.publish(message, queue.name, mandatory=True, timeout=30)
                finally:
                    slots.release()

            tasks = []
            started = time.perf_counter()
            for i in range(n):
                await slots.acquire()
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - started
        finally:
            await queue.delete(if_unused=False, if_empty=False)
    return n / elapsed


async def gateway_publish_rate(url: str, n: int, window: int, batch: int = 256) -> float:
    """The same load through :class:`gateway.publisher.AmqpPublisher` (batches of outbox rows)."""
    from datetime import UTC, datetime

    from core.settings import BrokerSettings, QueueSettings
    from gateway.publisher import AmqpPublisher
    from gateway.store.base import OutboxRow

    suffix = uuid.uuid4().hex[:8]
    settings = BrokerSettings(
        url=url, exchange=f"bench.gw.{suffix}", max_in_flight=window, publish_timeout=30,
        queues=(QueueSettings(name=f"bench.gw.{suffix}"),),
    )
    now = datetime.now(UTC)
    rows = [
        OutboxRow(
            position=i, event_id=str(uuid.uuid4()), type="message.received",
            routing_key="bench.email.message.received", tenant="bench", channel="email",
            thread_id=f"t{i % 1000}", sequence=i // 1000 + 1, body=BODY, created_at=now,
        )
        for i in range(n)
    ]
    publisher = AmqpPublisher(settings)
    await publisher.start()
    try:
        started = time.perf_counter()
        for i in range(0, n, batch):
            await publisher.publish(rows[i : i + batch])
        elapsed = time.perf_counter() - started
    finally:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(settings.queues[0].name)
            await channel.exchange_delete(settings.exchange)
        await publisher.close()
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gateway", action="store_true", help="also run AmqpPublisher and print the ratio")
    args = parser.parse_args()
    rates = sorted(asyncio.run(bare_publish_rate(args.url, args.n, args.window)) for _ in range(args.runs))
    print(
        f"bare aio-pika, {args.n} x 1 KB persistent, window {args.window}: "
        f"median {rates[len(rates) // 2]:,.0f} msg/s (runs: {', '.join(f'{r:,.0f}' for r in rates)})"
    )
    if args.gateway:
        # Interleaved with fresh baseline runs so both see the same machine load.
        pairs = []
        for _ in range(args.runs):
            bare = asyncio.run(bare_publish_rate(args.url, args.n, args.window))
            gateway = asyncio.run(gateway_publish_rate(args.url, args.n, args.window))
            pairs.append((gateway / bare, gateway, bare))
        pairs.sort()
        ratio, gateway, bare = pairs[len(pairs) // 2]
        print(f"AmqpPublisher (batches of 256): {gateway:,.0f} msg/s = {ratio:.2f} x bare ({bare:,.0f})")


if __name__ == "__main__":
    main()
