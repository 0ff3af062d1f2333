"""``tail`` against the real broker: what a person sees and what ``--json`` prints."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest

from core.settings import BrokerSettings, QueueSettings
from gateway.cli import build_parser
from gateway.publisher import AmqpPublisher
from gateway.tail import ExchangeMissing, format_line, tail
from tests.support.outbox import row_from_event, thread_event
from tests.support.rabbitmq import Janitor


def test_format_line_is_one_readable_line() -> None:
    event = thread_event("th-7", 4, text="Where is\nmy order " + "x" * 100)
    line = format_line(event.routing_key, event.body)
    assert "\n" not in line
    assert "acme.email.message.received" in line
    assert "thread=th-7#4" in line
    assert "customer=c-1 (Ana)" in line
    assert "'Where is my order xxx" in line
    assert line.endswith("…'")
    assert line.startswith(event.occurred_at.strftime("%Y-%m-%dT%H:%M:%S"))


def test_format_line_survives_garbage() -> None:
    assert "not JSON" in format_line("a.b.c", b"\xff{")
    assert "not an event" in format_line("a.b.c", b"[1]")


@pytest.mark.integration
@pytest.mark.parametrize("json_lines", [False, True])
async def test_tail_prints_matching_events(amqp_url: str, amqp_names: Janitor, json_lines: bool) -> None:
    broker = BrokerSettings(url=amqp_url, exchange=amqp_names.exchange())
    out = io.StringIO()
    ready = asyncio.Event()
    # A catch-all queue makes the event tail must not show routable (mandatory publish succeeds).
    catch_all = (QueueSettings(name=amqp_names.queue("all")),)
    publisher = AmqpPublisher(broker.model_copy(update={"queues": catch_all}))
    await publisher.start()  # declares the exchange, as the gateway does; tail only looks it up
    watcher = asyncio.create_task(
        tail(broker, "acme.email.#", json_lines=json_lines, out=out, limit=2, ready=ready)
    )
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        other = thread_event("th-x", 1, tenant="globex")  # tail binds 'acme.email.#': not shown
        shown = [thread_event("th-1", 1), thread_event("th-1", 2)]
        rows = [row_from_event(e, i) for i, e in enumerate([other, *shown], start=1)]
        await publisher.publish(rows)
        async with asyncio.timeout(10):
            printed = await watcher
    finally:
        watcher.cancel()
        await publisher.close()
    assert printed == 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    if json_lines:
        assert [orjson.loads(line)["event_id"] for line in lines] == [e.event_id for e in shown]
    else:
        assert "thread=th-1#1" in lines[0]
        assert "thread=th-1#2" in lines[1]


@pytest.mark.integration
async def test_tail_stops_on_request(amqp_url: str, amqp_names: Janitor) -> None:
    broker = BrokerSettings(url=amqp_url, exchange=amqp_names.exchange())
    declarer = AmqpPublisher(broker)
    await declarer.start()
    await declarer.close()
    stop, ready = asyncio.Event(), asyncio.Event()
    watcher = asyncio.create_task(
        tail(broker, "#", json_lines=True, out=io.StringIO(), stop=stop, ready=ready)
    )
    async with asyncio.timeout(10):
        await ready.wait()
    stop.set()
    async with asyncio.timeout(5):
        assert await watcher == 0


@pytest.mark.integration
async def test_tail_refuses_an_exchange_that_does_not_exist(amqp_url: str, amqp_names: Janitor) -> None:
    broker = BrokerSettings(url=amqp_url, exchange=amqp_names.exchange("misspelt"))
    with pytest.raises(ExchangeMissing, match="does not exist"):
        async with asyncio.timeout(10):
            await tail(broker, "#", json_lines=True, out=io.StringIO())


def test_tail_takes_the_pattern_positionally_or_as_an_option() -> None:
    parser = build_parser()
    assert parser.parse_args(["tail", "acme.#"]).pattern == "acme.#"
    assert parser.parse_args(["tail", "--binding", "acme.#"]).binding == "acme.#"
    assert parser.parse_args(["tail", "acme.#", "--json"]).json
