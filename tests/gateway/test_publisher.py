"""Publisher contract: the same tests against MemoryPublisher and AmqpPublisher on a real RabbitMQ."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aio_pika
import aiormq.exceptions
import pytest

from core import events
from core.errors import ConfigError, PublishError
from core.settings import BrokerSettings, QueueSettings
from gateway.publisher import AmqpPublisher, BatchPublishError, MemoryPublisher, Publisher, topic_matches
from gateway.store.base import OutboxRow
from tests.support.consumer import Consumer, Received
from tests.support.outbox import row_from_event, thread_event, thread_rows
from tests.support.rabbitmq import Janitor
from tests.support.tcpproxy import TcpProxy


@dataclass
class Bus:
    publisher: Publisher
    delivered: Callable[[int], Awaitable[list[Received]]]  # wait until n arrived, return all
    persistent_mode: int | None  # the delivery_mode a consumer sees (None: memory keeps no mode)


BusFactory = Callable[[tuple[str, ...]], Awaitable[Bus]]


@pytest.fixture(params=["memory", pytest.param("amqp", marks=pytest.mark.integration)])
def bus_kind(request: pytest.FixtureRequest) -> tuple[str, Janitor | None]:
    if request.param == "memory":
        return "memory", None
    # Resolved here (a sync fixture) because an async fixture cannot resolve others dynamically.
    return "amqp", Janitor(request.getfixturevalue("amqp_url"))


@pytest.fixture
async def make_bus(bus_kind: tuple[str, Janitor | None]) -> AsyncIterator[BusFactory]:
    """Builds a started publisher whose events land in a queue bound with the given patterns."""
    closers: list[Callable[[], Awaitable[None]]] = []
    kind, names = bus_kind

    if kind == "memory" or names is None:
        async def factory(bindings: tuple[str, ...]) -> Bus:
            publisher = MemoryPublisher(bindings=bindings, max_in_flight=8)
            await publisher.start()
            closers.append(publisher.close)

            async def delivered(n: int) -> list[Received]:
                return [_received(m) for m in publisher.published]

            return Bus(publisher, delivered, None)
    else:
        url = names.url
        closers.append(names.clean)

        async def factory(bindings: tuple[str, ...]) -> Bus:
            queue = names.queue()
            queues = (QueueSettings(name=queue, bindings=bindings),) if bindings else ()
            settings = BrokerSettings(
                url=url, exchange=names.exchange(), queues=queues, publish_timeout=5.0, max_in_flight=8
            )
            publisher = AmqpPublisher(settings)
            await publisher.start()
            closers.append(publisher.close)
            assert publisher.connected
            if not bindings:
                return Bus(publisher, _nothing, 2)
            consumer = await Consumer(url, settings.exchange, queue=queue).start()
            closers.append(consumer.close)
            return Bus(publisher, consumer.wait_for, 2)

    yield factory
    for close in reversed(closers):
        await close()


async def _nothing(n: int) -> list[Received]:
    return []


def _received(m: object) -> Received:
    fields = dataclasses.asdict(m)  # type: ignore[call-overload]
    return Received(
        routing_key=fields["routing_key"], body=fields["body"], message_id=fields["message_id"],
        correlation_id=fields["correlation_id"], type=fields["type"], content_type=fields["content_type"],
        delivery_mode=None, timestamp=None, app_id="ticketgate", headers=fields["headers"],
    )


async def test_delivers_every_row_with_the_contract_properties(make_bus: BusFactory) -> None:
    bus = await make_bus(("#",))
    rows = [row_from_event(thread_event("th-1", 7), 1), row_from_event(thread_event("th-2", 1), 2)]

    await bus.publisher.publish(rows)
    got = await bus.delivered(2)

    assert [r.message_id for r in got] == [row.event_id for row in rows]
    first = got[0]
    assert first.body == rows[0].body
    assert first.routing_key == "acme.email.message.received"
    assert first.correlation_id == "th-1"
    assert first.type == "message.received"
    assert first.content_type == "application/json"
    assert first.delivery_mode == bus.persistent_mode
    assert first.headers == {
        "schema": "ticketgate.event/1", "tenant": "acme", "channel": "email", "sequence": 7
    }


async def test_unroutable_event_raises_and_is_not_counted(make_bus: BusFactory) -> None:
    bus = await make_bus(("*.*.message.received",))
    merged = events.thread_merged(
        tenant="acme", channel="email", surviving_thread="th-9", merged_threads=["th-8"], reason="ref",
        occurred_at=thread_event("x", 1).occurred_at,
    )
    rows = [row_from_event(merged, 1), row_from_event(thread_event("th-1", 1), 2)]

    with pytest.raises(PublishError) as caught:
        await bus.publisher.publish(rows)

    assert isinstance(caught.value, BatchPublishError)
    assert caught.value.confirmed == {2}
    assert "returned" in str(caught.value)
    got = await bus.delivered(1)
    assert [r.message_id for r in got] == [rows[1].event_id]


async def test_failed_row_holds_back_the_rest_of_its_thread_only(make_bus: BusFactory) -> None:
    bus = await make_bus(("*.*.message.received",))
    blocker = events.thread_merged(
        tenant="acme", channel="email", surviving_thread="th-A", merged_threads=[], reason="ref",
        occurred_at=thread_event("x", 1).occurred_at,
    )
    rows = [
        row_from_event(blocker, 1),  # unroutable, thread th-A
        row_from_event(thread_event("th-A", 2), 2),  # same thread: must not overtake
        row_from_event(thread_event("th-B", 1), 3),  # another thread: goes ahead
    ]

    with pytest.raises(BatchPublishError) as caught:
        await bus.publisher.publish(rows)

    assert caught.value.confirmed == {3}
    got = await bus.delivered(1)
    assert [r.correlation_id for r in got] == ["th-B"]


async def test_keeps_per_thread_order_with_many_in_flight(make_bus: BusFactory) -> None:
    bus = await make_bus(("#",))
    rows = thread_rows(threads=5, per_thread=20)

    await bus.publisher.publish(rows)
    got = await bus.delivered(len(rows))

    assert sorted(r.message_id or "" for r in got) == sorted(row.event_id for row in rows)
    for thread in {r.correlation_id for r in got}:
        sequences = [r.headers["sequence"] for r in got if r.correlation_id == thread]
        assert sequences == sorted(sequences), thread


async def test_empty_batch_is_a_no_op(make_bus: BusFactory) -> None:
    bus = await make_bus(("#",))
    await bus.publisher.publish([])
    assert await bus.delivered(0) == []


async def test_memory_publisher_down_fails_every_row() -> None:
    publisher = MemoryPublisher()
    await publisher.start()
    publisher.down = True
    rows = thread_rows(threads=2, per_thread=2)

    with pytest.raises(BatchPublishError) as caught:
        await publisher.publish(rows)

    assert caught.value.confirmed == frozenset()
    assert not publisher.connected
    assert publisher.published == []


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("#", "acme.email.message.received", True),
        ("acme.#", "acme.email.message.received", True),
        ("*.wechat.#", "acme.email.message.received", False),
        ("*.*.message.received", "acme.email.message.received", True),
        ("*.*.message.*", "acme.email.thread.merged", False),
        ("acme.*", "acme.email.message.received", False),
    ],
)
def test_topic_matching_follows_amqp(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


# -- AMQP only -----------------------------------------------------------------------------------


@pytest.mark.integration
async def test_quorum_queue_is_declared_and_receives(amqp_url: str, amqp_names: Janitor) -> None:
    queue = amqp_names.queue("quorum")
    settings = BrokerSettings(
        url=amqp_url, exchange=amqp_names.exchange(),
        queues=(QueueSettings(name=queue, bindings=("acme.#",), quorum=True),),
    )
    publisher = AmqpPublisher(settings)
    await publisher.start()
    consumer = await Consumer(amqp_url, settings.exchange, queue=queue).start()
    try:
        row = row_from_event(thread_event("th-q", 1), 1)
        await publisher.publish([row])
        got = await consumer.wait_for(1)
        assert got[0].message_id == row.event_id
        # A classic declaration of the same name is refused only because the queue is a quorum queue.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "classic"})
    finally:
        await consumer.close()
        await publisher.close()


@pytest.mark.integration
async def test_topology_mismatch_is_a_config_error(amqp_url: str, amqp_names: Janitor) -> None:
    queue = amqp_names.queue("mismatch")
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)  # classic
    settings = BrokerSettings(
        url=amqp_url, exchange=amqp_names.exchange(), queues=(QueueSettings(name=queue, quorum=True),)
    )
    publisher = AmqpPublisher(settings)
    with pytest.raises(ConfigError, match="broker"):
        await publisher.start()
    await publisher.close()


@pytest.mark.integration
async def test_stalled_broker_times_out(amqp_names: Janitor, broker_proxy: TcpProxy) -> None:
    settings = BrokerSettings(
        url=broker_proxy.url(), exchange=amqp_names.exchange(), publish_timeout=0.5,
        queues=(QueueSettings(name=amqp_names.queue()),),
    )
    publisher = AmqpPublisher(settings)
    await publisher.start()
    try:
        broker_proxy.stall()
        rows = thread_rows(threads=2, per_thread=2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BatchPublishError, match="timeout") as caught:
            await publisher.publish(rows)
        assert caught.value.confirmed == frozenset()
        # Bounded by the timeout: the failing first wave stops the batch (no 0.5 s per row).
        assert loop.time() - started < 0.5 * len(rows)
    finally:
        broker_proxy.cut()
        await publisher.close()


@pytest.mark.integration
async def test_broker_down_at_start_then_connects(
    amqp_url: str, amqp_names: Janitor, broker_proxy: TcpProxy
) -> None:
    broker_proxy.cut()
    queue = amqp_names.queue()
    settings = BrokerSettings(
        url=broker_proxy.url(), exchange=amqp_names.exchange(), reconnect_interval=0.1,
        queues=(QueueSettings(name=queue),),
    )
    publisher = AmqpPublisher(settings)
    await publisher.start()  # must not raise: the gateway keeps accepting into the outbox
    try:
        assert not publisher.connected
        rows: list[OutboxRow] = [row_from_event(thread_event("th-d", 1), 1)]
        with pytest.raises(PublishError, match="not connected"):
            await publisher.publish(rows)
        assert publisher.last_error is not None
        assert "guest:guest" not in publisher.last_error

        broker_proxy.restore()
        async with asyncio.timeout(10):
            await publisher.wait_connected()
        consumer = await Consumer(amqp_url, settings.exchange, queue=queue).start()
        try:
            await publisher.publish(rows)
            assert [r.message_id for r in await consumer.wait_for(1)] == [rows[0].event_id]
        finally:
            await consumer.close()
    finally:
        await publisher.close()
