"""Weibo's contract probe (see ``tests/contract/kit.py``): pushes whose query carries
``signature`` = SHA-1 of the sorted app secret, timestamp and nonce; anything else is refused."""

from __future__ import annotations

import time
from typing import Any

import orjson

from connectors.weibo.account import signature
from connectors.weibo.connector import PREFIX
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

SECRET = "contract-weibo-secret"
LIMIT = 16 * 1024
BROKEN_JSON = b'{"type": "text", "sender_id": '


class WeiboProbe(HttpProbe):
    refusal_statuses = frozenset({401, 403})

    def tables(self) -> dict[str, Any]:
        account = {"inbox": INBOX, "app_secret": SECRET}
        return {"weibo": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "accounts": {"demo": account}}}

    def _post(self, body: bytes, secret: str = SECRET) -> HttpDelivery:
        timestamp, nonce = str(int(time.time() * 1000)), "57155157"
        query = {"signature": signature(secret, timestamp, nonce), "timestamp": timestamp, "nonce": nonce}
        return HttpDelivery(
            path=f"{PREFIX}/demo", body=body, query=query, headers={"Content-Type": "application/json"}
        )

    def delivery(self, n: int, text: str | None = None) -> bytes:
        return orjson.dumps(
            {
                "type": "text",
                "receiver_id": 1902538057,
                "sender_id": 2489518000 + n,
                # Fixed per n: a redelivery is the same push (Weibo's pushes carry no id).
                "created_at": f"Fri Dec 05 08:{n // 60 % 60:02d}:{n % 60:02d} +0800 2025",
                "text": text or f"message {n}",
                "data": {},
            }
        )

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        return self._post(self.delivery(n, text))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, "not-the-app-secret")

    def oversized(self) -> HttpDelivery:
        return self._post(self.delivery(1, text="x" * LIMIT))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON)


PROBES = {"weibo": WeiboProbe()}
