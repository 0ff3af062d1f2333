"""The API normalizer from request bodies with golden outputs; it refuses what the connector refuses."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidInput
from core.model import RawEnvelope
from normalizers.api import normalize_api
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "api"
RECEIVED = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def envelope(body: bytes, *, headers: dict[str, str] | None = None, **meta: Any) -> RawEnvelope:
    return RawEnvelope(
        channel="api", tenant="acme", inbox="app", body=body, content_type="application/json",
        received_at=RECEIVED, headers=headers or {}, signature_verified=True, meta=meta,
    )


@pytest.mark.parametrize(("name", "headers", "meta"), [
    ("message", {"idempotency-key": "req-7f3a"}, {"trust_identities": False}),
    ("call_record", {}, {"trust_identities": True}),
])
def test_golden(name: str, headers: dict[str, str], meta: dict[str, Any]) -> None:
    body = (FIXTURES / f"{name}.json").read_bytes()
    messages = [as_golden(m) for m in normalize_api(envelope(body, headers=headers, **meta))]
    check_golden(messages, FIXTURES / f"{name}.expected.json")


def test_idempotency_key_overrides_external_id() -> None:
    body = (FIXTURES / "message.json").read_bytes()
    (keyed,) = normalize_api(envelope(body, headers={"idempotency-key": "k1"}))
    (plain,) = normalize_api(envelope(body))
    assert keyed.idempotency_key() == "acme/api/app/key:k1"
    assert plain.idempotency_key() == "acme/api/app/id:msg-9001"


def test_identities_are_claimed_unless_trusted() -> None:
    body = (FIXTURES / "message.json").read_bytes()
    (claimed,) = normalize_api(envelope(body))
    (trusted,) = normalize_api(envelope(body, trust_identities=True))
    assert {(i.kind, i.verified) for i in claimed.identities} == {
        ("external", True), ("email", False), ("phone", False)
    }
    assert all(i.verified for i in trusted.identities)


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b"{", 400, "not valid JSON"),
    (b"[]", 422, "body:"),
    (b'{"customer": {"email": "a@b.co"}}', 422, "needs text or html"),
    (b'{"customer": {"email": "a@b.co"}, "text": "x", "sent_at": "yesterday"}', 422, "sent_at:"),
])
def test_refuses_invalid_bodies(body: bytes, status: int, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as caught:
        normalize_api(envelope(body))
    assert caught.value.status == status
