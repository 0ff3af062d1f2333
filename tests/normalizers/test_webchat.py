"""Golden tests for the web-chat normalizer: widget frames and uploads -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput
from core.model import CanonicalMessage, RawEnvelope
from normalizers.webchat import normalize_webchat
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "webchat"
RECEIVED = datetime(2026, 12, 5, 8, 1, 3, tzinfo=UTC)


def envelope(name: str, **changes: Any) -> RawEnvelope:
    spec = orjson.loads((FIXTURES / f"{name}.json").read_bytes())
    body = orjson.dumps(spec["body"]) if "body" in spec else spec["body_text"].encode("latin-1")
    return RawEnvelope(
        channel="webchat", tenant="demo", inbox="demo", body=changes.pop("body", body), received_at=RECEIVED,
        content_type=spec["content_type"], signature_verified=True, meta={**spec["meta"], **changes},
    )


def golden(message: CanonicalMessage) -> dict[str, Any]:
    return {**as_golden(message), "thread_ref": message.thread_ref}


@pytest.mark.parametrize("name", ["anonymous_text", "signed_in", "upload"])
def test_golden(name: str) -> None:
    messages = [golden(m) for m in normalize_webchat(envelope(name))]
    check_golden(messages, FIXTURES / f"{name}.expected.json")


def test_a_resend_has_the_same_idempotency_key_and_fingerprint() -> None:
    [first] = normalize_webchat(envelope("anonymous_text"))
    [again] = normalize_webchat(envelope("anonymous_text", page="https://shop.example/other"))
    assert first.idempotency_key() == again.idempotency_key()
    assert first.fingerprint() == again.fingerprint()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b'{"type": "message", "client_id": "short", "text": "hi"}', 400),
        (b'{"type": "message", "client_id": "abcdefgh12", "text": ""}', 400),
        (b'{"type": "typing", "client_id": "abcdefgh12"}', 400),
        (orjson.dumps({"type": "message", "client_id": "abcdefgh12", "text": "x" * 5001}), 413),
    ],
)
def test_what_the_widget_must_not_send_is_refused(body: bytes, status: int) -> None:
    with pytest.raises(InvalidInput) as refused:
        normalize_webchat(envelope("anonymous_text", body=body))
    assert refused.value.status == status


def test_no_session_no_message() -> None:
    with pytest.raises(InvalidInput):
        normalize_webchat(envelope("anonymous_text", session=None))
