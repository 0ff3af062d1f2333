"""X's contract probe (see ``tests/contract/kit.py``): Account Activity deliveries signed with
``x-twitter-webhooks-signature`` = ``sha256=`` base64(HMAC-SHA256(consumer secret, body));
anything else is a forgery (401)."""

from __future__ import annotations

from typing import Any

import orjson

from connectors.x.connector import PREFIX, SIGNATURE_HEADER, signature
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

SECRET = "contract-x-consumer-secret"
ACCOUNT = "1100000000000000001"
APP = "contract-app"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed before checking the signature would answer 400, not 401.
BROKEN_JSON = b'{"for_user_id": "1", "direct_message_events": [{'


def sign(body: bytes, secret: str = SECRET) -> str:
    return signature(secret.encode(), body).decode()


class XProbe(HttpProbe):
    refusal_statuses = frozenset({401})

    def tables(self) -> dict[str, Any]:
        app = {"consumer_secret": SECRET, "accounts": {ACCOUNT: {"inbox": INBOX, "fetch_media": False}}}
        return {"x": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "apps": {APP: app}}}

    def _post(self, body: bytes, signed: str | None) -> HttpDelivery:
        headers = {"Content-Type": "application/json"}
        if signed is not None:
            headers[SIGNATURE_HEADER] = signed
        return HttpDelivery(path=f"{PREFIX}/{APP}", body=body, headers=headers)

    def delivery(self, n: int, text: str | None = None) -> bytes:
        sender = str(1_500_000_000_000_000_000 + n)
        event = {
            "type": "message_create", "id": str(1_800_000_000_000_000_000 + n),
            "created_timestamp": str(1_764_900_000_000 + n),
            "message_create": {
                "target": {"recipient_id": ACCOUNT}, "sender_id": sender,
                "message_data": {"text": text or f"message {n}", "entities": {"urls": []}},
            },
        }
        users = {sender: {"id": sender, "name": f"Customer {n}", "screen_name": f"customer{n}"}}
        return orjson.dumps({"for_user_id": ACCOUNT, "direct_message_events": [event], "users": users})

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        body = self.delivery(n, text)
        return self._post(body, sign(body))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, sign(BROKEN_JSON, "not-the-consumer-secret"))

    def oversized(self) -> HttpDelivery:
        body = self.delivery(1, text="x" * LIMIT)
        return self._post(body, sign(body))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON, sign(BROKEN_JSON))


PROBES = {"x": XProbe()}
