"""Contract probes of WhatsApp, Messenger and Instagram (see ``tests/contract/kit.py``): webhooks
to ``/meta/demo`` signed with the app secret in ``X-Hub-Signature-256``; anything else is a forgery."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson

from connectors.meta.hub import PREFIX, SIGNATURE_HEADER
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

APP, APP_SECRET, VERIFY_TOKEN = "demo", "contract-app-secret", "contract-verify"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed before checking the signature would answer 400, not 401.
BROKEN_JSON = b'{"object": "page", "entry": [{'
PHONE_NUMBER_ID, PAGE_ID = "106540352242922", "1122334455"


def sign(body: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def meta_table() -> dict[str, Any]:
    app = {"app_secret": APP_SECRET, "verify_token": VERIFY_TOKEN}
    return {"max_body_bytes": LIMIT, "ingest_timeout": 1.0, "apps": {APP: app}}


def whatsapp_body(n: int, text: str | None = None) -> dict[str, Any]:
    wa_id = f"4915112345{n:03d}"
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": PHONE_NUMBER_ID},
        "contacts": [{"profile": {"name": f"Customer {n}"}, "wa_id": wa_id}],
        "messages": [
            {
                "from": wa_id,
                "id": f"wamid.contract{n:06d}",
                "timestamp": "1764900000",
                "type": "text",
                "text": {"body": text or f"message {n}"},
            }
        ],
    }
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}],
    }


def page_body(kind: str, n: int, text: str | None = None) -> dict[str, Any]:
    item = {
        "sender": {"id": f"{7000 + n}"},
        "recipient": {"id": PAGE_ID},
        "timestamp": 1764900000000,
        "message": {"mid": f"m_contract{n:06d}", "text": text or f"message {n}"},
    }
    return {"object": kind, "entry": [{"id": PAGE_ID, "time": 1764900000000, "messaging": [item]}]}


class MetaProbe(HttpProbe):
    refusal_statuses = frozenset({401})

    def __init__(self, channel: str) -> None:
        self.channel = channel

    def tables(self) -> dict[str, Any]:
        inbox = {"app": APP, "access_token": "contract-token", "fetch_media": False}
        return {
            "meta": meta_table(),
            self.channel: {"api_base": "http://127.0.0.1:9", "inboxes": {INBOX: inbox}},
        }

    def body(self, n: int, text: str | None = None) -> bytes:
        if self.channel == "whatsapp":
            return orjson.dumps(whatsapp_body(n, text))
        return orjson.dumps(page_body("page" if self.channel == "messenger" else "instagram", n, text))

    def _post(self, body: bytes, signature: str | None) -> HttpDelivery:
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        return HttpDelivery(path=f"{PREFIX}/{APP}", body=body, headers=headers)

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        body = self.body(n, text)
        return self._post(body, sign(body))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, sign(BROKEN_JSON, "not-the-app-secret"))

    def oversized(self) -> HttpDelivery:
        body = self.body(1, "x" * LIMIT)
        return self._post(body, sign(body))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON, sign(BROKEN_JSON))


PROBES = {name: MetaProbe(name) for name in ("whatsapp", "messenger", "instagram")}
