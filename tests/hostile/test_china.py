"""Hostile bytes at Douyin and Weibo: non-UTF-8 signatures, query parameters and Msg-Id headers are
refused or stored as escapes, never a 500."""

from __future__ import annotations

import orjson

from connectors.douyin.account import signature as douyin_signature
from tests.hostile.kit import DOUYIN_SECRET, INBOX, Gateway

BAD = b"\xff\xfe\xc3\x28"


def douyin_body() -> bytes:
    return orjson.dumps(
        {
            "event": "im_receive_msg",
            "client_key": "awhostile",
            "from_user_id": "_000hostile",
            "content": {
                "conversation_short_id": "@c==",
                "server_message_id": "@hostile1==",
                "conversation_type": 1,
                "message_type": "text",
                "text": "hi",
                "create_time": 1764921600000,
            },
        }
    )


async def test_a_non_utf8_douyin_signature_is_401(sqlite_gateway: Gateway) -> None:
    head = (
        f"POST /douyin/{INBOX} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n".encode()
    )
    status, _ = await sqlite_gateway.raw_http(head + b"X-Douyin-Signature: " + BAD, douyin_body())
    assert status == 401


async def test_a_non_utf8_msg_id_on_a_signed_push_is_stored_not_500(sqlite_gateway: Gateway) -> None:
    body = douyin_body()
    head = (
        (
            f"POST /douyin/{INBOX} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
            f"X-Douyin-Signature: {douyin_signature(DOUYIN_SECRET, body)}\r\n"
        ).encode()
        + b"Msg-Id: "
        + BAD
    )
    status, _ = await sqlite_gateway.raw_http(head, body)
    assert status == 200
    [event] = await sqlite_gateway.events(1)
    assert event["message"]["external_id"] == "@hostile1=="


async def test_non_utf8_weibo_query_parameters_are_refused_not_500(sqlite_gateway: Gateway) -> None:
    for method in ("GET", "POST"):
        head = (
            f"{method} /weibo/{INBOX}?signature=%C3%28&timestamp=%FF&nonce=%C3%28&echostr=%FF HTTP/1.1\r\n"
            "Host: gateway.test\r\nContent-Type: application/json"
        ).encode()
        status, _ = await sqlite_gateway.raw_http(head, b'{"type": "text"}')
        assert status == 401, method


async def test_the_accounts_own_message_is_answered_200_and_makes_nothing(sqlite_gateway: Gateway) -> None:
    """im_send_msg (the brand's own message, our replies included) is understood, not a ticket."""
    body = orjson.dumps(
        {
            "event": "im_send_msg",
            "client_key": "awhostile",
            "from_user_id": "_000brand",
            "content": {"server_message_id": "@own==", "message_type": "text", "text": "您好"},
        }
    )
    head = (
        f"POST /douyin/{INBOX} HTTP/1.1\r\nHost: gateway.test\r\nContent-Type: application/json\r\n"
        f"X-Douyin-Signature: {douyin_signature(DOUYIN_SECRET, body)}"
    ).encode()
    status, _ = await sqlite_gateway.raw_http(head, body)
    assert status == 200
    assert sqlite_gateway.bus.published == []
