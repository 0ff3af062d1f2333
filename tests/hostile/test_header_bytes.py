"""Header and query bytes that are not UTF-8, in every place the gateway reads them.

aiohttp hands such bytes over as lone surrogates; anything that encodes them plainly raises
``UnicodeEncodeError`` (a 500, and an authentication failure that the failed-auth limiter never
counted). Each must be an ordinary refusal instead.
"""

from __future__ import annotations

import pytest

from tests.hostile.kit import API_KEY, BLOB_TOKEN, INBOX, Gateway, api_message

BAD = b"\xc3\x28"  # a UTF-8 lead byte followed by a non-continuation byte


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (b"POST /api/v1/messages HTTP/1.1\r\nContent-Type: application/json", api_message()),
        (b"GET /api/v1/customers/cus_1 HTTP/1.1", b""),
    ],
    ids=["api", "desk"],
)
async def test_a_non_utf8_bearer_token_is_401_and_counted_by_the_failed_auth_limiter(
    sqlite_gateway: Gateway, head: bytes, body: bytes
) -> None:
    request = head + b"\r\nHost: gateway.test\r\nAuthorization: Bearer " + BAD
    statuses = [(await sqlite_gateway.raw_http(request, body))[0] for _ in range(4)]
    # auth_failures_burst is 3 in the kit: the fourth failure from this address is throttled.
    assert statuses == [401, 401, 401, 429]


async def test_a_non_utf8_telegram_secret_is_401(sqlite_gateway: Gateway) -> None:
    head = (
        f"POST /telegram/{INBOX} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
        "X-Telegram-Bot-Api-Secret-Token: "
    ).encode() + BAD
    status, _ = await sqlite_gateway.raw_http(head, b"{}")
    assert status == 401


@pytest.mark.parametrize("path", [f"/blobs/{'0' * 64}", f"/media/telegram/{INBOX}/ref"])
@pytest.mark.parametrize("token", [BAD, b"wrong-token", None], ids=["non-utf8", "wrong", "missing"])
async def test_failed_blob_tokens_are_401_then_throttled_by_the_failed_auth_limiter(
    sqlite_gateway: Gateway, path: str, token: bytes | None
) -> None:
    head = f"GET {path} HTTP/1.1\r\nHost: gateway.test".encode()
    if token is not None:
        head += b"\r\nAuthorization: Bearer " + token
    statuses = [(await sqlite_gateway.raw_http(head))[0] for _ in range(4)]
    # blob_auth_failures_burst is 3 in the kit: the fourth failure from this address is throttled.
    assert statuses == [401, 401, 401, 429]
    right = f"GET {path} HTTP/1.1\r\nHost: gateway.test\r\nAuthorization: Bearer {BLOB_TOKEN}".encode()
    assert (await sqlite_gateway.raw_http(right))[0] == 404  # the token itself still works


async def test_a_non_utf8_idempotency_key_is_400(sqlite_gateway: Gateway) -> None:
    head = (
        "POST /api/v1/messages HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nIdempotency-Key: "
    ).encode() + BAD
    status, body = await sqlite_gateway.raw_http(head, api_message())
    assert status == 400
    assert b"invalid_idempotency_key" in body


async def test_non_utf8_bytes_in_other_headers_are_stored_as_escapes(sqlite_gateway: Gateway) -> None:
    """Forwarding and tracing headers are not read as credentials; they travel in the envelope."""
    head = (
        "POST /api/v1/messages HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\n"
    ).encode() + b"X-Forwarded-For: " + BAD + b"\r\nOrigin: " + BAD + b"\r\nX-Trace: " + BAD
    status, _ = await sqlite_gateway.raw_http(head, api_message())
    assert status == 202


async def test_non_utf8_wechat_query_parameters_are_refused_not_500(sqlite_gateway: Gateway) -> None:
    head = (
        f"POST /wechat/{INBOX}?msg_signature=%C3%28&timestamp=%C3%28&nonce=%FF&encrypt_type=aes HTTP/1.1\r\n"
        "Host: gateway.test\r\nContent-Type: text/xml"
    ).encode()
    status, _ = await sqlite_gateway.raw_http(head, b"<xml><Encrypt><![CDATA[AAAA]]></Encrypt></xml>")
    assert status == 401
