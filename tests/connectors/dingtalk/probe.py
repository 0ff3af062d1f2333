"""DingTalk's contract probe (see ``tests/contract/kit.py``): robot messages over the HTTP callback,
signed with ``timestamp`` and ``sign`` = base64(HMAC-SHA256(app secret, timestamp + "\\n" + secret));
anything else is 401."""

from __future__ import annotations

from typing import Any

import orjson

from connectors.dingtalk.connector import PREFIX
from tests.connectors.dingtalk.kit import robot, signed_headers
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

SECRET = "contract-dingtalk-app-secret"
LIMIT = 16 * 1024
BROKEN_JSON = b'{"msgId": "m", "text": {'


class DingTalkProbe(HttpProbe):
    refusal_statuses = frozenset({401})
    answer_within = 2.5

    def tables(self) -> dict[str, Any]:
        bot = {
            "mode": "http",
            "app_key": "dingcontractkey",
            "app_secret": SECRET,
            "fetch_media": False,
            "directory_emails": False,
        }
        return {
            "dingtalk": {
                "api_base": "http://127.0.0.1:9",
                "oapi_base": "http://127.0.0.1:9",
                "max_body_bytes": LIMIT,
                "ingest_timeout": 1.0,
                "inboxes": {INBOX: bot},
            }
        }

    def _post(self, body: bytes, secret: str = SECRET) -> HttpDelivery:
        return HttpDelivery(path=f"{PREFIX}/{INBOX}", body=body, headers=signed_headers(secret))

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        return self._post(orjson.dumps(robot(n, text or f"message {n}")))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, secret="not-the-app-secret")

    def oversized(self) -> HttpDelivery:
        return self._post(orjson.dumps(robot(1, "x" * LIMIT)))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON)


PROBES = {"dingtalk": DingTalkProbe()}
