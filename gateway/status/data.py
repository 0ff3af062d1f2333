"""The figures the status page shows, as one JSON document (``GET /status/api/summary``).

Totals come from the Prometheus registry that ``/metrics`` exposes (the same counters, read the
same way); the last hour a minute at a time from :class:`gateway.metrics.RecentActivity`, which the
same calls feed; the outbox, broker and store from the same sources as ``/metrics`` and
``/readyz``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from core.events import isoformat
from core.model import Outcome
from gateway import quarantine
from gateway.channels import EnabledChannel
from gateway.health import probe_store
from gateway.keys import CHANNELS, METRICS, RELAY, SETTINGS, STORE
from gateway.metrics import Metrics
from gateway.startup import broker_address, store_address

# What the page shows of the quarantine: the newest entries (the command line lists more).
QUARANTINE_SHOWN = 50
# The refusal reasons a channel may give (core.channel.Refusal), shown even at 0.
REFUSALS = ("signature", "auth", "size", "rate_limit", "malformed")
STORED = (Outcome.ACCEPTED.value, Outcome.DUPLICATE.value, Outcome.QUARANTINED.value)
# The store probe is a real write with fsync (as /readyz does it); every open page polling every
# few seconds need not add one each: a result this recent is shown again.
PROBE_REUSE = 10.0
_PROBED: web.AppKey[dict[str, tuple[float, str | None]]] = web.AppKey("status_store_probe", dict)


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` as Prometheus computes it, over (upper bound, cumulative count) sorted
    by bound: linear within the bucket that holds the q-th observation; the highest finite bound
    when it falls into ``+Inf``."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def within(deadline: float, buckets: Sequence[tuple[float, float]]) -> tuple[int, int]:
    """(acks answered within ``deadline``, all acks) from the histogram: counted at the largest
    bucket bound not past the deadline, so an ack is never claimed in time that might not be."""
    if not buckets:
        return 0, 0
    total = int(buckets[-1][1])
    inside = 0.0
    for bound, count in buckets:
        if bound <= deadline:
            inside = count
    return int(inside), total


def _ack(metrics: Metrics, channel: str) -> list[tuple[float, float]]:
    buckets = [
        (float(labels["le"]), value)
        for name, labels, value in metrics.samples("ticketgate_ack_latency_seconds")
        if name.endswith("_bucket") and labels.get("channel") == channel
    ]
    return sorted(buckets)


def _counter(metrics: Metrics, metric: str) -> Iterable[tuple[dict[str, str], float]]:
    for name, labels, value in metrics.samples(metric):
        if name.endswith("_total"):
            yield labels, value


def _add(a: list[float], b: list[float]) -> list[float]:
    return [x + y for x, y in zip(a, b, strict=True)] if a else list(b)


def channel_figures(app: web.Application) -> list[dict[str, Any]]:
    """Per channel: totals since start, ack latency against the provider's deadline, refusals by
    reason; per inbox, the last hour a minute at a time and the last message's time."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    enabled: dict[str, EnabledChannel] = {c.name: c for c in app.get(CHANNELS, ())}
    totals: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, value in _counter(metrics, "ticketgate_messages"):
        totals[labels["channel"]][labels["outcome"]] = int(value)
    refusals: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for labels, value in _counter(metrics, "ticketgate_refusals"):
        refusals[(labels["channel"], labels["inbox"])][labels["reason"]] = int(value)
    recent: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in metrics.recent.snapshot():
        recent[row["channel"]].append(row)

    out = []
    for name in sorted(set(enabled) | set(totals) | set(recent)):
        deadline = enabled[name].deadline if name in enabled else 10.0
        buckets = _ack(metrics, name)
        in_time, acks = within(deadline, buckets)
        worst: list[float] = []
        inboxes = []
        for row in recent.get(name, []):
            inbox = settings.inboxes.get(row["inbox"])
            outcomes: dict[str, list[float]] = row["outcomes"]
            zero = [0.0] * len(row["worst_ack"])
            stored = zero
            for outcome in STORED:
                stored = _add(stored, outcomes.get(outcome, zero))
            worst = [max(a, b) for a, b in zip(worst or zero, row["worst_ack"], strict=True)]
            last = row["last_message_at"]
            inboxes.append({
                "inbox": row["inbox"],
                "name": inbox.name if inbox is not None else None,
                "tenant": inbox.tenant if inbox is not None else None,
                "minutes": {
                    "stored": stored,
                    "rejected": outcomes.get(Outcome.REJECTED.value, zero),
                    "retry": outcomes.get(Outcome.RETRY.value, zero),
                },
                "minute_end": row["minute_end"],
                "last_hour": {k: int(sum(v)) for k, v in outcomes.items()},
                "last_message_at": isoformat(datetime.fromtimestamp(last, UTC)) if last else None,
                "refusals": {r: refusals.get((name, row["inbox"]), {}).get(r, 0) for r in REFUSALS},
                "refusals_last_hour": {r: int(sum(v)) for r, v in row["refusals"].items()},
            })
        by_reason = {r: 0 for r in REFUSALS}
        for (channel, _inbox), counts in refusals.items():
            if channel == name:
                for reason, value in counts.items():
                    by_reason[reason] = by_reason.get(reason, 0) + value
        out.append({
            "name": name,
            "deadline": deadline,
            "totals": totals.get(name, {}),
            "refusals": by_reason,
            "ack": {
                "count": acks,
                "within_deadline": in_time,
                "share_within": in_time / acks if acks else None,
                "p50": quantile(0.5, buckets),
                "p99": quantile(0.99, buckets),
                "worst_last_hour": max(worst) if worst and max(worst) > 0 else None,
                "worst_minutes": worst,
            },
            "inboxes": inboxes,
        })
    return out


def _sqlite_bytes(path: Path) -> int | None:
    total = None
    for each in (path, Path(f"{path}-wal")):
        try:
            total = (total or 0) + os.stat(each).st_size
        except OSError:
            continue
    return total


def reply_figures(metrics: Metrics) -> dict[str, Any]:
    """Replies sent and failed since start, from the counters the reply sender exports
    (``ticketgate_replies_sent{channel,inbox}``, ``ticketgate_replies_failed{channel,reason}``);
    zeros where it does not run."""
    sent: dict[str, int] = defaultdict(int)
    for labels, value in _counter(metrics, "ticketgate_replies_sent"):
        sent[labels.get("channel", "")] += int(value)
    failed_by_reason: dict[str, int] = defaultdict(int)
    failed_by_channel: dict[str, int] = defaultdict(int)
    for labels, value in _counter(metrics, "ticketgate_replies_failed"):
        failed_by_reason[labels.get("reason", "")] += int(value)
        failed_by_channel[labels.get("channel", "")] += int(value)
    return {
        "sent": sum(sent.values()),
        "sent_by_channel": dict(sent),
        "failed": sum(failed_by_reason.values()),
        "failed_by_reason": {k: v for k, v in sorted(failed_by_reason.items()) if v},
        "failed_by_channel": {k: v for k, v in sorted(failed_by_channel.items()) if v},
    }


async def _store_problem(app: web.Application) -> str | None:
    """The readiness probe's answer, at most ``PROBE_REUSE`` seconds old."""
    cache = app.get(_PROBED)
    if cache is None:
        return await probe_store(app)
    last = cache.get("store")
    if last is not None and time.monotonic() - last[0] < PROBE_REUSE:
        return last[1]
    problem = await probe_store(app)
    cache["store"] = (time.monotonic(), problem)
    return problem


def setup_data(app: web.Application) -> None:
    app[_PROBED] = {}


async def summary(app: web.Application) -> dict[str, Any]:
    """Everything the page shows, read now."""
    settings = app[SETTINGS]
    metrics = app[METRICS]
    store = app[STORE]
    relay = app[RELAY].status
    status, problem, held, counts, replies = await asyncio.gather(
        store.outbox_status(), _store_problem(app), quarantine.list_records(store, limit=QUARANTINE_SHOWN),
        store.quarantine_counts(), store.reply_backlog(),
    )
    oldest = status.oldest_created_at
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else None
    # The same refresh /metrics does, so a scrape and the page read the same gauges.
    metrics.outbox_status(status.backlog, age)
    metrics.broker_connected.set(1 if relay.connected else 0)
    waiting_for = (
        (datetime.now(UTC) - replies.oldest_requested_at).total_seconds()
        if replies.oldest_requested_at is not None else None
    )
    metrics.reply_status(replies.pending + replies.sending, waiting_for)
    failures = {
        labels["reason"]: int(value) for labels, value in _counter(metrics, "ticketgate_publish_failures")
    }
    confirms = sum(int(value) for _labels, value in _counter(metrics, "ticketgate_publish_confirms"))
    size = None
    if settings.store.backend == "sqlite":
        size = await asyncio.to_thread(_sqlite_bytes, settings.store.path)
    return {
        "generated_at": isoformat(datetime.now(UTC)),
        "now": time.time(),
        "refresh_interval": settings.admin.refresh_interval,
        "channels": channel_figures(app),
        "outbox": {
            "backlog": status.backlog,
            "bound": settings.outbox.max_backlog,
            "oldest_age": age,
            "published_total": status.published_total,
        },
        "broker": {
            "connected": relay.connected,
            "relay_running": relay.running,
            "relay_mode": settings.outbox.relay,
            "address": broker_address(settings),
            "exchange": settings.broker.exchange,
            "last_error": relay.last_error,
            "last_error_at": isoformat(relay.last_error_at),
            "retry_in": relay.retry_in,
            "publish_confirms": confirms,
            "publish_failures": failures,
        },
        "store": {
            "backend": settings.store.backend,
            "address": store_address(settings),
            "ok": problem is None,
            "problem": problem,
            "size_bytes": size,
        },
        "replies": {
            # Waiting: in the ledger, shared by every instance; sent and failed: this instance's.
            "waiting": replies.pending + replies.sending,
            "pending": replies.pending,
            "sending": replies.sending,
            "oldest_waiting_age": waiting_for,
            **reply_figures(metrics),
        },
        "quarantine": {
            "shown": QUARANTINE_SHOWN,
            "held": counts.held,
            "total": counts.total,
            "items": [
                {**quarantine.record_info(r), "state": "held" if r.replayed_at is None else "replayed"}
                for r in held
            ],
        },
    }
