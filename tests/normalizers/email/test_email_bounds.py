"""Bounds: hostile structures are refused with a reason in bounded time, never hang or crash."""

from __future__ import annotations

import time

import pytest

from core.errors import NormalizationError
from normalizers.base import Normalizer
from normalizers.email import EmailLimits, make_email_normalizer, normalize_email
from tests.support.mailkit import envelope

SECONDS = 2.0  # generous for a noisy 2-core machine; an unbounded parser takes minutes on these


def nested(depth: int) -> bytes:
    opening = [b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(depth)]
    closing = [b"\r\n--b%d--\r\n" % i for i in reversed(range(depth))]
    leaf = b"Content-Type: text/plain\r\n\r\nhi\r\n"
    return b"From: a@example.com\r\nSubject: deep\r\n" + b"".join(opening) + leaf + b"".join(closing)


def many_parts(count: int) -> bytes:
    parts = b"".join(b"--B\r\nContent-Type: text/plain\r\n\r\nx%d\r\n" % i for i in range(count))
    return b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n" + parts + b"--B--\r\n"


def refused(body: bytes, match: str, normalizer: Normalizer = normalize_email) -> None:
    started = time.perf_counter()
    with pytest.raises(NormalizationError, match=match):
        normalizer(envelope(body))
    assert time.perf_counter() - started < SECONDS


def test_depth_100_is_refused() -> None:
    refused(nested(100), "nesting deeper than 32")


def test_depth_within_bound_is_accepted() -> None:
    message = normalize_email(envelope(nested(10)))[0]
    assert message.text is not None
    assert message.text.strip() == "hi"


def test_depth_10000_is_refused_before_parsing() -> None:
    refused(nested(10_000), "nesting deeper than 32")


def test_10000_parts_are_refused() -> None:
    refused(many_parts(10_000), "more than 1000 MIME parts")


def test_parts_within_bound_are_accepted() -> None:
    assert normalize_email(envelope(many_parts(50)))[0].text is not None


def test_one_megabyte_header_line_is_refused() -> None:
    refused(b"From: a@example.com\r\nSubject: " + b"a " * 500_000 + b"\r\n\r\nbody", "limit 65536")


def test_one_megabyte_header_line_in_a_nested_part_is_refused() -> None:
    body = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b'Content-Type: text/plain; name="' + b"x" * 1_000_000 + b'"\r\n\r\nhi\r\n--B--\r\n'
    )
    refused(body, "limit 65536")


def test_header_count_is_bounded() -> None:
    body = b"From: a@example.com\r\n" + b"X-Spam: 1\r\n" * 5000 + b"\r\nbody"
    refused(body, "more than 1000 header fields")


def test_total_size_is_bounded() -> None:
    small = make_email_normalizer(EmailLimits(max_bytes=10_000))
    refused(b"From: a@example.com\r\n\r\n" + b"x" * 20_000, "limit 10000", small)


def test_decoded_size_is_bounded() -> None:
    limited = make_email_normalizer(EmailLimits(max_decoded_bytes=1000))
    attachment = b"QUFB" * 1000  # 3000 decoded bytes
    body = (
        b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + attachment
        + b"\r\n--B--\r\n"
    )
    refused(body, "decoded parts exceed 1000 bytes", limited)


def test_deep_chain_of_forwarded_messages_is_refused() -> None:
    body = b"Content-Type: text/plain\r\n\r\nhi\r\n"
    for _ in range(200):
        body = b"Content-Type: message/rfc822\r\n\r\n" + body
    refused(b"From: a@example.com\r\n" + body, "nest")
