"""Prometheus metrics, one registry per application (so tests can build several apps)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from core.model import Outcome

# Ack latency: durable acks sit in the low milliseconds; anything past a second is an incident. 5, 10
# and 30 s are the providers' deadlines (WeChat family, Telegram, forms and the API): the alert on
# deadline misses (deploy/prometheus/alerts.yml) counts the acks above them.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


MINUTES = 60  # the status page's charts: the last hour, a bar a minute


class MinuteRing:
    """A value per minute over the last ``size`` minutes: a sum (counts) or a maximum (latency).

    Slot ``minute % size`` holds the minute it was last written for; a slot found holding an older
    minute is stale and starts again from zero, so nothing ticks in the background and an idle
    series costs nothing.
    """

    __slots__ = ("_minutes", "_size", "_values")

    def __init__(self, size: int = MINUTES) -> None:
        self._size = size
        self._values = [0.0] * size
        self._minutes = [-1] * size

    def add(self, minute: int, value: float = 1.0) -> None:
        slot = minute % self._size
        if self._minutes[slot] != minute:
            self._minutes[slot], self._values[slot] = minute, 0.0
        self._values[slot] += value

    def raise_to(self, minute: int, value: float) -> None:
        """Keep the largest ``value`` seen in ``minute``."""
        slot = minute % self._size
        if self._minutes[slot] != minute:
            self._minutes[slot], self._values[slot] = minute, value
        elif value > self._values[slot]:
            self._values[slot] = value

    def series(self, now_minute: int) -> list[float]:
        """The last ``size`` minutes, oldest first, ending with ``now_minute`` (0 where nothing came)."""
        out = []
        for minute in range(now_minute - self._size + 1, now_minute + 1):
            slot = minute % self._size
            out.append(self._values[slot] if self._minutes[slot] == minute else 0.0)
        return out


@dataclass(slots=True)
class _Recent:
    """The last hour of one (channel, inbox)."""

    outcomes: dict[str, MinuteRing] = field(default_factory=dict)
    refusals: dict[str, MinuteRing] = field(default_factory=dict)
    worst_ack: MinuteRing = field(default_factory=MinuteRing)
    last_message_at: float | None = None


class RecentActivity:
    """Per (channel, inbox), the last hour a minute at a time: outcomes, refusals by reason, the
    slowest ack; and when the last message was stored. Fed by the same calls that count
    ``/metrics``, so the status page's charts and the Prometheus counters cannot disagree.

    In memory and per process, like the counters. At most ``max_keys`` pairs are kept (inboxes come
    from the configuration, so this only bounds a connector that passed a made-up one); past it a
    pair's figures go to the channel's ``""`` inbox.
    """

    def __init__(self, clock: Callable[[], float] = time.time, max_keys: int = 1000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._recent: dict[tuple[str, str], _Recent] = {}

    def _entry(self, channel: str, inbox: str) -> _Recent:
        entry = self._recent.get((channel, inbox))
        if entry is None:
            if len(self._recent) >= self._max_keys:
                inbox = ""
                entry = self._recent.get((channel, inbox))
            if entry is None:
                entry = self._recent[(channel, inbox)] = _Recent()
        return entry

    def declare(self, channel: str, inbox: str) -> None:
        """Show ``inbox`` of ``channel`` before its first message (an empty chart)."""
        self._entry(channel, inbox)

    def outcome(self, channel: str, inbox: str, outcome: str, ack_seconds: float | None) -> None:
        now = self._clock()
        minute = int(now // 60)
        entry = self._entry(channel, inbox)
        ring = entry.outcomes.get(outcome)
        if ring is None:
            ring = entry.outcomes[outcome] = MinuteRing()
        ring.add(minute)
        if ack_seconds is not None:
            entry.worst_ack.raise_to(minute, ack_seconds)
            entry.last_message_at = now

    def refusal(self, channel: str, inbox: str, reason: str) -> None:
        entry = self._entry(channel, inbox)
        ring = entry.refusals.get(reason)
        if ring is None:
            ring = entry.refusals[reason] = MinuteRing()
        ring.add(int(self._clock() // 60))

    def snapshot(self) -> list[dict[str, Any]]:
        """Every (channel, inbox): per-minute series of the last hour, oldest first."""
        now = self._clock()
        minute = int(now // 60)
        out = []
        for (channel, inbox), entry in sorted(self._recent.items()):
            out.append({
                "channel": channel,
                "inbox": inbox,
                "minute_end": (minute + 1) * 60,
                "outcomes": {name: ring.series(minute) for name, ring in sorted(entry.outcomes.items())},
                "refusals": {name: ring.series(minute) for name, ring in sorted(entry.refusals.items())},
                "worst_ack": entry.worst_ack.series(minute),
                "last_message_at": entry.last_message_at,
            })
        return out


class Metrics:
    """Counters per channel and outcome, ack latency, outbox backlog and publish results."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        # The last hour per minute for the status page, fed alongside the counters below.
        self.recent = RecentActivity(clock)
        r = self.registry
        self.received = Counter(
            "ticketgate_messages_received", "Inbound requests handed to the pipeline", ["channel"], registry=r
        )
        self.outcomes = Counter(
            "ticketgate_messages",
            "Pipeline outcomes per channel (accepted, duplicate, rejected, quarantined, retry)",
            ["channel", "outcome"],
            registry=r,
        )
        self.ack_latency = Histogram(
            "ticketgate_ack_latency_seconds",
            "From arrival to the durable commit that allows the channel's success answer",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "ticketgate_outbox_backlog", "Events not yet confirmed by the broker", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "ticketgate_outbox_oldest_age_seconds", "Age of the oldest unpublished event", registry=r
        )
        self.publish_confirms = Counter(
            "ticketgate_publish_confirms", "Events confirmed by the broker", registry=r
        )
        self.publish_failures = Counter(
            "ticketgate_publish_failures", "Publish attempts not confirmed", ["reason"], registry=r
        )
        self.broker_connected = Gauge(
            "ticketgate_broker_connected", "1 while the publisher is connected", registry=r
        )
        self.channel_events = Counter(
            "ticketgate_channel_events",
            "What channels report: refused signatures, media that could not be fetched, ignored echoes",
            ["channel", "inbox", "event"],
            registry=r,
        )

        self.refusals = Counter(
            "ticketgate_refusals",
            "Deliveries a channel refused before the pipeline, by reason (signature, auth, size,"
            " rate_limit, malformed); each is also an outcome 'rejected'",
            ["channel", "inbox", "reason"],
            registry=r,
        )

        # The way back (gateway.replies).
        self.replies_sent = Counter(
            "ticketgate_replies_sent", "Replies a provider accepted", ["channel", "inbox"], registry=r
        )
        self.replies_failed = Counter(
            "ticketgate_replies_failed",
            "Replies that ended without going out, by reason (window_closed, rejected, expired, ...)",
            ["channel", "reason"],
            registry=r,
        )
        self.reply_fallbacks = Counter(
            "ticketgate_reply_fallbacks",
            "Mail fallbacks of held replies: scheduled, sent, cancelled (delivered), or not sent"
            " (no_verified_email, no_sender)",
            ["channel", "outcome"],
            registry=r,
        )
        self.reply_attempts = Counter(
            "ticketgate_reply_attempts",
            "Provider calls for replies, by result (sent, failed, retry)",
            ["channel", "result"],
            registry=r,
        )
        self.reply_latency = Histogram(
            "ticketgate_reply_latency_seconds",
            "From the stored command to the provider's acceptance",
            ["channel"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0),
            registry=r,
        )
        self.reply_backlog = Gauge(
            "ticketgate_reply_backlog", "Replies not finished yet (pending or being sent)", registry=r
        )
        self.reply_oldest_age = Gauge(
            "ticketgate_reply_oldest_age_seconds", "Age of the oldest unfinished reply command", registry=r
        )

        # Retention (gateway.app's purge loop): what went, and when the last round finished, so an
        # alert can tell a purge that stopped running (the disk then fills again).
        self.retention_purged = Counter(
            "ticketgate_retention_purged",
            "Rows removed because they outlived their retention (keys, events, messages, raw_bodies, blobs)",
            ["kind"],
            registry=r,
        )
        self.retention_last_round = Gauge(
            "ticketgate_retention_last_round_timestamp_seconds",
            "When the last retention round finished without an error (Unix time)",
            registry=r,
        )

        # Labelled children, looked up once: ``labels()`` takes a lock and rebuilds the key per call.
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def declare_channel(self, channel: str) -> None:
        """Show every outcome of ``channel`` from the start, at 0: a series that appears only with its
        first increment is invisible to ``rate()`` and to alerts until then (``rejected`` seemed
        missing from /metrics)."""
        self._child(self.received, channel)
        for outcome in Outcome:
            self._child(self.outcomes, channel, outcome.value)

    # The pipeline reports through these two methods.
    def message_received(self, channel: str) -> None:
        self._child(self.received, channel).inc()

    def message_done(
        self, channel: str, outcome: str, ack_seconds: float | None, *, inbox: str = ""
    ) -> None:
        """One pipeline outcome; ``ack_seconds`` when the message was stored (a durable ack)."""
        self._child(self.outcomes, channel, outcome).inc()
        if ack_seconds is not None:
            self._child(self.ack_latency, channel).observe(ack_seconds)
        self.recent.outcome(channel, inbox, outcome, ack_seconds)

    def channel_event(self, channel: str, inbox: str, event: str) -> None:
        """One channel-specific occurrence (through ``ChannelContext.metrics``)."""
        self._child(self.channel_events, channel, inbox, event).inc()

    def refused(self, channel: str, inbox: str, reason: str) -> None:
        """One delivery refused by the channel itself (``ChannelContext.metrics.refused``)."""
        self._child(self.outcomes, channel, "rejected").inc()
        self._child(self.refusals, channel, inbox, reason).inc()
        self.recent.outcome(channel, inbox, "rejected", None)
        self.recent.refusal(channel, inbox, reason)

    # The relay reports through these three methods (see gateway.relay).
    def publish_confirmed(self, n: int) -> None:
        self.publish_confirms.inc(n)

    def publish_failed(self, reason: str) -> None:
        self.publish_failures.labels(reason).inc()

    def outbox_status(self, backlog: int, oldest_age: float | None) -> None:
        self.outbox_backlog.set(backlog)
        self.outbox_oldest_age.set(oldest_age or 0.0)

    # The reply dispatcher reports through these.
    def reply_sent(self, channel: str, inbox: str, seconds: float) -> None:
        self._child(self.replies_sent, channel, inbox).inc()
        self._child(self.reply_attempts, channel, "sent").inc()
        self._child(self.reply_latency, channel).observe(seconds)

    def reply_failed(self, channel: str | None, reason: str, *, attempted: bool) -> None:
        self._child(self.replies_failed, channel or "", reason).inc()
        if attempted:
            self._child(self.reply_attempts, channel or "", "failed").inc()

    def reply_fallback(self, channel: str, outcome: str) -> None:
        self._child(self.reply_fallbacks, channel, outcome).inc()

    def reply_retry(self, channel: str) -> None:
        self._child(self.reply_attempts, channel, "retry").inc()

    def reply_status(self, backlog: int, oldest_age: float | None) -> None:
        self.reply_backlog.set(backlog)
        self.reply_oldest_age.set(oldest_age or 0.0)

    def purged(self, kind: str, rows: int) -> None:
        self._child(self.retention_purged, kind).inc(rows)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def samples(self, *names: str) -> Iterable[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of the named metrics, as ``/metrics`` exposes them (a
        counter's ``_total``, a histogram's ``_bucket``/``_count``/``_sum``)."""
        wanted = set(names)
        for family in self.registry.collect():
            if family.name in wanted:
                for sample in family.samples:
                    yield sample.name, sample.labels, sample.value
