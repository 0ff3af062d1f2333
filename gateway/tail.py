"""``ticketgate tail``: watch the events on the bus, as a person or as JSON lines.

Looks the exchange up (a passive declare: a misspelt name is refused, not created) and declares a
temporary queue (exclusive, auto-delete: it vanishes with the connection, so watching never leaves a
queue filling up behind) bound to the exchange with one topic pattern.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any, TextIO

import aio_pika
import aio_pika.abc
import aiormq.exceptions
import orjson

from core.settings import BrokerSettings

TEXT_WIDTH = 80


class ExchangeMissing(LookupError):
    """The events exchange is not on the broker (a misspelt name, or the gateway never ran)."""


def format_line(routing_key: str, body: bytes, timestamp: datetime | None = None) -> str:
    """One readable line: time, routing key, thread/sequence, customer, the start of the text."""
    try:
        event: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return f"{_clock(timestamp)} {routing_key} <not JSON, {len(body)} bytes>"
    if not isinstance(event, dict):
        return f"{_clock(timestamp)} {routing_key} <not an event>"
    when = _parse_time(event.get("occurred_at")) or timestamp
    thread, customer, message = _part(event, "thread"), _part(event, "customer"), _part(event, "message")
    parts = [_clock(when), routing_key]
    if thread.get("id"):
        sequence = thread.get("sequence")
        parts.append(f"thread={thread['id']}" + (f"#{sequence}" if sequence is not None else ""))
    if customer.get("id"):
        name = customer.get("display_name")
        parts.append(f"customer={customer['id']}" + (f" ({name})" if name else ""))
    text = message.get("text") or message.get("subject")
    if not text and (quarantine := _part(event, "quarantine")):
        text = f"quarantined: {quarantine.get('reason', '')}"
    if text:
        flat = " ".join(str(text).split())  # a line per event: no newlines from the message itself
        parts.append(repr(flat[:TEXT_WIDTH] + ("…" if len(flat) > TEXT_WIDTH else "")))
    return " ".join(parts)


def _part(event: dict[str, Any], key: str) -> dict[str, Any]:
    value = event.get(key)
    return value if isinstance(value, dict) else {}


def _clock(moment: datetime | None) -> str:
    moment = moment or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


async def tail(
    broker: BrokerSettings,
    binding: str,
    *,
    json_lines: bool,
    out: TextIO,
    stop: asyncio.Event | None = None,
    limit: int | None = None,
    ready: asyncio.Event | None = None,
) -> int:
    """Print events matching ``binding`` until ``stop`` is set or ``limit`` events were printed.

    Returns how many were printed. ``ready`` is set once the queue is bound (nothing published
    before that is seen). Each message is acknowledged after it was written.
    """
    stop = stop or asyncio.Event()
    printed = 0
    connection = await aio_pika.connect_robust(
        broker.url.get_secret_value(), client_properties={"connection_name": "ticketgate tail"}
    )
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        # Looked up, never created: a misspelt name would otherwise make an exchange nobody
        # publishes to, and tail would wait on it for ever.
        try:
            exchange = await channel.get_exchange(broker.exchange, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ExchangeMissing(
                f"exchange {broker.exchange!r} does not exist on the broker; check broker.exchange"
                " (the gateway declares it when it first connects)"
            ) from None
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=binding)
        if ready is not None:
            ready.set()
        async with queue.iterator() as messages:
            iterator = aiter(messages)
            while not stop.is_set() and (limit is None or printed < limit):
                next_message = asyncio.ensure_future(anext(iterator))
                stopping = asyncio.ensure_future(stop.wait())
                done, _ = await asyncio.wait({next_message, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if next_message not in done:
                    next_message.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await next_message
                    break
                message: aio_pika.abc.AbstractIncomingMessage = next_message.result()
                if json_lines:
                    out.write(message.body.decode("utf-8", "replace") + "\n")
                else:
                    out.write(format_line(message.routing_key or "", message.body, message.timestamp) + "\n")
                out.flush()
                await message.ack()
                printed += 1
    return printed
