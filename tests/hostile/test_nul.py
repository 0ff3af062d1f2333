"""NUL in what a customer sends: one rule on both stores, through real channels.

Before, PostgreSQL refused the NUL at commit and the channel answered "retry" (503 / 451) every
time, so senders retried for days, while SQLite stored it and published it in the event and in
the customer's identity. Now NUL is dropped from the message's texts, and an identity with a
control character is refused as invalid input: never a retry.
"""

from __future__ import annotations

import asyncio
import smtplib

import orjson

from tests.hostile.kit import API_KEY, MAILBOX, Gateway

JSON = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


async def test_nul_in_an_api_text_is_dropped(gateway: Gateway) -> None:
    body = {"customer": {"email": "alice@customer.example"}, "subject": "re\x00fund", "text": "hel\x00lo"}
    response = await gateway.client.post("/api/v1/messages", data=orjson.dumps(body), headers=JSON)
    assert response.status == 202
    [event] = await gateway.events(1)
    assert (event["message"]["subject"], event["message"]["text"]) == ("refund", "hello")


async def test_nul_in_an_api_identity_is_refused_for_good(gateway: Gateway) -> None:
    body = {"customer": {"email": "a\x00b@customer.example"}, "text": "hello"}
    response = await gateway.client.post("/api/v1/messages", data=orjson.dumps(body), headers=JSON)
    assert response.status == 422
    assert gateway.bus.published == []


def _smtp(port: int, mail_from: str, message: bytes) -> tuple[int, bytes]:
    """MAIL FROM as given (smtplib would quote it), then the message; the final reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example")
        code, text = client.docmd(f"MAIL FROM:<{mail_from}>")
        if code != 250:
            return code, text
        code, text = client.rcpt(MAILBOX)
        assert code == 250, text
        return client.data(message)


def mail(*, sender: str = "alice@customer.example", subject: str = "Where is my order?") -> bytes:
    head = (
        f"From: Alice <{sender}>\r\nTo: {MAILBOX}\r\nSubject: {subject}\r\n"
        "Message-ID: <nul-1@customer.example>\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nHello\r\n"
    )
    return head.encode()


async def send(gateway: Gateway, mail_from: str, message: bytes) -> tuple[int, bytes]:
    return await asyncio.to_thread(_smtp, gateway.smtp_port, mail_from, message)


async def test_nul_in_a_mail_subject_and_mail_from_is_dropped(gateway: Gateway) -> None:
    code, text = await send(gateway, "bounce\x00s@customer.example", mail(subject="Where\x00 is it?"))
    assert code == 250, text
    [event] = await gateway.events(1)
    assert event["message"]["subject"] == "Where is it?"
    assert "\x00" not in orjson.dumps(event).decode("unicode_escape")


async def test_nul_in_a_mail_sender_address_is_refused_for_good(gateway: Gateway) -> None:
    code, text = await send(gateway, "alice@customer.example", mail(sender="a\x00b@customer.example"))
    assert code == 554, text
    assert gateway.bus.published == []
