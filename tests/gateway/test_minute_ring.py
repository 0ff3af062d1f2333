"""The status page's last hour: per-minute rings fed by the same calls that count /metrics."""

from __future__ import annotations

from gateway.metrics import MINUTES, Metrics, MinuteRing, RecentActivity


class Clock:
    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def test_a_ring_sums_each_minute_and_shows_the_last_hour_oldest_first() -> None:
    ring = MinuteRing()
    ring.add(1000)
    ring.add(1000)
    ring.add(1003, 5)
    series = ring.series(1003)
    assert len(series) == MINUTES
    assert series[-1] == 5
    assert series[-4] == 2
    assert sum(series) == 7


def test_a_minute_older_than_the_window_is_gone_and_its_slot_starts_again() -> None:
    ring = MinuteRing(size=60)
    ring.add(1000, 3)
    assert sum(ring.series(1059)) == 3  # still inside the hour
    assert sum(ring.series(1060)) == 0  # an hour later: out of the window, though not overwritten
    ring.add(1060)  # the same slot, a new minute: starts from 0, not from 3
    assert ring.series(1060)[-1] == 1
    assert sum(ring.series(1060)) == 1


def test_raise_to_keeps_the_largest_value_of_each_minute() -> None:
    ring = MinuteRing()
    ring.raise_to(10, 0.02)
    ring.raise_to(10, 0.5)
    ring.raise_to(10, 0.1)
    assert ring.series(10)[-1] == 0.5
    ring.raise_to(70, 0.01)  # the same slot an hour later: the old maximum does not carry over
    assert ring.series(70)[-1] == 0.01


def test_recent_activity_is_per_channel_and_inbox_with_the_last_stored_message() -> None:
    clock = Clock()
    recent = RecentActivity(clock)
    recent.declare("form", "quiet")
    recent.outcome("api", "shop", "accepted", 0.004)
    recent.outcome("api", "shop", "duplicate", 0.002)
    clock.now += 120
    recent.outcome("api", "shop", "rejected", None)
    recent.refusal("api", "", "auth")
    rows = {(r["channel"], r["inbox"]): r for r in recent.snapshot()}
    assert set(rows) == {("api", "shop"), ("api", ""), ("form", "quiet")}
    shop = rows[("api", "shop")]
    assert shop["outcomes"]["accepted"][-3] == 1
    assert shop["outcomes"]["rejected"][-1] == 1
    assert max(shop["worst_ack"]) == 0.004
    # The last *stored* message: the refusal two minutes later does not move it.
    assert shop["last_message_at"] == clock.now - 120
    assert rows[("api", "")]["refusals"]["auth"][-1] == 1
    assert rows[("form", "quiet")]["last_message_at"] is None
    assert sum(rows[("form", "quiet")]["worst_ack"]) == 0


def test_recent_activity_is_bounded_in_inboxes() -> None:
    recent = RecentActivity(Clock(), max_keys=3)
    for i in range(10):
        recent.outcome("api", f"made-up-{i}", "accepted", 0.001)
    rows = recent.snapshot()
    assert len(rows) <= 4  # three pairs and the channel's "" row that takes the rest
    assert sum(sum(r["outcomes"]["accepted"]) for r in rows) == 10


def test_metrics_feed_the_counters_and_the_rings_together() -> None:
    clock = Clock()
    metrics = Metrics(clock=clock)
    metrics.declare_channel("api")
    for _ in range(3):
        metrics.message_done("api", "accepted", 0.01, inbox="shop")
    metrics.refused("api", "shop", "rate_limit")
    exposed = metrics.exposition().decode()
    assert 'ticketgate_messages_total{channel="api",outcome="accepted"} 3.0' in exposed
    assert 'ticketgate_messages_total{channel="api",outcome="rejected"} 1.0' in exposed
    [row] = metrics.recent.snapshot()
    assert sum(row["outcomes"]["accepted"]) == 3
    assert sum(row["outcomes"]["rejected"]) == 1
    assert sum(row["refusals"]["rate_limit"]) == 1
    samples = {(name, tuple(sorted(labels.items()))): value for name, labels, value in metrics.samples(
        "ticketgate_messages"
    )}
    assert samples[("ticketgate_messages_total", (("channel", "api"), ("outcome", "accepted")))] == 3
