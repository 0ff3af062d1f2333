"""The control queue: desks report threads closed or reopened, and ask for replies; the gateway
applies it to the store.

A message is ``{"type": "thread.closed" | "thread.reopened", "thread_id", "tenant", "at"}`` or a
reply command ``{"type": "reply.requested", ...}`` (:mod:`gateway.reply_commands`) (JSON) on
the durable queue ``[control] queue`` (default ``ticketgate.control``), which desks publish to through
the default exchange (routing key = the queue's name); ``[control] bindings`` can also bind it to the
events exchange. It is acknowledged only after the store committed the change; an unknown thread is
logged and acknowledged (nothing to do); a malformed message is rejected without requeue (dead
letter it with a queue policy if you want to keep it); a store fault requeues it. A reply command
that names another tenant's thread, or reuses a command id with another body, is acknowledged and
answered with ``reply.failed`` (reason ``rejected``) on the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aio_pika
import aio_pika.abc
import orjson
from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError
from yarl import URL

from core.settings import BrokerSettings, ControlSettings
from dedupe import graph
from gateway.reply_commands import (
    COMMAND_TYPE,
    CommandError,
    ReplyIntake,
    announce_refusal,
    parse_command,
    record_command,
)
from gateway.store.base import Store

logger = logging.getLogger(__name__)

# Seconds a stop waits for the consumer task and for the broker's answer to the close.
CLOSE_TIMEOUT = 2.0


class ControlMessage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    type: Literal["thread.closed", "thread.reopened"]
    thread_id: str = Field(min_length=1, max_length=200)
    tenant: str = Field(min_length=1, max_length=200)
    at: AwareDatetime


class Applied(enum.StrEnum):
    APPLIED = "applied"  # ack
    UNKNOWN_THREAD = "unknown_thread"  # ack, logged
    REFUSED = "refused"  # ack, answered with reply.failed on the bus
    MALFORMED = "malformed"  # reject, no requeue
    RETRY = "retry"  # nack, requeue


async def apply_control(store: Store, body: bytes, replies: ReplyIntake | None = None) -> Applied:
    """Parse and apply one control message; what to answer the broker follows from the result."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        logger.warning("control: malformed message rejected (body: not JSON)")
        return Applied.MALFORMED
    if isinstance(data, dict) and data.get("type") == COMMAND_TYPE:
        return await _apply_reply(store, data, replies)
    try:
        command = ControlMessage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        logger.warning("control: malformed message rejected (%s: %s)", where, first["msg"])
        return Applied.MALFORMED
    work = graph.set_thread_status(
        command.thread_id, open=command.type == "thread.reopened", at=command.at, tenant=command.tenant
    )
    try:
        known = await store.transact(work)
    except Exception:
        logger.exception("control: cannot apply %s for thread %s now", command.type, command.thread_id)
        return Applied.RETRY
    if not known:
        logger.info(
            "control: %s for unknown thread %s (tenant %s) ignored",
            command.type,
            command.thread_id,
            command.tenant,
        )
        return Applied.UNKNOWN_THREAD
    logger.info("control: thread %s %s", command.thread_id, command.type.removeprefix("thread."))
    return Applied.APPLIED


async def _apply_reply(store: Store, data: dict[str, Any], replies: ReplyIntake | None) -> Applied:
    if replies is None:
        logger.warning("control: reply.requested rejected: replies are disabled ([replies] enabled)")
        return Applied.MALFORMED
    try:
        command = parse_command(
            data,
            max_attachments=replies.settings.max_attachments,
            max_attachment_bytes=replies.settings.max_attachment_bytes,
        )
    except CommandError as exc:
        logger.warning("control: malformed reply.requested rejected (%s)", exc.reason)
        return Applied.MALFORMED
    try:
        async with replies.order.hold(command.thread_id):
            result = await record_command(store, command, wake=replies.wake)
        if result.outcome == "unknown_thread":
            await announce_refusal(store, command, f"unknown thread {command.thread_id}")
            return Applied.REFUSED
        if result.outcome == "conflict":
            await announce_refusal(
                store, command, f"command_id {command.command_id} reused with another body"
            )
            return Applied.REFUSED
    except Exception:
        logger.exception("control: cannot store reply command %s now", command.command_id)
        return Applied.RETRY
    return Applied.APPLIED


class ControlConsumer:
    """Consumes the control queue with manual acks; reconnects through aio-pika's robust connection."""

    def __init__(
        self,
        settings: ControlSettings,
        broker: BrokerSettings,
        store: Store,
        replies: ReplyIntake | None = None,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._store = store
        self._replies = replies
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self.handled: dict[Applied, int] = dict.fromkeys(Applied, 0)

    async def start(self) -> None:
        """Start consuming; a broker that is down is retried in the background (ingest does not wait)."""
        self._task = asyncio.create_task(self._run(), name="ticketgate-control")

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:  # noqa: ASYNC109 - a bound, not a wait
        """Stop consuming and close the connection within ``timeout``, whatever the broker does.

        aio-pika's robust connection, closed while it (re)connects to a broker that accepts TCP but
        never answers, waits on a reconnect task that outlives the cancellation: unbounded, that
        held SIGTERM for ever.
        """
        task, self._task = self._task, None
        connection, self._connection = self._connection, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        if connection is not None:
            closing = asyncio.ensure_future(connection.close())
            done, _ = await asyncio.wait({closing}, timeout=timeout)
            if closing not in done:
                logger.warning("control: the broker did not answer the close within %.1fs", timeout)
                closing.cancel()
            elif not closing.cancelled() and closing.exception() is not None:
                logger.debug("control: close failed: %s", closing.exception())

    async def _run(self) -> None:
        while True:
            try:
                await self._consume()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("control: cannot reach the broker (%s); retrying", type(exc).__name__)
                connection, self._connection = self._connection, None
                if connection is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(CLOSE_TIMEOUT):
                            await connection.close()
                await asyncio.sleep(self._broker.reconnect_interval)

    async def _consume(self) -> None:
        # Built here rather than by connect_robust, so close() can reach it while it still connects;
        # the connect is bounded, a silent broker is a failed attempt, not a wait for ever.
        connection = aio_pika.RobustConnection(
            URL(self._broker.url.get_secret_value()),
            reconnect_interval=self._broker.reconnect_interval,
            client_properties={"connection_name": "ticketgate-control"},
        )
        self._connection = connection
        await connection.connect(timeout=max(self._broker.publish_timeout, 1.0))
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self._settings.prefetch)
        exchange = await channel.declare_exchange(
            self._broker.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        arguments: dict[str, Any] = {"x-queue-type": "quorum"} if self._settings.quorum else {}
        if self._settings.single_active_consumer:
            arguments["x-single-active-consumer"] = True
        queue = await channel.declare_queue(self._settings.queue, durable=True, arguments=arguments)
        for pattern in self._settings.bindings:
            await queue.bind(exchange, routing_key=pattern)
        await queue.consume(self._on_message, no_ack=False)
        logger.info("control: consuming %r", self._settings.queue)

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        result = await apply_control(self._store, message.body, self._replies)
        self.handled[result] += 1
        if result is Applied.MALFORMED:
            await message.reject(requeue=False)
        elif result is Applied.RETRY:
            await asyncio.sleep(self._settings.retry_delay)  # do not spin on a store that is down
            await message.nack(requeue=True)
        else:
            await message.ack()


def control_ctx(
    settings: ControlSettings, broker: BrokerSettings, store: Store, replies: ReplyIntake | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry running the control consumer (register it after the store's)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        consumer = ControlConsumer(settings, broker, store, replies)
        if settings.enabled:
            await consumer.start()
        yield
        await consumer.close()

    return ctx
