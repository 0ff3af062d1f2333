"""The web form's contract probe (see ``tests/contract/kit.py``): "forged" is a post from an origin
the form does not allow."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_plus

from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

ORIGIN = "https://shop.example"
LIMIT = 16 * 1024
# Not UTF-8: a handler that parsed before checking the origin would answer 400, not 403.
BROKEN = b"message=\xff\xfe&email=x"


class FormProbe(HttpProbe):
    refusal_statuses = frozenset({403})
    def tables(self) -> dict[str, Any]:
        return {
            "form": {
                "max_body_bytes": LIMIT, "ingest_timeout": 1.0, "rate_limit_burst": 1000,
                "inboxes": {INBOX: {"allowed_origins": [ORIGIN]}},
            }
        }

    def _post(self, body: bytes, origin: str = ORIGIN) -> HttpDelivery:
        headers = {
            "Origin": origin, "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        return HttpDelivery(path=f"/forms/{INBOX}", body=body, headers=headers)

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        message = quote_plus(text or f"message {n}")
        return self._post(f"message={message}&email=customer{n}%40example.com".encode())

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN, origin="https://evil.example")

    def oversized(self) -> HttpDelivery:
        return self._post(b"message=" + b"x" * LIMIT + b"&email=c%40example.com")

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN)


PROBES = {"form": FormProbe()}
