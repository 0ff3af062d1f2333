"""Golden fixtures: handcrafted mails in tests/fixtures/email/ with the expected result beside each.

To rewrite the goldens after a deliberate change: ``TICKETGATE_REGEN_GOLDEN=1 .venv/bin/pytest <this file>``,
then review the diff of the .json files like any other code change.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.model import CanonicalMessage, RawEnvelope
from normalizers.content import normalized
from normalizers.email import normalize_email

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "email"
MAILS = sorted(FIXTURES.glob("*.eml"))
RECEIVED = datetime(2024, 2, 1, 12, 0, tzinfo=UTC)
# The upstream verdict each fixture is delivered with (what the SMTP connector would pass in meta).
META: dict[str, dict[str, Any]] = {
    "gmail_reply.eml": {"authentication": {"dmarc": "pass", "header_from": "gmail.com"}},
    "spoofed_from.eml": {"authentication": {"dmarc": "pass", "header_from": "evil.example"}},
    "outlook_reply.eml": {"authentication": {"dkim": [{"result": "pass", "domain": "example.com"}]}},
    "dsn_bounce.eml": {"mail_from": "", "rcpt_to": ["support@demo.localhost"]},
}


def summarize(message: CanonicalMessage) -> dict[str, Any]:
    """The fields a golden file pins (everything but received_at, which the envelope sets)."""
    return {
        "external_id": message.external_id,
        "sent_at": message.sent_at.isoformat() if message.sent_at else None,
        "identities": [[i.kind, i.value, i.verified] for i in message.identities],
        "display_name": message.display_name,
        "subject": message.subject,
        "text": message.text,
        "html": message.html,
        "reply_text": message.reply_text,
        "language": message.language,
        "attachments": [
            {
                "name": a.name,
                "content_type": a.content_type,
                "size": a.size,
                "sha256": a.sha256,
                "inline": a.inline,
                "content_id": a.content_id,
            }
            for a in message.attachments
        ],
        "in_reply_to": message.in_reply_to,
        "references": list(message.references),
        "thread_ref": message.thread_ref,
        "auto_generated": message.auto_generated,
        "extra": dict(message.extra),
    }


def test_fixtures_exist() -> None:
    assert len(MAILS) >= 15
    assert all(mail.with_suffix(".json").exists() for mail in MAILS)


@pytest.mark.parametrize("mail", MAILS, ids=lambda p: p.stem)
def test_golden(mail: Path) -> None:
    envelope = RawEnvelope(
        channel="email",
        tenant="acme",
        inbox="support@demo.localhost",
        body=mail.read_bytes(),
        received_at=RECEIVED,
        meta=META.get(mail.name, {}),
    )
    messages = normalized(normalize_email, envelope)  # as the pipeline calls it
    assert len(messages) == 1
    got = json.loads(json.dumps(summarize(messages[0]), ensure_ascii=False))
    golden = mail.with_suffix(".json")
    if os.environ.get("TICKETGATE_REGEN_GOLDEN"):
        golden.write_text(json.dumps(got, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    assert got == json.loads(golden.read_text(encoding="utf-8"))
