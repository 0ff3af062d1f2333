"""The public web form under hostile input, through the real app: header bytes in Origin and
Referer, form data that is not UTF-8, oversized multipart bodies and too many fields.

Each is an ordinary refusal (403 / 400 / 413 as JSON, never a 500), nothing reaches the pipeline or
the bus, and the refusal is counted by reason on /metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.keys import METRICS
from tests.hostile.kit import FORM_LIMIT, FORM_ORIGIN, INBOX, Gateway

BAD = b"\xc3\x28"  # not UTF-8
PATH = f"/forms/{INBOX}"
URLENCODED = b"Content-Type: application/x-www-form-urlencoded"
VALID = b"message=where+is+my+order&email=ada%40example.com"


def head(*headers: bytes) -> bytes:
    return b"\r\n".join(
        [f"POST {PATH} HTTP/1.1".encode(), b"Host: gateway.test", b"Accept: application/json", *headers]
    )


ALLOWED = b"Origin: " + FORM_ORIGIN.encode()


async def post(gateway: Gateway, content_type: bytes, body: bytes) -> tuple[int, bytes]:
    """A post from the allowed origin."""
    return await gateway.raw_http(head(content_type, ALLOWED), body)


def multipart(parts: list[tuple[bytes, bytes]], boundary: bytes = b"hostile") -> tuple[bytes, bytes]:
    """(Content-Type header line, body) of a multipart/form-data body of ``(name, value)`` fields."""
    body = b"".join(
        b"--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n" % (boundary, name, value)
        for name, value in parts
    )
    body += b"--" + boundary + b"--\r\n"
    return b"Content-Type: multipart/form-data; boundary=" + boundary, body


def refusals(gateway: Gateway, reason: str) -> float:
    value = gateway.client.app[METRICS].registry.get_sample_value(
        "ticketgate_refusals_total", {"channel": "form", "inbox": INBOX, "reason": reason}
    )
    return value or 0.0


async def assert_nothing_published(gateway: Gateway) -> None:
    await asyncio.sleep(0)  # an inline relay would have published by the time the answer came
    assert gateway.bus.published == []


@pytest.mark.parametrize(
    "origin",
    [
        b"Origin: " + BAD,
        b"Origin: " + FORM_ORIGIN.encode() + BAD,
        b"Origin: " + FORM_ORIGIN.encode() + b".evil.example",
        b"Origin: https://evil.example\r\nReferer: " + FORM_ORIGIN.encode() + b"/contact",
        b"Referer: " + BAD,
        b"Referer: https://shop.example" + BAD + b"/contact",
        b"Referer: https://shop.example.evil.example/contact",
        b"Origin: null",
    ],
    ids=[
        "origin-not-utf8", "allowed-origin-plus-bytes", "allowed-origin-as-prefix",
        "origin-wins-over-referer", "referer-not-utf8", "referer-host-plus-bytes",
        "referer-allowed-as-prefix", "opaque-origin",
    ],
)
async def test_hostile_origin_and_referer_bytes_are_a_403(sqlite_gateway: Gateway, origin: bytes) -> None:
    status, body = await sqlite_gateway.raw_http(head(URLENCODED, origin), VALID)

    assert status == 403, body
    assert b"origin_not_allowed" in body
    assert refusals(sqlite_gateway, "auth") == 1
    await assert_nothing_published(sqlite_gateway)


@pytest.mark.parametrize("header", [b"Origin: \x00" + ALLOWED[8:], b"Referer: \x7f" + ALLOWED[8:]])
async def test_control_bytes_in_origin_are_refused_not_a_500(sqlite_gateway: Gateway, header: bytes) -> None:
    status, body = await sqlite_gateway.raw_http(head(URLENCODED, header), VALID)

    assert status in (400, 403), body
    await assert_nothing_published(sqlite_gateway)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (URLENCODED, b"message=" + BAD + b"&email=ada%40example.com"),
        (URLENCODED, b"message=%C3%28&email=ada%40example.com"),
        (URLENCODED, b"message%FF=hello&email=ada%40example.com"),
        multipart([(b"message", BAD), (b"email", b"ada@example.com")]),
        multipart([(b"message" + BAD, b"hello"), (b"email", b"ada@example.com")]),
    ],
    ids=["raw-bytes", "percent-encoded", "in-a-name", "multipart-value", "multipart-name"],
)
async def test_form_data_that_is_not_utf8_is_a_400(
    sqlite_gateway: Gateway, content_type: bytes, body: bytes
) -> None:
    status, answer = await post(sqlite_gateway, content_type, body)

    assert status == 400, answer
    assert refusals(sqlite_gateway, "malformed") == 1
    await assert_nothing_published(sqlite_gateway)


async def post_chunked(gateway: Gateway, content_type: bytes, body: bytes) -> tuple[int, bytes]:
    """A post from the allowed origin without Content-Length: nothing to refuse before reading."""
    return await gateway.raw_http(head(content_type, ALLOWED), body, chunked=True)


@pytest.mark.parametrize("send", [post, post_chunked], ids=["content-length", "chunked"])
async def test_an_oversized_multipart_body_is_a_413(
    sqlite_gateway: Gateway, send: Callable[[Gateway, bytes, bytes], Awaitable[tuple[int, bytes]]]
) -> None:
    content_type, body = multipart([(b"message", b"x" * FORM_LIMIT), (b"email", b"ada@example.com")])
    status, answer = await send(sqlite_gateway, content_type, body)

    assert status == 413, answer
    assert refusals(sqlite_gateway, "size") == 1
    await assert_nothing_published(sqlite_gateway)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (URLENCODED, b"&".join(b"f%d=v" % i for i in range(500)) + b"&message=hi&email=a%40b.example"),
        multipart([(b"f%d" % i, b"v") for i in range(500)] + [(b"message", b"hi"), (b"email", b"a@b.ex")]),
    ],
    ids=["urlencoded", "multipart"],
)
async def test_too_many_fields_are_a_413(sqlite_gateway: Gateway, content_type: bytes, body: bytes) -> None:
    status, answer = await post(sqlite_gateway, content_type, body)

    assert status == 413, answer
    assert refusals(sqlite_gateway, "size") == 1
    await assert_nothing_published(sqlite_gateway)


async def test_the_form_still_takes_a_valid_post(sqlite_gateway: Gateway) -> None:
    """The cases above are refusals of this form, not of everything."""
    status, answer = await post(sqlite_gateway, URLENCODED, VALID)

    assert status == 202, answer
    [event] = await sqlite_gateway.events(1)
    assert event["message"]["text"] == "where is my order"
