"""The API channel's contract probe (see ``tests/contract/kit.py``)."""

from __future__ import annotations

from typing import Any

import orjson

from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

KEY = "contract-api-key-0123456789"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed before checking the key would answer 400, not 401.
BROKEN_JSON = b'{"customer": {"email": '


class ApiProbe(HttpProbe):
    def tables(self) -> dict[str, Any]:
        return {"api": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "inboxes": {INBOX: {"keys": [KEY]}}}}

    def _post(self, body: bytes, key: str | None = KEY) -> HttpDelivery:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return HttpDelivery(path="/api/v1/messages", body=body, headers=headers)

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        text = text or f"message {n}"
        payload = {"customer": {"external_id": f"u-{n}"}, "external_id": f"m-{n}", "text": text}
        return self._post(orjson.dumps(payload))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, key="not-the-key-0123456789")

    def oversized(self) -> HttpDelivery:
        return self._post(orjson.dumps({"customer": {"external_id": "u"}, "text": "x" * (LIMIT + 1)}))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON)


PROBES = {"api": ApiProbe()}
