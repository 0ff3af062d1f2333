"""Publishing outbox rows to the event bus with publisher confirms.

:class:`AmqpPublisher` is the RabbitMQ implementation (:mod:`gateway.amqp_wire`);
:class:`MemoryPublisher` keeps what it was given, for unit tests. Both honour the same contract:

* ``publish(rows)`` returns only when every row was confirmed; otherwise it raises
  :class:`BatchPublishError` (a :class:`core.errors.PublishError`) whose ``confirmed`` holds the
  positions that *were* confirmed, so the caller can mark exactly those.
* Per-thread order: within a batch, a row is sent only after the previous row of the same thread
  (same ``thread_id``; thread-less events count as one thread) was confirmed. A failed row holds back
  the rest of its thread. Rows of different threads are in flight together, up to ``max_in_flight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, Protocol, runtime_checkable

from pamqp import commands as spec

from core.errors import ConfigError, PublishError
from core.events import SCHEMA
from core.settings import BrokerSettings
from core.timeouts import SharedTimeout
from gateway.amqp_wire import Nacked, PublishConnection, Returned, WireError
from gateway.store.base import OutboxRow

logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/json"
APP_ID = "ticketgate"
PERSISTENT = 2  # AMQP delivery mode
PRECONDITION_FAILED = 406  # AMQP reply code: a declare that contradicts what exists


class BatchPublishError(PublishError):
    """Some rows of a batch were not confirmed; ``confirmed`` holds the positions that were."""

    def __init__(self, reason: str, *, confirmed: Iterable[int] = (), failed: int = 0) -> None:
        super().__init__(reason)
        self.confirmed = frozenset(confirmed)
        self.failed = failed


@runtime_checkable
class Publisher(Protocol):
    """What the outbox relay needs from a bus."""

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Publish and confirm every row, or raise :class:`BatchPublishError`."""
        ...


def amqp_headers(row: OutboxRow) -> dict[str, Any]:
    """The AMQP headers of an event, as :meth:`core.events.Event.amqp_headers` builds them."""
    headers: dict[str, Any] = {"schema": SCHEMA, "tenant": row.tenant, "channel": row.channel}
    if row.sequence is not None:
        headers["sequence"] = row.sequence
    return headers


def order_key(row: OutboxRow) -> str:
    """Rows with the same key must reach the bus in outbox order."""
    # Thread-less events (merges, quarantine) share one key: merge-then-unmerge must keep its order.
    return row.thread_id if row.thread_id is not None else ""


class _RowFailed(Exception):
    def __init__(self, reason: str, *, fatal: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        # A fatal failure (connection lost, timeout) dooms every other row too: stop sending.
        self.fatal = fatal


async def publish_windowed(
    rows: Sequence[OutboxRow],
    send: Callable[[OutboxRow], Awaitable[None]],
    *,
    max_in_flight: int,
) -> None:
    """Run ``send`` for every row with up to ``max_in_flight`` unconfirmed, keeping per-thread order.

    ``send`` returns when the row is confirmed and raises :class:`_RowFailed` otherwise.
    """
    if not rows:
        return
    window = asyncio.Semaphore(max_in_flight)
    confirmed: list[int] = []
    failures: list[_RowFailed] = []
    stop = False

    async def one(row: OutboxRow, previous: asyncio.Task[bool] | None) -> bool:
        nonlocal stop
        # Wait for the thread's previous row outside the window, so waiting holds no slot.
        if previous is not None and not await previous:
            return False
        async with window:
            if stop:
                return False
            try:
                await send(row)
            except _RowFailed as exc:
                failures.append(exc)
                stop = stop or exc.fatal
                return False
        confirmed.append(row.position)
        return True

    last: dict[str, asyncio.Task[bool]] = {}
    tasks: list[asyncio.Task[bool]] = []
    try:
        for row in rows:
            key = order_key(row)
            task = asyncio.create_task(one(row, last.get(key)))
            last[key] = task
            tasks.append(task)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        # Cancelled mid-batch (shutdown): let every task unwind before leaving.
        await asyncio.gather(*tasks, return_exceptions=True)
    if len(confirmed) != len(rows):
        reason = failures[0].reason if failures else "not sent"
        raise BatchPublishError(
            f"{len(rows) - len(confirmed)} of {len(rows)} events not confirmed: {reason}",
            confirmed=confirmed,
            failed=len(rows) - len(confirmed),
        )


class AmqpPublisher:
    """Publishes to RabbitMQ: confirms, mandatory, persistent, timeouts, reconnects.

    Runs on :class:`gateway.amqp_wire.PublishConnection` (one confirm-mode channel; frames of one
    loop iteration leave in one write). The broker may be down when the gateway starts: :meth:`start`
    then returns after one attempt and keeps connecting in the background; :meth:`publish` raises
    :class:`PublishError` meanwhile. A lost connection is reopened every ``reconnect_interval``, and
    the exchange, queues and bindings are declared again each time.
    """

    def __init__(self, settings: BrokerSettings, *, connection_name: str = "ticketgate publisher") -> None:
        self._settings = settings
        self._connection_name = connection_name
        self._connection: PublishConnection | None = None
        self._connector: asyncio.Task[None] | None = None
        self._connected_once = asyncio.Event()
        self._closing = False
        self.last_error: str | None = None
        self.reconnects = 0
        # Every publish is bounded; the bounds share one timer (core.timeouts), not one per event.
        self._publish_bound = SharedTimeout(settings.publish_timeout)

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.is_open

    @property
    def blocked(self) -> bool:
        """True while the broker blocks this connection (a memory or disk alarm)."""
        return self.connected and self._connection is not None and self._connection.blocked

    async def start(self) -> None:
        """Connect and declare the topology; on failure keep trying in the background."""
        self._closing = False
        try:
            await self._connect()
        except ConfigError:
            raise
        except Exception as exc:
            self.last_error = _describe(exc)
            logger.warning(
                "broker not reachable (%s); accepting into the outbox and retrying every %.1fs",
                self.last_error,
                self._settings.reconnect_interval,
            )
            self._reconnect_later()

    async def wait_connected(self) -> None:
        """Wait until the first connection is made (wrap it in ``asyncio.timeout``)."""
        await self._connected_once.wait()

    def _reconnect_later(self) -> None:
        if not self._closing and (self._connector is None or self._connector.done()):
            self._connector = asyncio.create_task(self._connect_forever(), name="amqp-connect")

    async def _connect_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._settings.reconnect_interval)
            try:
                await self._connect()
            except ConfigError as exc:
                # Topology mismatch will not heal by retrying; say so loudly, keep the error visible.
                self.last_error = str(exc)
                logger.error("broker topology rejected: %s", exc)
                return
            except Exception as exc:
                self.last_error = _describe(exc)
                logger.debug("broker connect attempt failed: %s", self.last_error)
            else:
                if self.reconnects or self._connected_once.is_set():
                    self.reconnects += 1
                    logger.info("reconnected to the broker (reconnect #%d)", self.reconnects)
                return

    async def _connect(self) -> None:
        settings = self._settings
        async with asyncio.timeout(max(settings.publish_timeout, 1.0)):
            connection = await PublishConnection.open(
                settings.url.get_secret_value(),
                connection_name=self._connection_name,
                heartbeat=settings.heartbeat,
                on_lost=self._on_lost,
            )
            try:
                await self._declare(connection)
            except BaseException:
                connection.abort()
                raise
        was_connected = self._connected_once.is_set()
        self._connection = connection
        self.last_error = None
        self._connected_once.set()
        if not was_connected:
            logger.info("connected to the broker; exchange %r declared", settings.exchange)

    async def _declare(self, connection: PublishConnection) -> None:
        """Declare the exchange and the configured queues and bindings (idempotent)."""
        settings = self._settings
        try:
            await connection.declare_exchange(settings.exchange, "topic", durable=True)
            for queue_settings in settings.queues:
                await connection.declare_queue(
                    queue_settings.name, durable=True, arguments=queue_settings.arguments()
                )
                for pattern in queue_settings.bindings:
                    await connection.bind_queue(queue_settings.name, settings.exchange, pattern)
        except WireError as exc:
            if exc.reply_code == PRECONDITION_FAILED:
                raise ConfigError(
                    "the broker refused the declared topology (an existing exchange or queue differs):"
                    f" {exc.reason}",
                    key="broker",
                ) from None
            raise

    def _on_lost(self, error: WireError) -> None:
        if self._closing:
            return
        self.last_error = error.reason
        logger.warning("broker connection lost: %s", error.reason)
        self._reconnect_later()

    async def close(self) -> None:
        self._closing = True
        if self._connector is not None:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connector
            self._connector = None
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        connection = self._connection
        if connection is None or not connection.is_open:
            reason = "not connected to the broker"
            if self.last_error:
                reason += f" ({self.last_error})"
            raise BatchPublishError(reason, failed=len(rows))
        exchange = self._settings.exchange
        await publish_windowed(
            rows,
            lambda row: self._send(connection, exchange, row),
            max_in_flight=self._settings.max_in_flight,
        )

    async def _send(self, connection: PublishConnection, exchange: str, row: OutboxRow) -> None:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        properties = spec.Basic.Properties(
            # The AMQP default delivery mode is transient; a broker restart would lose the event.
            delivery_mode=PERSISTENT,
            message_id=row.event_id,
            correlation_id=row.thread_id,
            message_type=row.type,
            content_type=CONTENT_TYPE,
            timestamp=created,
            headers=amqp_headers(row),
            app_id=APP_ID,
        )
        try:
            confirm = connection.publish(exchange, row.routing_key, row.body, properties, mandatory=True)
            # A blocked or stalled broker must not hang the relay.
            async with self._publish_bound():
                await confirm
        except Returned as exc:
            raise _RowFailed(f"returned by the broker (unroutable {row.routing_key!r})", fatal=False) from exc
        except Nacked as exc:
            raise _RowFailed(f"nacked by the broker ({exc})", fatal=False) from exc
        except TimeoutError as exc:
            blocked = self.blocked
            why = "broker blocked the connection" if blocked else "no confirm"
            self.last_error = f"publish timeout after {self._settings.publish_timeout:g}s ({why})"
            if not blocked:
                # A broker that says nothing (TCP open, no confirm, no block) is as good as gone:
                # drop the connection so the relay reconnects and /readyz stops counting it as up.
                connection.drop(self.last_error)
            raise _RowFailed(self.last_error, fatal=True) from exc
        except WireError as exc:
            self.last_error = exc.reason
            raise _RowFailed(exc.reason, fatal=True) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    # Connection errors may quote the URL; never let a password reach a log or /readyz.
    return re.sub(r"(amqps?://[^:/@\s]+:)[^@\s]+@", r"\1***@", f"{exc.__class__.__name__}: {text}")


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more words."""
    words, parts = routing_key.split("."), pattern.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(parts):
            return j == len(words)
        if parts[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(words) + 1))
        if j == len(words):
            return False
        return parts[i] in ("*", words[j]) and match(i + 1, j + 1)

    return match(0, 0)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishedMessage:
    """One message as :class:`MemoryPublisher` 'delivered' it."""

    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str | None
    type: str
    content_type: str
    headers: dict[str, Any] = field(default_factory=dict)
    persistent: bool = True


class MemoryPublisher:
    """An in-memory bus for unit tests, with the same contract as :class:`AmqpPublisher`.

    ``bindings=None`` routes everything; a list of topic patterns makes other keys unroutable
    (returned, as ``mandatory`` does). Faults: ``down`` fails every publish as a lost connection;
    ``nack`` holds event ids the 'broker' refuses; ``fail_after`` confirms only that many more rows.
    """

    def __init__(self, *, bindings: Sequence[str] | None = None, max_in_flight: int = 256) -> None:
        self.bindings = None if bindings is None else tuple(bindings)
        self.max_in_flight = max_in_flight
        self.published: list[PublishedMessage] = []
        self.down = False
        self.nack: set[str] = set()
        self.fail_after: int | None = None
        self.batches = 0
        self._started = False
        self.changed = asyncio.Condition()

    @property
    def connected(self) -> bool:
        return self._started and not self.down

    async def start(self) -> None:
        self._started = True

    async def close(self) -> None:
        self._started = False

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        self.batches += 1
        if not self.connected:
            raise BatchPublishError("not connected (memory bus down)", failed=len(rows))
        await publish_windowed(rows, self._send, max_in_flight=self.max_in_flight)

    async def _send(self, row: OutboxRow) -> None:
        await asyncio.sleep(0)  # a real confirm is never synchronous; let other rows interleave
        if self.down:
            raise _RowFailed("connection lost (memory bus down)", fatal=True)
        if self.fail_after is not None:
            if self.fail_after <= 0:
                raise _RowFailed("connection lost (injected)", fatal=True)
            self.fail_after -= 1
        if row.event_id in self.nack:
            raise _RowFailed("nacked (injected)", fatal=False)
        if self.bindings is not None and not any(topic_matches(p, row.routing_key) for p in self.bindings):
            raise _RowFailed(f"returned by the broker (unroutable {row.routing_key!r})", fatal=False)
        self.published.append(
            PublishedMessage(
                routing_key=row.routing_key,
                body=row.body,
                message_id=row.event_id,
                correlation_id=row.thread_id,
                type=row.type,
                content_type=CONTENT_TYPE,
                headers=amqp_headers(row),
            )
        )
        async with self.changed:
            self.changed.notify_all()
