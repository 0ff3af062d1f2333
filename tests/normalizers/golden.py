"""Golden files for normalizer tests: a canonical message as plain JSON, compared whole.

Set ``TICKETGATE_UPDATE_GOLDEN=1`` to rewrite the expected files after a deliberate change, then
review the diff like code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.events import isoformat
from core.model import CanonicalMessage


def as_golden(message: CanonicalMessage) -> dict[str, Any]:
    return {
        "channel": message.channel,
        "tenant": message.tenant,
        "inbox": message.inbox,
        "kind": message.kind,
        "external_id": message.external_id,
        "dedupe_key": message.dedupe_key,
        "idempotency_key": message.idempotency_key(),
        "message_id": message.message_id(),
        "received_at": isoformat(message.received_at),
        "sent_at": isoformat(message.sent_at),
        "identities": [
            {"kind": i.kind, "value": i.value, "verified": i.verified} for i in message.identities
        ],
        "display_name": message.display_name,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "language": message.language,
        "attachments": [
            {"name": a.name, "content_type": a.content_type, "size": a.size, "sha256": a.sha256}
            for a in message.attachments
        ],
        "extra": dict(message.extra),
    }


def check_golden(messages: list[dict[str, Any]], expected: Path) -> None:
    if os.environ.get("TICKETGATE_UPDATE_GOLDEN") == "1":
        expected.write_text(json.dumps(messages, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    assert messages == json.loads(expected.read_text(encoding="utf-8"))
