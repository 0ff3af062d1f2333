"""LINE's contract probe (see ``tests/contract/kit.py``): webhook deliveries signed with
``X-Line-Signature`` = base64(HMAC-SHA256(channel secret, body)); anything else is a forgery (401)."""

from __future__ import annotations

from typing import Any

import orjson

from connectors.line.connector import PREFIX, SIGNATURE_HEADER, signature
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

SECRET = "contract-line-channel-secret"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed before checking the signature would answer 400, not 401.
BROKEN_JSON = b'{"destination": "U0", "events": [{'


def sign(body: bytes, secret: str = SECRET) -> str:
    return signature(secret.encode(), body).decode()


class LineProbe(HttpProbe):
    refusal_statuses = frozenset({401})

    def tables(self) -> dict[str, Any]:
        account = {"channel_secret": SECRET, "fetch_media": False}
        return {"line": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "inboxes": {INBOX: account}}}

    def _post(self, body: bytes, signed: str | None) -> HttpDelivery:
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if signed is not None:
            headers[SIGNATURE_HEADER] = signed
        return HttpDelivery(path=f"{PREFIX}/{INBOX}", body=body, headers=headers)

    def delivery(self, n: int, text: str | None = None) -> bytes:
        event = {
            "type": "message", "mode": "active", "timestamp": 1_764_900_000_000 + n,
            "source": {"type": "user", "userId": f"U{n:032x}"},
            "webhookEventId": f"01JCONTRACT{n:015d}", "deliveryContext": {"isRedelivery": False},
            "replyToken": f"{n:032x}"[::-1].replace("0", "a"),
            "message": {"id": str(560_000_000_000 + n), "type": "text", "text": text or f"message {n}",
                        "quoteToken": f"q{n}"},
        }
        return orjson.dumps({"destination": "U" + "d" * 32, "events": [event]})

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        body = self.delivery(n, text)
        return self._post(body, sign(body))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, sign(BROKEN_JSON, "not-the-channel-secret"))

    def oversized(self) -> HttpDelivery:
        body = self.delivery(1, text="x" * LIMIT)
        return self._post(body, sign(body))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON, sign(BROKEN_JSON))


PROBES = {"line": LineProbe()}
