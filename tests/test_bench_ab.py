"""bench/ab.py reads the figures the benchmarks print; a figure it misreads makes a wrong ratio."""

from bench.ab import figures

INGEST = """\
gateway: API -> SQLite group commit -> outbox relay -> RabbitMQ (confirms), pid 8728
closed loop, 64 connections, 8 s:
  acked            6230 requests (775/s), statuses {202: 6230}
  on the queue     6231 events, 1,774 events/s end to end
  ack latency      p50 81.0 ms, p99 104.6 ms
open loop, 1,000 req/s offered for 8 s:
  statuses         {202: 8000}
  ack latency      p50 498.9 ms, p99 1364.8 ms, max 2151.8 ms
CPU per event in the closed loop (us; the machine has 2585 us per event at this rate):
  gateway          1252 us in all
    event loop                        406
    store writer and other threads    705
    relay process                     141
    normalizer process                  0
    postgresql                       2300
    broker                             63
"""

MAIL = (
    "   5 KB  end to end          197 mails/s  /bare  0.35  server CPU  2320 us/mail"
    " (event loop 530, other threads 880, normalizer process 705, relay process 205)"
)


def test_ingest_figures_are_read_by_name() -> None:
    assert figures(INGEST) == {
        "events/s": 1774,
        "closed p99 ms": 104.6,
        "open p99 ms": 1364.8,
        "gateway us/event": 1252,
        "event loop us": 406,
        "writer+threads us": 705,
        "relay us": 141,
        "normalizer us": 0,
        "postgresql us": 2300,
    }


def test_mail_row_is_read_by_process() -> None:
    assert figures(MAIL) == {
        "mail us/mail": 2320,
        "mail event loop us": 530,
        "mail threads us": 880,
        "mail normalizer us": 705,
        "mail relay us": 205,
        "mails/s": 197,
    }


def test_a_figure_not_printed_is_absent() -> None:
    assert "postgresql us" not in figures(INGEST.replace("postgresql", "other"))
