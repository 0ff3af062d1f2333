"""The email channel's contract probe (see ``tests/contract/kit.py``): real SMTP, with smtplib,
to the listener on a port of its own. "Forged" is a mail for an address that is not ours."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
from dataclasses import dataclass
from typing import Any

from connectors.email import EmailConnector
from tests.contract.kit import INBOX, Answer, Gateway

OURS, NOT_OURS = "support@demo.localhost", "someone@elsewhere.example"
LIMIT = 16 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class Mail:
    rcpt: str
    raw: bytes


def mail(n: int, *, body: str | None = None) -> bytes:
    return (
        f"From: Customer {n} <customer{n}@customer.example>\r\nTo: {OURS}\r\nSubject: order {n}\r\n"
        f"Message-ID: <contract-{n}@customer.example>\r\nDate: Sat, 05 Dec 2026 03:00:00 +0000\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body or f'message {n}'}\r\n"
    ).encode()


def _deliver(port: int, delivery: Mail) -> Answer:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("customer@customer.example", [delivery.rcpt], delivery.raw)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return _answer(code, text)
    except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
        return _answer(exc.smtp_code, exc.smtp_error)
    return Answer(kind="accepted", status=250)


def _answer(code: int, text: bytes | str) -> Answer:
    message = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if 400 <= code < 500:
        return Answer(kind="retry", status=code, text=message)
    return Answer(kind="refused", status=code, text=message)


class EmailProbe:
    refusal_statuses = frozenset({550})
    answer_within = 3.0

    def tables(self) -> dict[str, Any]:
        return {
            "email": {
                "smtp": {"host": "127.0.0.1", "port": 0, "max_message_size": LIMIT, "ingest_timeout": 1.0},
                "inboxes": {INBOX: {"addresses": [OURS]}},
            }
        }

    def serve(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()

    def valid(self, n: int, text: str | None = None) -> Mail:
        return Mail(rcpt=OURS, raw=mail(n, body=text))

    def forged(self, n: int) -> Mail:
        return Mail(rcpt=NOT_OURS, raw=b"\x00not a mail\r\n")

    def oversized(self) -> Mail:
        return Mail(rcpt=OURS, raw=mail(1, body="x" * LIMIT))

    def malformed(self) -> Mail:
        # The parser is lenient with headers by design; MIME nested past its bound is what it gives up on.
        nested = "".join(
            f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n" for i in range(40)
        )
        head = mail(99).split(b"Content-Type:")[0].decode()
        raw = f"{head}Content-Type: multipart/mixed; boundary=b0\r\n\r\n{nested}"
        return Mail(rcpt=OURS, raw=raw.encode())

    async def send(self, gateway: Gateway, delivery: Any) -> Answer:
        connector = gateway.connector
        assert isinstance(connector, EmailConnector)
        assert connector.smtp is not None
        return await asyncio.to_thread(_deliver, connector.smtp.port, delivery)

    async def settle(self, gateway: Gateway) -> None:
        return None


PROBES = {"email": EmailProbe()}
