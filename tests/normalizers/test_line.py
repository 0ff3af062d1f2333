"""Golden tests for the LINE normalizer: webhook deliveries -> canonical messages, every event."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.line import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "line"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)
CUSTOMER = "U4af4980629a5b6c7d8e9f0a1b2c3d4e5"


def envelope(body: bytes, *, verified: bool = True) -> RawEnvelope:
    return RawEnvelope(channel="line", tenant="acme", inbox="line-support", body=body, received_at=RECEIVED,
                       signature_verified=verified)


def golden(message: CanonicalMessage) -> dict[str, Any]:
    """``as_golden`` plus what LINE adds: media, threading and the edit's original."""
    return {
        **as_golden(message),
        "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media],
        "in_reply_to": message.in_reply_to,
        "thread_ref": message.thread_ref,
        "edit_of": message.edit_of,
        "delete_of": message.delete_of,
    }


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


def load(name: str, *, verified: bool = True) -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / f"{name}.json").read_bytes(), verified=verified)))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 25
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_every_customer_event_of_a_batch_is_a_message_and_the_rest_are_not_tickets() -> None:
    messages = load("batch_mixed")
    assert [m.text for m in messages] == ["first", "second, another customer"]
    assert len({m.identities[0].value for m in messages}) == 2


def test_the_consoles_verify_requests_make_nothing() -> None:
    assert load("verify_empty") == []
    assert load("verify_dummy_tokens") == []


def test_a_message_is_keyed_by_its_id_so_a_redelivery_claims_the_same_key() -> None:
    [first] = load("text")
    body: dict[str, Any] = orjson.loads((FIXTURES / "text.json").read_bytes())
    body["events"][0]["deliveryContext"]["isRedelivery"] = True
    [again] = normalize(envelope(orjson.dumps(body)))
    assert again.idempotency_key() == first.idempotency_key()
    assert again.extra["redelivery"] is True
    assert first.extra["redelivery"] is False


def test_an_edit_and_an_unsend_name_the_original_by_its_deterministic_id() -> None:
    [original], [edit], [unsend] = load("text"), load("edited"), load("unsend")
    assert edit.edit_of == original.message_id()
    assert edit.idempotency_key() != original.idempotency_key()
    assert unsend.delete_of == original.message_id()
    assert unsend.text is None
    assert unsend.extra["unsend"] == {"message_id": original.external_id, "message": original.message_id()}


def test_events_without_a_message_are_keyed_by_webhook_event_id() -> None:
    [follow] = load("follow")
    assert follow.kind == "event"
    assert follow.extra["event"] == "follow"
    assert follow.dedupe_key == f"event:{follow.extra['webhook_event_id']}"


def test_the_sender_is_verified_only_when_the_signature_was() -> None:
    [signed], [unsigned] = load("text"), load("text", verified=False)
    assert signed.identities[0].kind == IdentityKind.LINE
    assert signed.identities[0].value == CUSTOMER
    assert signed.identities[0].verified
    assert not unsigned.identities[0].verified


def test_groups_and_rooms_are_thread_references_and_answerable() -> None:
    [group] = load("text_emoji_mention_group")
    assert group.thread_ref.startswith("group:C")
    assert group.extra["to"] == group.thread_ref[6:]
    assert group.identities[0].value == CUSTOMER  # the person, not the group
    [room] = load("room_without_user")
    assert room.identities[0].value.startswith("R")  # nobody named: the room is who can be answered


def test_line_held_media_is_fetched_by_message_id_and_external_media_is_not() -> None:
    [image] = load("image")
    assert [(m.kind, m.ref) for m in image.media] == [("image", image.external_id)]
    [external] = load("image_external")
    assert external.media == ()
    assert external.extra["external_content"]["originalContentUrl"]


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"destination": "U1"}', b'{"events": {}}'])
def test_what_is_not_a_webhook_object_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(body))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "message", "timestamp": 1, "source": {"type": "user", "userId": CUSTOMER}},
        {"type": "message", "webhookEventId": "01X", "source": {"type": "user", "userId": CUSTOMER}},
        {"type": "follow", "webhookEventId": "01X", "timestamp": 1, "source": {"type": "user"}},
        {"type": "message", "webhookEventId": "01X", "timestamp": 1,
         "source": {"type": "user", "userId": CUSTOMER}, "message": {"type": "text"}},
        "not an object",
    ],
)
def test_a_verified_event_that_cannot_be_understood_is_quarantined(event: Any) -> None:
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps({"destination": "U1", "events": [event]})))
