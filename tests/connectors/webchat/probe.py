"""The web chat's contract probe (see ``tests/contract/kit.py``): deliveries are ``POST
/chat/demo/messages`` with a session token, the same path the widget's uploads take and answered as
its socket answers; "forged" is a token the gateway did not mint."""

from __future__ import annotations

from typing import Any

import orjson

from tests.connectors.webchat.kit import ORIGIN, chat_table, token_for
from tests.contract.kit import INBOX, HttpDelivery, HttpProbe

LIMIT = 4096
# Not JSON: a handler that parsed before checking the token would answer 400, not 401.
BROKEN = b'{"type": "message", "client_id": \xff'


class WebchatProbe(HttpProbe):
    refusal_statuses = frozenset({401})

    def tables(self) -> dict[str, Any]:
        table = chat_table(max_frame_bytes=LIMIT, message_burst=1000, ip_message_burst=1000)
        table["inboxes"] = {INBOX: table["inboxes"]["demo"]}
        return {"webchat": table}

    def _post(self, body: bytes, token: str | None = None) -> HttpDelivery:
        headers = {
            "Origin": ORIGIN,
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token or token_for('contract-session')}",
        }
        return HttpDelivery(path=f"/chat/{INBOX}/messages", body=body, headers=headers)

    def valid(self, n: int, text: str | None = None) -> HttpDelivery:
        frame = {"type": "message", "client_id": f"contract-{n:04d}", "text": text or f"message {n}"}
        return self._post(orjson.dumps(frame))

    def forged(self, n: int) -> HttpDelivery:
        real = token_for("contract-session")
        return self._post(BROKEN, token=real[:-4] + ("AAAA" if not real.endswith("AAAA") else "BBBB"))

    def oversized(self) -> HttpDelivery:
        return self._post(orjson.dumps({"type": "message", "client_id": "contract-big", "text": "x" * LIMIT}))

    def malformed(self) -> HttpDelivery:
        return self._post(BROKEN)


PROBES = {"webchat": WebchatProbe()}
