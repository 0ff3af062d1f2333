"""Application assembly: the one place where the gateway is wired together.

Every long-lived resource is one ``cleanup_ctx`` entry, registered outermost first, so on shutdown
the listeners stop before the relay flushes and the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from core.channel import SenderSpec
from core.events import CustomerView, ReplyChannel, reply_options
from core.http import json_errors
from core.model import CanonicalMessage
from core.settings import RetentionSettings, Settings
from gateway.channels import Registry, setup_channels
from gateway.control import control_ctx
from gateway.desk import DeskApi
from gateway.enrich import Enricher
from gateway.health import setup_health
from gateway.keys import CHANNELS, METRICS, PIPELINE, REGISTRY, RELAY, REPLIES, SETTINGS, STORE
from gateway.media import setup_media
from gateway.metrics import Metrics
from gateway.offload import NormalizeWorker
from gateway.pipeline import Pipeline
from gateway.publisher import AmqpPublisher, Publisher
from gateway.relay import OutboxRelay, Relay
from gateway.relay_process import RelayProcess
from gateway.replies import Dispatcher
from gateway.reply_commands import ReplyIntake
from gateway.startup import http_base_url
from gateway.status import setup_status
from gateway.store import build_store
from gateway.store.base import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Overrides:
    """Parts a test or benchmark may swap (an in-memory publisher, a store on a tmp path)."""

    store: Store | None = None
    publisher: Publisher | None = None
    registry: Registry | None = None  # the installed channels by default


def create_app(settings: Settings, overrides: Overrides | None = None) -> web.Application:
    """Wire the gateway. Connectors are built here, so a misconfigured channel fails before listening."""
    overrides = overrides or Overrides()
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[json_errors])
    metrics = Metrics()
    store = overrides.store or build_store(settings)
    relay: Relay
    if overrides.publisher is not None or settings.outbox.relay == "inline":
        publisher = overrides.publisher or AmqpPublisher(settings.broker)
        relay = inline = OutboxRelay(store, publisher, settings.outbox, metrics)
    else:
        publisher, inline = None, None
        relay = RelayProcess(settings, metrics, store)
    offload = NormalizeWorker(settings) if settings.server.normalizer_process else None
    # Replies: channels register their senders during setup; the dispatcher sends through them,
    # and every message.received says which of them can answer its customer.
    senders: dict[str, SenderSpec] = {}
    kinds: dict[str, frozenset[str]] = {}
    pipeline = Pipeline(
        settings,
        store,
        metrics,
        enricher=Enricher.from_settings(settings),
        on_commit=relay.wake,
        offload=offload,
        answering=_Answering(senders, kinds),
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STORE] = store
    app[RELAY] = relay
    app[PIPELINE] = pipeline

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        purge = asyncio.create_task(
            _purge_loop(
                store, settings.dedupe.duplicate_window, orphan_min_age=settings.store.orphan_min_age,
                orphans_every=settings.store.orphan_sweep_interval, retention=settings.retention,
                idempotency_retention=settings.store.idempotency_retention, metrics=metrics,
            ),
            name="ticketgate-purge",
        )
        yield
        purge.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purge
        await store.close()

    async def publisher_ctx(app: web.Application) -> AsyncIterator[None]:
        # Returns even when the broker is down: ingest continues into the outbox meanwhile.
        assert publisher is not None
        await publisher.start()
        yield
        await publisher.close()

    async def relay_ctx(app: web.Application) -> AsyncIterator[None]:
        await relay.start()
        yield
        await drain_and_report(store, relay, settings.outbox.drain_timeout)

    async def offload_ctx(app: web.Application) -> AsyncIterator[None]:
        assert offload is not None
        await offload.start()
        yield
        await offload.close()

    app.cleanup_ctx.append(store_ctx)
    if offload is not None:
        app.cleanup_ctx.append(offload_ctx)
    if inline is not None:
        app.cleanup_ctx.append(publisher_ctx)
    app.cleanup_ctx.append(relay_ctx)
    dispatcher = Dispatcher(settings.replies, store, metrics, senders, kinds=kinds, on_event=relay.wake)
    intake = None
    if settings.replies.enabled:
        intake = ReplyIntake(settings=settings.replies, wake=dispatcher.wake)
    app[REPLIES] = dispatcher
    # Desks report threads closed / reopened and ask for replies; applied to the store, so it
    # stops before the store.
    app.cleanup_ctx.append(control_ctx(settings.control, settings.broker, store, intake))
    setup_health(app)
    setup_media(app)
    if setup_status(app):
        logger.info("status page enabled at /status")
    desk = DeskApi.from_settings(settings)
    if desk is not None:
        desk.setup(app, store, replies=intake)
        logger.info("desk API enabled")
    registry = app[REGISTRY] = overrides.registry or Registry.installed()
    app[CHANNELS] = setup_channels(
        app,
        settings,
        ingest=pipeline.ingest,
        store=store,
        metrics=metrics,
        registry=registry,
        base_url=http_base_url(settings),
        senders=senders,
        kinds=kinds,
        deliveries=dispatcher.report,
        offload=offload,
    )

    async def replies_ctx(app: web.Application) -> AsyncIterator[None]:
        # Registered after the channels: started once their senders can send, stopped before
        # their sessions close; replies in flight at a stop are left to their leases.
        if settings.replies.enabled:
            await dispatcher.start()
            logger.info("replies: senders for %s", ", ".join(sorted(senders)) or "no channel")
        yield
        await dispatcher.close(timeout=min(settings.server.shutdown_timeout, 5.0))

    app.cleanup_ctx.append(replies_ctx)
    return app


class _Answering:
    """``message.received``'s reply block (:func:`core.events.reply_options`) from the registered
    senders. Channels register them during setup, before any message, so the channel list is built
    once (again only should a registration come later), not for every message."""

    def __init__(self, senders: Mapping[str, SenderSpec], kinds: Mapping[str, frozenset[str]]) -> None:
        self._senders = senders
        self._kinds = kinds
        self._built: tuple[tuple[int, int], list[ReplyChannel]] | None = None

    def __call__(self, message: CanonicalMessage, customer: CustomerView) -> dict[str, Any]:
        size = (len(self._senders), len(self._kinds))
        if self._built is None or self._built[0] != size:
            channels = [
                ReplyChannel(name=name, window=spec.window, identity_kinds=self._kinds.get(name, frozenset()))
                for name, spec in self._senders.items()
            ]
            self._built = (size, channels)
        return reply_options(message, customer, self._built[1])


async def drain_and_report(store: Store, relay: Relay, timeout: float) -> None:  # noqa: ASYNC109
    """Let the relay flush the outbox (listeners are closed by now), then say in one line what the
    drain published and what waits in the store for the next start."""
    started = time.monotonic()
    before = await _backlog(store)
    await relay.drain(timeout)
    after = await _backlog(store)
    if before is None or after is None:
        logger.info("stopped: outbox drained for %.1f s (backlog unknown: the store did not answer)",
                    time.monotonic() - started)
        return
    logger.info(
        "stopped: published %d of %d waiting events in %.1f s; %d stay in the outbox for the next start",
        max(before - after, 0), before, time.monotonic() - started, after,
    )


async def _backlog(store: Store) -> int | None:
    try:
        return (await store.outbox_status()).backlog
    except Exception:
        logger.warning("outbox status unavailable at shutdown", exc_info=True)
        return None


async def sweep_recent_texts(store: Store, before: datetime, chunk: int = 500) -> int:
    """Delete every recent text older than ``before``, ``chunk`` rows per transaction.

    Each chunk is a write job of its own, so messages are committed between them.
    """
    total = 0
    while True:
        deleted = await store.purge_recent_texts(before, chunk)
        total += deleted
        if deleted < chunk:
            return total


async def _purge_loop(
    store: Store, duplicate_window: float, interval: float = 60.0, keys_every: float = 3600.0, *,
    orphan_min_age: float = 3600.0, orphans_every: float = 3600.0,
    retention: RetentionSettings | None = None, idempotency_retention: float = 8 * 86400.0,
    metrics: Metrics | None = None,
) -> None:
    """Every ``interval``: recent texts past the duplicate window; every ``keys_every``: expired
    idempotency keys; every ``retention.interval``: what ``[retention]`` lets go (bounded batches,
    then SQLite's incremental vacuum); at start and every ``orphans_every``: blob files no commit
    named that are older than ``orphan_min_age``. A failure is logged and tried again next time."""
    retention = retention or RetentionSettings()
    keys_purged_at = orphans_swept_at = retained_at = -math.inf
    while True:
        now = datetime.now(UTC)
        try:
            swept = await sweep_recent_texts(store, now - timedelta(seconds=duplicate_window))
            if swept:
                logger.debug("swept %d recent texts past the duplicate window", swept)
        except Exception:
            logger.exception("sweeping old recent texts failed")
        keys_purged_at = await _when_due(
            keys_purged_at, keys_every,
            functools.partial(purge_kinds, store, {"keys": idempotency_retention}, now, retention, metrics),
            "purging expired idempotency keys", "purged %d expired idempotency keys",
        )
        retained_at = await _when_due(
            retained_at, retention.interval,
            functools.partial(purge_retention, store, retention, now, idempotency_retention, metrics),
            "purging content past its retention", "purged %d rows past their retention",
        )
        orphans_swept_at = await _when_due(
            orphans_swept_at, orphans_every, functools.partial(store.sweep_orphans, orphan_min_age),
            "sweeping orphaned blob files", "removed %d blob files that no committed message names",
        )
        await asyncio.sleep(interval)


async def purge_kinds(
    store: Store, ages: dict[str, float], now: datetime, retention: RetentionSettings,
    metrics: Metrics | None = None,
) -> int:
    """For each kind, remove rows older than its age (seconds) in batches of ``retention.batch``,
    at most ``retention.max_batches`` of them; each batch is its own transaction."""
    total = 0
    for kind, age in ages.items():
        before = now - timedelta(seconds=age)
        for _ in range(retention.max_batches):
            removed = await store.purge_retained(kind, before, retention.batch)
            total += removed
            if metrics is not None and removed:
                metrics.purged(kind, removed)
            if removed < retention.batch:
                break
    return total


async def purge_retention(
    store: Store, retention: RetentionSettings, now: datetime, idempotency_retention: float,
    metrics: Metrics | None = None,
) -> int:
    """One retention round: published events, then messages, raw bodies and blob files past their
    retention; then free pages go back to the file system (SQLite)."""
    ages = {
        "events": retention.events if retention.events is not None else idempotency_retention,
        "messages": retention.messages,
        "raw_bodies": retention.raw_bodies,
        "blobs": retention.blobs,
    }
    due = {kind: age for kind, age in ages.items() if age is not None}
    removed = await purge_kinds(store, due, now, retention, metrics)
    freed = await store.reclaim_space(retention.vacuum_pages)
    if freed:
        logger.info("gave %d free database pages back to the file system", freed)
    if metrics is not None:
        metrics.retention_last_round.set(time.time())
    return removed


async def _when_due(
    last: float, every: float, run: Callable[[], Awaitable[int]], what: str, done: str
) -> float:
    """Run ``run`` if ``every`` seconds passed since ``last`` (monotonic); when it last succeeded."""
    if time.monotonic() - last < every:
        return last
    try:
        count = await run()
    except Exception:
        logger.exception("%s failed", what)
        return last
    if count:
        logger.info(done, count)
    return time.monotonic()
