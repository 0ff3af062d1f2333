"""One idempotency key, two different messages: never silently dropped, on both stores.

Before, the second message got the first one's answer (200 ``duplicate`` with its ids) and was
lost. The API client is now told (422, as the IETF Idempotency-Key draft says); a channel whose
provider signs its payloads keeps its duplicate answer, and the delivery is quarantined with its
raw bytes and a reason, counted in ``ticketgate_channel_events_total{event="idempotency_key_reused"}``.
A true repeat is a duplicate as before.
"""

from __future__ import annotations

import asyncio
import smtplib
import time

import orjson
from aiohttp import ClientResponse

from tests.hostile.kit import API_KEY, INBOX, MAILBOX, TG_SECRET, Gateway, wechat_callback

KEY_REUSED = 'event="idempotency_key_reused"'


async def post_api(gateway: Gateway, body: bytes, key: str) -> ClientResponse:
    headers = {
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", "Idempotency-Key": key
    }
    return await gateway.client.post("/api/v1/messages", data=body, headers=headers)


async def reused_count(gateway: Gateway) -> float:
    text = await (await gateway.client.get("/metrics")).text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ticketgate_channel_events_total{") and KEY_REUSED in line
    )


async def test_the_api_refuses_an_idempotency_key_reused_for_another_body(gateway: Gateway) -> None:
    first = {"customer": {"email": "alice@customer.example"}, "text": "my order is late"}
    answer = await post_api(gateway, orjson.dumps(first), "k1")
    assert answer.status == 202
    ids = await answer.json()
    # A true repeat, even with the body spelled differently, is the first answer again.
    respelled = orjson.dumps(first, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    again = await post_api(gateway, respelled, "k1")
    assert again.status == 200
    assert await again.json() == {**ids, "status": "duplicate"}
    other = {**first, "text": "and please change my address"}
    reused = await post_api(gateway, orjson.dumps(other), "k1")
    assert reused.status == 422
    assert "idempotency key" in (await reused.json())["reason"]
    assert len(await gateway.events(1)) == 1
    assert await reused_count(gateway) == 1


def telegram_update(text: str) -> bytes:
    message = {
        "message_id": 7, "date": 1_764_900_000, "chat": {"id": 1001, "type": "private"},
        "from": {"id": 1001, "is_bot": False, "first_name": "Ann"}, "text": text,
    }
    return orjson.dumps({"update_id": 900_001, "message": message})


async def test_telegram_keeps_its_answer_and_records_a_reused_message_id(gateway: Gateway) -> None:
    headers = {"X-Telegram-Bot-Api-Secret-Token": TG_SECRET, "Content-Type": "application/json"}
    for text in ("hello", "hello", "something else"):
        answer = await gateway.client.post(f"/telegram/{INBOX}", data=telegram_update(text), headers=headers)
        assert answer.status == 200
    [record] = await gateway.store.quarantine_list()
    assert "idempotency key reused" in record.reason
    found = await gateway.store.quarantine_get(record.id)
    assert found is not None
    assert found[1].body == telegram_update("something else")
    assert await reused_count(gateway) == 1


def wechat_text(content: str, created: int) -> str:
    return (
        "<xml><ToUserName><![CDATA[gh_demo]]></ToUserName><FromUserName><![CDATA[oUser1]]></FromUserName>"
        f"<CreateTime>{created}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{content}]]></Content><MsgId>24600000000000009</MsgId></xml>"
    )


async def test_wechat_keeps_its_answer_and_records_a_reused_msgid(gateway: Gateway) -> None:
    created = int(time.time())  # a retry repeats the payload, CreateTime included
    for content in ("hello", "hello", "something else"):
        path, body = wechat_callback(wechat_text(content, created))
        answer = await gateway.client.post(path, data=body)
        assert (answer.status, await answer.text()) == (200, "success")
    [record] = await gateway.store.quarantine_list()
    assert "idempotency key reused" in record.reason


def _send_mail(port: int, body: str) -> None:
    message = (
        f"From: Alice <alice@customer.example>\r\nTo: {MAILBOX}\r\nSubject: Order\r\n"
        "Message-ID: <same-id@customer.example>\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("alice@customer.example", [MAILBOX], message.encode())  # raises unless 250


async def test_email_keeps_its_answer_and_records_a_reused_message_id(gateway: Gateway) -> None:
    for body in ("Where is my order?", "Where is my order?", "A different mail, same Message-ID"):
        await asyncio.to_thread(_send_mail, gateway.smtp_port, body)
    [record] = await gateway.store.quarantine_list()
    assert "idempotency key reused" in record.reason
    received = [e for e in await gateway.events(2) if e["type"] == "message.received"]
    assert len(received) == 1
