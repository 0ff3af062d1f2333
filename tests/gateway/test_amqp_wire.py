"""The publishing AMQP connection: what the publisher contract tests do not reach on their own."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pamqp import body as pamqp_body
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp import header as pamqp_header

from core.settings import BrokerSettings, QueueSettings
from gateway.amqp_wire import (
    CHANNEL,
    Endpoint,
    PublishConnection,
    WireError,
    body_frames,
    content_header_frame,
    publish_frame,
)
from gateway.publisher import AmqpPublisher
from tests.support.consumer import Consumer
from tests.support.outbox import row_from_event, thread_event
from tests.support.rabbitmq import Janitor


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", Endpoint("127.0.0.1", 5672, "guest", "guest", "/", False)),
        ("amqp://u%40x:p%2Fw@broker/", Endpoint("broker", 5672, "u@x", "p/w", "/", False)),
        ("amqps://a:b@mq.example/desk%2Fprod", Endpoint("mq.example", 5671, "a", "b", "desk/prod", True)),
        ("amqp://broker:5673", Endpoint("broker", 5673, "guest", "guest", "/", False)),
    ],
)
def test_endpoint_parses_amqp_urls(url: str, expected: Endpoint) -> None:
    assert Endpoint.parse(url) == expected


_EVENT_PROPERTIES: dict[str, Any] = {
    "delivery_mode": 2, "message_id": "01JD2Y3Q6XJ0M9Y4F3V8T7K5ZB", "correlation_id": "thread-1",
    "message_type": "message.received", "content_type": "application/json",
    "timestamp": datetime(2026, 11, 22, 8, 30, tzinfo=UTC), "app_id": "ticketgate",
    "headers": {"schema": "ticketgate.event/1", "tenant": "acme", "channel": "api", "sequence": 7},
}


@pytest.mark.parametrize(
    "properties",
    [
        _EVENT_PROPERTIES,
        {**_EVENT_PROPERTIES, "correlation_id": None, "headers": {"schema": "s", "channel": "c"}},
        {**_EVENT_PROPERTIES, "headers": {"sequence": 128, "tenant": "äcme", "big": 2**40, "neg": -129}},
        {**_EVENT_PROPERTIES, "headers": {"nested": {"a": [1, "x"]}, "flag": True, "none": None, "f": 1.5}},
        {**_EVENT_PROPERTIES, "headers": {}, "content_type": "", "message_id": "ü" * 40},
        {**_EVENT_PROPERTIES, "timestamp": datetime(2026, 11, 22, 8, 30)},  # naive: taken as UTC
        {**_EVENT_PROPERTIES, "timestamp": datetime(2026, 11, 22, 16, tzinfo=timezone(timedelta(hours=8)))},
        {
            "content_encoding": "gzip", "priority": 0, "reply_to": "r", "expiration": "60000",
            "user_id": "guest", "headers": {"k" * 200: "long key"},
        },
        {},
    ],
)
def test_frames_are_the_bytes_pamqp_writes(properties: dict[str, Any]) -> None:
    props = spec.Basic.Properties(**properties)
    assert content_header_frame(props, 2345) == pamqp_frame.marshal(
        pamqp_header.ContentHeader(0, 2345, props), CHANNEL
    )
    for mandatory in (True, False):
        publish = spec.Basic.Publish(exchange="ticketgate", routing_key="acme.api.message.received",
                                     mandatory=mandatory)
        assert publish_frame("ticketgate", "acme.api.message.received", mandatory) == pamqp_frame.marshal(
            publish, CHANNEL
        )


def test_a_short_string_too_long_is_refused_as_pamqp_refuses_it() -> None:
    with pytest.raises(TypeError, match="exceeds maximum length"):
        content_header_frame(spec.Basic.Properties(message_id="x" * 256), 1)
    with pytest.raises(TypeError, match="exceeds maximum length"):
        publish_frame("ticketgate", "k" * 256, True)


@pytest.mark.parametrize("size", [0, 1, 4088, 4089, 10_000])
def test_body_frames_are_the_bytes_pamqp_writes(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    expected = b"".join(
        pamqp_frame.marshal(pamqp_body.ContentBody(body[i : i + 4088]), CHANNEL) for i in range(0, size, 4088)
    )
    assert body_frames(body, 4096) == expected


def test_endpoint_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="not an AMQP URL"):
        Endpoint.parse("http://guest:guest@127.0.0.1/")


@pytest.mark.integration
async def test_body_larger_than_a_frame_arrives_whole(amqp_url: str) -> None:
    names = Janitor(amqp_url)
    queue = names.queue()
    settings = BrokerSettings(
        url=amqp_url, exchange=names.exchange(), queues=(QueueSettings(name=queue, bindings=("#",)),)
    )
    publisher = AmqpPublisher(settings)
    await publisher.start()
    consumer = await Consumer(amqp_url, settings.exchange, queue=queue).start()
    try:
        row = row_from_event(thread_event("th-big", 1), 1)
        big = dataclasses.replace(row, body=bytes(range(256)) * 1600)  # 400 KiB: four frames at least
        await publisher.publish([big])
        [got] = await consumer.wait_for(1)
        assert got.body == big.body
    finally:
        await consumer.close()
        await publisher.close()
        await names.clean()


@pytest.mark.integration
async def test_many_publishes_of_one_iteration_are_each_confirmed(amqp_url: str) -> None:
    names = Janitor(amqp_url)
    exchange = names.exchange()
    connection = await PublishConnection.open(amqp_url, connection_name="test wire")
    try:
        await connection.declare_exchange(exchange, "topic", durable=False)
        queue = names.queue()
        await connection.declare_queue(queue, durable=False, arguments={})
        await connection.bind_queue(queue, exchange, "#")
        confirms = [
            connection.publish(exchange, "a.b", b"x" * 100, spec.Basic.Properties(message_id=f"m{i}"))
            for i in range(500)
        ]
        async with asyncio.timeout(10):
            results = await asyncio.gather(*confirms, return_exceptions=True)
        assert results == [None] * 500
    finally:
        await connection.close()
        await names.clean()
    assert not connection.is_open
    with pytest.raises(WireError):
        connection.publish(exchange, "a.b", b"late", spec.Basic.Properties(message_id="late"))


@pytest.mark.integration
async def test_publish_to_a_missing_exchange_fails_the_connection_not_the_caller(amqp_url: str) -> None:
    lost: list[WireError] = []
    connection = await PublishConnection.open(amqp_url, connection_name="test wire", on_lost=lost.append)
    confirm = connection.publish(
        "no-such-exchange-ticketgate", "a", b"x", spec.Basic.Properties(message_id="m1")
    )
    with pytest.raises(WireError) as caught:
        async with asyncio.timeout(10):
            await confirm
    assert caught.value.reply_code == 404
    assert not connection.is_open
    assert [error.reply_code for error in lost] == [404]
    await connection.close()


async def test_mandatory_publish_without_message_id_is_refused() -> None:
    connection = PublishConnection()
    with pytest.raises(ValueError, match="message_id"):
        connection.publish("x", "a", b"body", spec.Basic.Properties())


async def test_undecodable_frame_fails_every_unsettled_publish() -> None:
    class Sink(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.aborted = False

        def write(self, data: bytes | bytearray | memoryview) -> None:
            pass

        def is_closing(self) -> bool:
            return self.aborted

        def abort(self) -> None:
            self.aborted = True

    connection = PublishConnection()
    sink = Sink()
    connection.connection_made(sink)
    confirm = connection.publish("x", "a", b"body", spec.Basic.Properties(message_id="m1"))
    # A method frame of 4 bytes whose end octet is wrong.
    connection.data_received(b"\x01\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x50\x00")
    with pytest.raises(WireError, match="undecodable"):
        await confirm
    assert sink.aborted
    assert not connection.is_open
