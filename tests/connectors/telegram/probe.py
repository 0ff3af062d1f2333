"""Telegram's contract probe (see ``tests/contract/kit.py``): webhook updates carrying the
``X-Telegram-Bot-Api-Secret-Token`` that setWebhook was given; anything else is a forgery (401)."""

from __future__ import annotations

from typing import Any

import orjson

from connectors.telegram.connector import PREFIX, SECRET_HEADER
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

BOT_TOKEN, SECRET = "123456:contract-bot-token", "contract-secret_token"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed before checking the secret token would answer 400, not 401.
BROKEN_JSON = b'{"update_id": 1, "message": {'


class TelegramProbe(HttpProbe):
    refusal_statuses = frozenset({401})
    def tables(self) -> dict[str, Any]:
        bot = {"bot_token": BOT_TOKEN, "secret_token": SECRET, "fetch_media": False}
        return {"telegram": {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "inboxes": {INBOX: bot}}}

    def _post(self, body: bytes, secret: str | None = SECRET) -> HttpDelivery:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers[SECRET_HEADER] = secret
        return HttpDelivery(path=f"{PREFIX}/{INBOX}", body=body, headers=headers)

    def update(self, n: int, text: str | None = None) -> bytes:
        sender = {"id": 1000 + n, "is_bot": False, "first_name": f"Customer {n}"}
        message = {
            "message_id": n, "date": 1_764_900_000, "chat": {"id": 1000 + n, "type": "private"},
            "from": sender, "text": text or f"message {n}",
        }
        return orjson.dumps({"update_id": 500_000 + n, "message": message})

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        return self._post(self.update(n, text))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, secret="not-the-secret")

    def oversized(self) -> HttpDelivery:
        return self._post(self.update(1, text="x" * LIMIT))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON)


PROBES = {"telegram": TelegramProbe()}
