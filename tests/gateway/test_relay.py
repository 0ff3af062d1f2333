"""Outbox relay: unit tests on MemoryPublisher + an in-memory outbox, integration through a cut proxy."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from core.errors import StoreError
from core.settings import BrokerSettings, OutboxSettings, QueueSettings, StoreSettings
from gateway.publisher import AmqpPublisher, MemoryPublisher, PublishedMessage
from gateway.relay import OutboxRelay
from tests.support.consumer import Consumer
from tests.support.outbox import FakeOutbox, thread_event
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event
from tests.support.tcpproxy import TcpProxy

# A long poll interval proves that wake() (not polling) drives publishing in these tests.
SETTINGS = OutboxSettings(batch_size=16, poll_interval=60.0, drain_timeout=2.0)


class Recorder:
    """A metrics sink that records what the relay reported."""

    def __init__(self) -> None:
        self.confirmed = 0
        self.failures: list[str] = []
        self.statuses: list[tuple[int, float | None]] = []
        self._failed = asyncio.Event()

    async def wait_failures(self, count: int, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while len(self.failures) < count:
                self._failed.clear()
                await self._failed.wait()

    def publish_confirmed(self, n: int) -> None:
        self.confirmed += n

    def publish_failed(self, reason: str) -> None:
        self.failures.append(reason)
        self._failed.set()

    def outbox_status(self, backlog: int, oldest_age: float | None) -> None:
        self.statuses.append((backlog, oldest_age))


@pytest.fixture
async def bus() -> AsyncIterator[MemoryPublisher]:
    publisher = MemoryPublisher(max_in_flight=4)
    await publisher.start()
    yield publisher
    await publisher.close()


@pytest.fixture
async def relay_parts(bus: MemoryPublisher) -> AsyncIterator[tuple[FakeOutbox, OutboxRelay, Recorder]]:
    outbox = FakeOutbox()
    metrics = Recorder()
    relay = OutboxRelay(outbox, bus, SETTINGS, metrics, backoff_initial=0.01, backoff_max=0.05)
    await relay.start()
    yield outbox, relay, metrics
    await relay.stop()


async def enqueue(outbox: FakeOutbox, threads: int, per_thread: int, *, start: int = 1) -> list[str]:
    evs = [thread_event(f"t{t}", s) for s in range(start, start + per_thread) for t in range(threads)]
    await outbox.enqueue(evs)
    return [e.event_id for e in evs]


def assert_thread_order(published: Sequence[PublishedMessage]) -> None:
    """First deliveries of each thread carry increasing sequences (repeats are allowed, gaps are not)."""
    seen: set[str] = set()
    per_thread: dict[str | None, list[int]] = defaultdict(list)
    for message in published:
        if message.message_id in seen:
            continue
        seen.add(message.message_id)
        per_thread[message.correlation_id].append(message.headers["sequence"])
    for thread, sequences in per_thread.items():
        assert sequences == list(range(1, len(sequences) + 1)), thread


async def test_publishes_in_order_and_marks_after_confirm(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, metrics = relay_parts
    ids = await enqueue(outbox, threads=3, per_thread=20)
    relay.wake()

    await outbox.wait(lambda: outbox.backlog == 0)

    assert [m.message_id for m in bus.published] == ids  # one channel, in outbox order
    assert relay.status.published_total == 60
    assert metrics.confirmed == 60
    assert relay.status.connected
    assert relay.status.last_error is None


async def test_wake_publishes_without_waiting_for_the_poll(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, _ = relay_parts
    for round_ in range(1, 4):
        await enqueue(outbox, threads=1, per_thread=1, start=round_)
        relay.wake()
        await outbox.wait(lambda: outbox.backlog == 0, within=2.0)
    assert_thread_order(bus.published)
    assert len(bus.published) == 3


async def test_broker_outage_loses_nothing_and_keeps_thread_order(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, metrics = relay_parts
    bus.down = True
    ids = await enqueue(outbox, threads=4, per_thread=10)
    relay.wake()
    await metrics.wait_failures(3)  # it keeps retrying

    assert outbox.backlog == 40  # nothing marked while nothing was confirmed
    assert not relay.status.connected
    assert "not connected" in (relay.status.last_error or "")
    assert metrics.failures[0] == "not_connected"

    bus.down = False
    await outbox.wait(lambda: outbox.backlog == 0)
    assert sorted(m.message_id for m in bus.published) == sorted(ids)
    assert_thread_order(bus.published)
    assert relay.status.last_error is None


async def test_connection_lost_mid_batch_republishes_from_the_first_unconfirmed(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, _ = relay_parts
    bus.fail_after = 5  # five confirms, then the 'connection' drops
    ids = await enqueue(outbox, threads=3, per_thread=5)
    relay.wake()
    await outbox.wait(lambda: outbox.backlog == 10)
    assert len(bus.published) == 5

    bus.fail_after = None
    relay.wake()  # ignored while backing off; the backoff is short
    await outbox.wait(lambda: outbox.backlog == 0)
    delivered = [m.message_id for m in bus.published]
    assert set(delivered) == set(ids)
    assert len(delivered) == len(ids)  # confirmed rows were marked, so nothing was sent twice
    assert_thread_order(bus.published)


async def test_a_refused_event_holds_its_thread_but_not_the_others(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, metrics = relay_parts
    ids = await enqueue(outbox, threads=2, per_thread=3)  # order: t0/1, t1/1, t0/2, t1/2, t0/3, t1/3
    bus.nack.add(ids[2])  # t0 sequence 2
    relay.wake()
    await outbox.wait(lambda: outbox.backlog == 2)  # t0/2 and t0/3 held

    assert {m.correlation_id for m in bus.published[1:]} == {"t1"}
    assert "nack" in metrics.failures
    bus.nack.clear()
    await outbox.wait(lambda: outbox.backlog == 0)
    assert_thread_order(bus.published)


async def test_store_failure_is_retried(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, metrics = relay_parts
    outbox.fail_fetch = StoreError("disk I/O error")
    await enqueue(outbox, threads=1, per_thread=2)
    relay.wake()
    await metrics.wait_failures(1)
    assert metrics.failures[0] == "store"
    assert relay.status.last_error == "disk I/O error"
    outbox.fail_fetch = None
    await outbox.wait(lambda: outbox.backlog == 0)
    assert relay.status.running


async def test_reports_backlog_to_metrics(
    relay_parts: tuple[FakeOutbox, OutboxRelay, Recorder], bus: MemoryPublisher
) -> None:
    outbox, relay, metrics = relay_parts
    await enqueue(outbox, threads=1, per_thread=2)
    relay.wake()
    await outbox.wait(lambda: outbox.backlog == 0)
    assert await relay.drain(1.0)
    assert metrics.statuses[-1] == (0, None)
    assert relay.status.backlog == 0


async def test_drain_flushes_then_stops(bus: MemoryPublisher) -> None:
    outbox = FakeOutbox()
    relay = OutboxRelay(outbox, bus, SETTINGS)
    await relay.start()
    await enqueue(outbox, threads=2, per_thread=40)  # several batches, no wake: drain must flush

    assert await relay.drain(5.0)
    assert outbox.backlog == 0
    assert not relay.status.running


async def test_drain_gives_up_after_its_timeout_and_keeps_the_rows(bus: MemoryPublisher) -> None:
    outbox = FakeOutbox()
    relay = OutboxRelay(outbox, bus, SETTINGS, backoff_initial=0.01, backoff_max=0.05)
    await relay.start()
    bus.down = True
    await enqueue(outbox, threads=1, per_thread=3)
    loop = asyncio.get_running_loop()
    started = loop.time()

    assert not await relay.drain(0.3)

    assert 0.3 <= loop.time() - started < 2.0
    assert outbox.backlog == 3
    assert not relay.status.running


# -- against RabbitMQ, through a proxy that is cut and restored ----------------------------------


@pytest.mark.integration
async def test_outage_through_a_cut_proxy_loses_nothing(
    amqp_url: str, amqp_names: Janitor, broker_proxy: TcpProxy
) -> None:
    queue = amqp_names.queue("relay")
    broker = BrokerSettings(
        url=broker_proxy.url(), exchange=amqp_names.exchange(), publish_timeout=1.0, reconnect_interval=0.1,
        max_in_flight=32, queues=(QueueSettings(name=queue, bindings=("acme.#",)),),
    )
    publisher = AmqpPublisher(broker)
    await publisher.start()
    consumer = await Consumer(amqp_url, broker.exchange, queue=queue).start()
    outbox = FakeOutbox()
    metrics = Recorder()
    relay = OutboxRelay(outbox, publisher, SETTINGS, metrics, backoff_initial=0.05, backoff_max=0.3)
    await relay.start()
    try:
        before = await enqueue(outbox, threads=4, per_thread=5)
        relay.wake()
        await consumer.wait_for_ids(set(before))

        broker_proxy.cut()
        during = await enqueue(outbox, threads=4, per_thread=25, start=6)
        relay.wake()
        await metrics.wait_failures(2)  # it noticed, and keeps retrying
        assert outbox.backlog > 0
        assert relay.status.last_error is not None

        broker_proxy.restore()
        everything = set(before) | set(during)
        received = await consumer.wait_for_ids(everything, within=30.0)
        await outbox.wait(lambda: outbox.backlog == 0)

        ids = [r.message_id for r in received]
        assert set(ids) == everything  # zero loss, nothing foreign
        repeats = consumer.repeats()  # at-least-once: allowed, reported, not required to be zero
        first_seen: dict[str, int] = {}
        per_thread: dict[str | None, list[int]] = defaultdict(list)
        for r in received:
            if r.message_id not in first_seen:
                first_seen[r.message_id or ""] = 1
                per_thread[r.correlation_id].append(int(r.headers["sequence"]))
                validate_event(r.body)
        for thread, sequences in per_thread.items():
            assert sequences == list(range(1, 31)), thread
        assert broker_proxy.connections_total >= 2  # it really reconnected
        print(f"outage: {len(during)} events during the cut, {repeats} repeats")
    finally:
        await relay.stop()
        await consumer.close()
        await publisher.close()


@pytest.mark.integration
async def test_relay_over_the_sqlite_store_through_an_outage(
    tmp_path: Path, amqp_url: str, amqp_names: Janitor, broker_proxy: TcpProxy
) -> None:
    from gateway.store.sqlite import SQLiteStore

    store = SQLiteStore(StoreSettings(path=tmp_path / "tg.db", blob_dir=tmp_path / "blobs"), SETTINGS)
    await store.open()
    queue = amqp_names.queue("sqlite")
    broker = BrokerSettings(
        url=broker_proxy.url(), exchange=amqp_names.exchange(), publish_timeout=1.0, reconnect_interval=0.1,
        queues=(QueueSettings(name=queue),),
    )
    publisher = AmqpPublisher(broker)
    await publisher.start()
    consumer = await Consumer(amqp_url, broker.exchange, queue=queue).start()
    metrics = Recorder()
    relay = OutboxRelay(store, publisher, SETTINGS, metrics, backoff_initial=0.05, backoff_max=0.3)
    await relay.start()
    try:
        broker_proxy.cut()
        evs = [thread_event(f"t{t}", s) for s in range(1, 11) for t in range(3)]
        await store.enqueue(evs)
        relay.wake()
        await metrics.wait_failures(1)
        assert (await store.outbox_status()).backlog == 30
        broker_proxy.restore()
        received = await consumer.wait_for_ids({e.event_id for e in evs}, within=30.0)
        assert await relay.drain(5.0)
        assert (await store.outbox_status()).backlog == 0
        per_thread: dict[str | None, list[int]] = defaultdict(list)
        seen: set[str | None] = set()
        for r in received:
            if r.message_id not in seen:
                seen.add(r.message_id)
                per_thread[r.correlation_id].append(int(r.headers["sequence"]))
        assert all(seqs == list(range(1, 11)) for seqs in per_thread.values())
    finally:
        await relay.stop()
        await consumer.close()
        await publisher.close()
        await store.close()


async def test_on_wait_is_told_each_time_the_relay_has_published_all_and_waits(bus: MemoryPublisher) -> None:
    outbox = FakeOutbox()
    waits: list[int] = []
    told = asyncio.Event()

    def on_wait() -> None:
        waits.append(len(bus.published))
        told.set()

    relay = OutboxRelay(outbox, bus, SETTINGS, on_wait=on_wait)
    await relay.start()
    try:
        async with asyncio.timeout(5):
            await told.wait()
        assert waits == [0]  # nothing to publish at start
        told.clear()
        await enqueue(outbox, threads=2, per_thread=20)  # more than one batch
        relay.wake()
        async with asyncio.timeout(5):
            await told.wait()
        assert waits == [0, 40]  # said once, after the last batch, not after each one
    finally:
        await relay.stop()
