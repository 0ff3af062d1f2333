"""Shared HTTP helpers: the token bucket (with an injected clock) and the client address."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from core.http import ClientAddress, RateLimiter, envelope_headers, parse_retry_after, result_status
from core.model import IngestResult, Outcome


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=3, clock=clock)
    assert [limiter.acquire("ip") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("ip") == pytest.approx(1.0)
    clock.now += 0.5
    assert limiter.acquire("ip") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("ip") == 0.0
    assert limiter.acquire("other") == 0.0  # buckets are per key


def test_memory_is_bounded_dropping_the_least_recently_seen() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=1, burst=1, max_keys=2, clock=clock)
    limiter.acquire("a")
    limiter.acquire("b")
    limiter.acquire("a")  # "a" is now the most recently seen
    limiter.acquire("c")  # evicts "b"
    assert len(limiter) == 2
    assert limiter.acquire("a") > 0  # still remembered, still empty
    assert limiter.acquire("b") == 0.0  # forgotten, so full again


def peer(remote: str, forwarded: str | None = None) -> str | None:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = make_mocked_request("POST", "/", headers=headers)
    request = request.clone(remote=remote)
    return ClientAddress(["10.0.0.0/8", "::1"])(request)


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    assert peer("203.0.113.9", "198.51.100.1") == "203.0.113.9"  # not a proxy of ours: ignore the header
    assert peer("10.0.0.2", "198.51.100.1") == "198.51.100.1"
    # The client wrote the leftmost hop itself; the rightmost untrusted hop is the real client.
    assert peer("10.0.0.2", "1.2.3.4, 198.51.100.1, 10.0.0.7") == "198.51.100.1"
    assert peer("10.0.0.2", "10.0.0.9") == "10.0.0.2"
    assert peer("10.0.0.2", "garbage") == "10.0.0.2"
    assert peer("10.0.0.2") == "10.0.0.2"


@pytest.mark.parametrize(("result", "status"), [
    (IngestResult(outcome=Outcome.ACCEPTED), 202),
    (IngestResult(outcome=Outcome.QUARANTINED), 202),
    (IngestResult(outcome=Outcome.DUPLICATE), 200),
    (IngestResult(outcome=Outcome.REJECTED), 400),
    (IngestResult(outcome=Outcome.REJECTED, status=403), 403),
    (IngestResult(outcome=Outcome.REJECTED, status=500), 400),  # a rejection is never a server error
    (IngestResult(outcome=Outcome.RETRY), 503),
])
def test_result_status(result: IngestResult, status: int) -> None:
    assert result_status(result) == status


def test_a_providers_retry_after_is_seconds_or_an_http_date() -> None:
    now = datetime(2026, 12, 5, 8, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Sat, 05 Dec 2026 08:00:30 GMT", now=now) == 30.0
    # A date in the past means "now"; garbage, absence and non-numbers mean "not said".
    assert parse_retry_after("Sat, 05 Dec 2026 07:00:00 GMT", now=now) == 0.0
    for unreadable in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(unreadable, now=now) is None


def test_envelope_headers_drop_credentials_and_the_named_signature_header_in_any_case() -> None:
    request = make_mocked_request("POST", "/line/support", headers=CIMultiDict([
        ("Content-Type", "application/json"), ("X-Line-Signature", "c2lnbmVk"), ("Authorization", "Bearer k"),
        ("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "203.0.113.9"),
    ]))
    kept = {"content-type": "application/json", "x-forwarded-for": "198.51.100.7, 203.0.113.9"}
    assert envelope_headers(request, without="x-line-SIGNATURE") == kept
    assert envelope_headers(request) == kept | {"x-line-signature": "c2lnbmVk"}
