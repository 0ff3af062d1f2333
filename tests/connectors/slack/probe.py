"""Slack's contract probe (see ``tests/contract/kit.py``): Events API callbacks signed with the
signing secret (``X-Slack-Signature`` over the timestamp and the raw body); anything else is 401."""

from __future__ import annotations

from typing import Any

from connectors.slack.connector import PREFIX
from tests.connectors.slack.kit import body, dm, signed_headers
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

SIGNING_SECRET = "contract-signing-secret"
LIMIT = 16 * 1024
# Unparseable JSON: a handler that parsed before verifying would answer 400, not 401.
BROKEN_JSON = b'{"type": "event_callback", "event": {'


class SlackProbe(HttpProbe):
    refusal_statuses = frozenset({401})
    answer_within = 2.5  # ingest_timeout 1 s + profile_timeout 0.5 s, under Slack's 3 s

    def tables(self) -> dict[str, Any]:
        inbox = {
            "signing_secret": SIGNING_SECRET, "bot_token": "xoxb-contract-bot-token",
            "fetch_files": False, "profile_emails": False,
        }
        return {"slack": {
            # Nothing answers here: no Web API call may be needed to answer a callback.
            "api_base": "http://127.0.0.1:9", "max_body_bytes": LIMIT, "ingest_timeout": 1.0,
            "inboxes": {INBOX: inbox},
        }}

    def _post(self, payload: bytes, secret: str = SIGNING_SECRET) -> HttpDelivery:
        headers = signed_headers(secret, payload)
        return HttpDelivery(path=f"{PREFIX}/{INBOX}/events", body=payload, headers=headers)

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        return self._post(body(dm(n, text)))

    def forged(self, n: int) -> HttpDelivery:
        return self._post(BROKEN_JSON, secret="not-the-signing-secret")

    def oversized(self) -> HttpDelivery:
        return self._post(body(dm(1, "x" * LIMIT)))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN_JSON)


PROBES = {"slack": SlackProbe()}
