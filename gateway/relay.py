"""The outbox relay: moves committed events from the store's outbox to the bus, in order.

One task reads unpublished rows in outbox order, publishes them with confirms and marks as published
exactly the rows that were confirmed. A row that failed stays in the outbox and is published again on
the next round (at-least-once; desks drop repeats by ``message_id``). Per-thread order holds because
the publisher never sends a row before the previous row of its thread was confirmed, and a row that
failed keeps every later row of its thread unsent until it is confirmed itself.

The relay publishes when woken (``wake()`` after a commit in this process, or by a store that hears
of commits made elsewhere: :class:`CommitFeed`) and otherwise every ``poll_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from core.errors import PublishError
from core.settings import OutboxSettings
from gateway.publisher import BatchPublishError, Publisher
from gateway.store.base import OutboxRow, OutboxStatus

logger = logging.getLogger(__name__)


class OutboxSource(Protocol):
    """The part of :class:`gateway.store.base.Store` the relay uses."""

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]: ...

    async def outbox_mark_published(self, positions: Sequence[int]) -> None: ...

    async def outbox_status(self) -> OutboxStatus: ...


@runtime_checkable
class CommitFeed(Protocol):
    """A store that hears of commits made by other processes (PostgreSQL: LISTEN/NOTIFY)."""

    async def outbox_listen(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` after such commits until cancelled; survives lost connections on its own."""
        ...


class RelayMetrics(Protocol):
    """What the relay reports; ``gateway.metrics`` provides it, tests may pass a recorder."""

    def publish_confirmed(self, n: int) -> None: ...

    def publish_failed(self, reason: str) -> None: ...

    def outbox_status(self, backlog: int, oldest_age: float | None) -> None: ...


class Relay(Protocol):
    """What the application needs from a relay, in this process or in a child process."""

    @property
    def status(self) -> RelayStatus: ...

    async def start(self) -> None: ...

    def wake(self) -> None: ...

    async def drain(self, timeout: float | None = None) -> bool: ...  # noqa: ASYNC109


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayStatus:
    """A snapshot for /readyz and metrics."""

    running: bool
    connected: bool
    published_total: int  # confirmed by this process since start
    last_error: str | None
    last_error_at: datetime | None
    backlog: int | None  # as of the last status read; None before the first
    oldest_age: float | None
    retry_in: float | None  # seconds until the next attempt while backing off


class OutboxRelay:
    """Publishes the outbox; ``wake()`` after a commit, ``drain()`` on shutdown."""

    def __init__(
        self,
        store: OutboxSource,
        publisher: Publisher,
        settings: OutboxSettings,
        metrics: RelayMetrics | None = None,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._settings = settings
        self._metrics = metrics
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        # Told when the relay goes to wait for a wake-up with nothing left to publish: a relay in
        # a child process tells its parent, which wakes it on the next commit (and not before).
        self._on_wait = on_wait
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()  # set while the last round found nothing to publish
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._published_total = 0
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._backlog: int | None = None
        self._oldest_age: float | None = None
        self._retry_at: float | None = None
        self._status_read_at = float("-inf")

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="outbox-relay")
            if isinstance(self._store, CommitFeed):
                # Commits on other instances wake this relay too; polling stays the fallback.
                self._listener = asyncio.create_task(
                    self._store.outbox_listen(self.wake), name="outbox-listen"
                )

    def wake(self) -> None:
        """Something was committed: publish now rather than at the next poll."""
        self._wake.set()

    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - bounded flush is the API
        """Flush for at most ``timeout`` seconds (default ``drain_timeout``), then stop.

        Returns True when the outbox was empty at the end; what is left stays durable in the store
        and goes out after the next start.
        """
        limit = self._settings.drain_timeout if timeout is None else timeout
        emptied = False
        if self._task is not None and not self._task.done():
            self._idle.clear()
            self.wake()
            try:
                async with asyncio.timeout(limit):
                    await self._idle.wait()
                emptied = True
            except TimeoutError:
                logger.warning("outbox not drained within %.1fs; the rest goes out after restart", limit)
        await self.stop()
        return emptied

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        tasks = [task for task in (self._listener, self._task) if task is not None]
        self._task = self._listener = None
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def status(self) -> RelayStatus:
        now = time.monotonic()
        return RelayStatus(
            running=self._task is not None and not self._task.done(),
            connected=self._publisher.connected,
            published_total=self._published_total,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            backlog=self._backlog,
            oldest_age=self._oldest_age,
            retry_in=None if self._retry_at is None else max(0.0, self._retry_at - now),
        )

    # -- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self._backoff_initial
        while not self._stop.is_set():
            # Cleared before reading, so a commit during the round triggers another round.
            self._wake.clear()
            try:
                fetched = await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a relay that dies silently loses no data but stalls the bus
                self._record_error(exc)
                await self._report_status(force=True)
                # Progress resets the backoff: a failure that hits only some rows (one unroutable
                # event) must not slow every other thread down.
                delay = self._backoff_initial if getattr(exc, "confirmed", None) else delay
                self._retry_at = time.monotonic() + delay
                await self._pause(delay)
                self._retry_at = None
                delay = min(delay * 2, self._backoff_max)
                continue
            delay = self._backoff_initial
            await self._report_status(force=fetched == 0)
            if fetched >= self._settings.batch_size:
                continue  # more is waiting
            if fetched == 0:
                self._idle.set()
            if self._on_wait is not None and not self._wake.is_set():
                self._on_wait()
            await self._wait_for_work()

    async def _round(self) -> int:
        """Publish one batch; returns how many rows it held. Raises after marking what was confirmed."""
        rows = await self._store.outbox_fetch(self._settings.batch_size)
        if not rows:
            return 0
        try:
            await self._publisher.publish(rows)
        except BatchPublishError as exc:
            if exc.confirmed:
                await self._mark([row.position for row in rows if row.position in exc.confirmed])
            raise
        await self._mark([row.position for row in rows])
        return len(rows)

    async def _mark(self, positions: list[int]) -> None:
        await self._store.outbox_mark_published(positions)
        self._published_total += len(positions)
        if self._last_error is not None:
            logger.info("publishing again after: %s", self._last_error)
            self._last_error = None
        if self._metrics is not None:
            self._metrics.publish_confirmed(len(positions))

    def _record_error(self, exc: Exception) -> None:
        reason = str(exc) or exc.__class__.__name__
        if reason != self._last_error:
            log = logger.warning if isinstance(exc, PublishError) else logger.error
            log("outbox relay: %s", reason, exc_info=not isinstance(exc, PublishError))
        self._last_error = reason
        self._last_error_at = datetime.now(UTC)
        if self._metrics is not None:
            self._metrics.publish_failed(_reason_label(exc))

    async def _pause(self, delay: float) -> None:
        # Backoff ignores wake(): while the broker is down every commit would otherwise retry at once.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._stop.wait()

    async def _wait_for_work(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.poll_interval):
                await self._wake.wait()

    async def _report_status(self, *, force: bool) -> None:
        """Read backlog and age at most once a second (it is a query), or when asked."""
        now = time.monotonic()
        if not force and now - self._status_read_at < 1.0:
            return
        self._status_read_at = now
        try:
            status = await self._store.outbox_status()
        except Exception as exc:
            logger.debug("outbox status unavailable: %s", exc)
            return
        self._backlog = status.backlog
        oldest = status.oldest_created_at
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        self._oldest_age = None if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        if self._metrics is not None:
            self._metrics.outbox_status(status.backlog, self._oldest_age)


def _reason_label(exc: Exception) -> str:
    """A low-cardinality label for the failure metric."""
    text = str(exc).lower()
    for label in ("timeout", "returned", "nack", "not connected", "connection"):
        if label in text:
            return label.replace(" ", "_")
    return "store" if not isinstance(exc, PublishError) else "other"
