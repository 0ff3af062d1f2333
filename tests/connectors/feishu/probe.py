"""Feishu's contract probe (see ``tests/contract/kit.py``): encrypted events signed with
``X-Lark-Signature`` (SHA-256 of timestamp, nonce, encrypt key and body); anything else is 401."""

from __future__ import annotations

from typing import Any

from connectors.feishu.connector import PREFIX
from tests.connectors.feishu.kit import event, sealed, signed_headers
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

TOKEN, KEY = "contract-verification-token", "contract-encrypt-key"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed (or decrypted) before verifying would answer 400, not 401.
BROKEN_JSON = b'{"encrypt": "'


class FeishuProbe(HttpProbe):
    refusal_statuses = frozenset({401})
    answer_within = 2.5  # ingest_timeout 1 s + directory_timeout 0.5 s, under Feishu's 3 s

    def tables(self) -> dict[str, Any]:
        app = {
            "verification_token": TOKEN,
            "encrypt_key": KEY,
            "fetch_media": False,
            "directory_emails": False,
            "api_base": "http://127.0.0.1:9",
        }
        return {"feishu": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "inboxes": {INBOX: app}}}

    def _post(self, body: bytes, key: str = KEY) -> HttpDelivery:
        return HttpDelivery(path=f"{PREFIX}/{INBOX}", body=body, headers=signed_headers(key, body))

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        data = event(n, text or f"message {n}", token=TOKEN)
        data["header"]["event_id"] = f"ev-contract-{n}"
        return self._post(sealed(data, KEY))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, key="not-the-encrypt-key")

    def oversized(self) -> HttpDelivery:
        return self._post(sealed(event(1, "x" * LIMIT, token=TOKEN), KEY))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON)


PROBES = {"feishu": FeishuProbe()}
