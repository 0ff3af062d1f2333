"""Douyin's contract probe (see ``tests/contract/kit.py``): pushes signed with ``X-Douyin-Signature``
= hex SHA-1 of the client secret and the body; anything else is a forgery (401)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from connectors.douyin.account import signature
from connectors.douyin.connector import MSG_ID_HEADER, PREFIX, SIGNATURE_HEADER
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

SECRET, CLIENT_KEY = "contract-douyin-secret", "awcontract0001"
LIMIT = 16 * 1024
BROKEN_JSON = b'{"event": "im_receive_msg", "content": {'


class DouyinProbe(HttpProbe):
    refusal_statuses = frozenset({401})

    def tables(self) -> dict[str, Any]:
        app = {"inbox": INBOX, "client_key": CLIENT_KEY, "client_secret": SECRET}
        return {"douyin": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "apps": {"demo": app}}}

    def _post(self, body: bytes, signed: str | None, n: int = 0) -> HttpDelivery:
        headers = {"Content-Type": "application/json", MSG_ID_HEADER: f"contract-msg-{n}"}
        if signed is not None:
            headers[SIGNATURE_HEADER] = signed
        return HttpDelivery(path=f"{PREFIX}/demo", body=body, headers=headers)

    def delivery(self, n: int, text: str | None = None) -> bytes:
        return orjson.dumps(
            {
                "event": "im_receive_msg",
                "client_key": CLIENT_KEY,
                "from_user_id": f"customer-{n}",
                "to_user_id": "brand-open-id",
                "log_id": f"log{n}",
                "content": {
                    "conversation_short_id": f"conv-{n}",
                    "server_message_id": f"@srv{n}",
                    "conversation_type": 1,
                    "message_type": "text",
                    "text": text or f"message {n}",
                    "create_time": int(time.time() * 1000),
                },
            }
        )

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        body = self.delivery(n, text)
        return self._post(body, signature(SECRET, body), n)

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, signature("not-the-secret", BROKEN_JSON), n)

    def oversized(self) -> HttpDelivery:
        body = self.delivery(1, text="x" * LIMIT)
        return self._post(body, signature(SECRET, body))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON, signature(SECRET, BROKEN_JSON))


PROBES = {"douyin": DouyinProbe()}
