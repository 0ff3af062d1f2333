"""Golden tests for the X normalizer: Account Activity deliveries -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.x import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "x"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)
ACCOUNT, CUSTOMER = "1432107654321098752", "1587654321098765432"


def envelope(body: bytes, *, verified: bool = True) -> RawEnvelope:
    return RawEnvelope(channel="x", tenant="acme", inbox="x-support", body=body, received_at=RECEIVED,
                       signature_verified=verified)


def golden(message: CanonicalMessage) -> dict[str, Any]:
    return {**as_golden(message), "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media]}


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


def load(name: str, *, verified: bool = True) -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / f"{name}.json").read_bytes(), verified=verified)))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 13
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_a_dm_is_keyed_by_its_event_id_with_the_sender_verified() -> None:
    [message] = load("dm_text")
    body = orjson.loads((FIXTURES / "dm_text.json").read_bytes())
    assert message.external_id == body["direct_message_events"][0]["id"]
    assert [(i.kind, i.value, i.verified) for i in message.identities] == [(IdentityKind.X, CUSTOMER, True)]
    assert message.display_name == "Mia Kowalski"
    assert message.extra["screen_name"] == "miakow"
    [unsigned] = load("dm_text", verified=False)
    assert not unsigned.identities[0].verified


def test_our_own_messages_are_echoes_and_every_other_dm_of_the_batch_counts() -> None:
    assert load("dm_outgoing_echo") == []
    batch = load("dm_batch_with_echo")
    assert [m.text for m in batch] == ["first question", "我的退款什么时候到账？"]


@pytest.mark.parametrize("name", ["mark_read", "typing", "tweet_mention", "follow"])
def test_activities_that_are_not_direct_messages_make_nothing(name: str) -> None:
    assert load(name) == []


def test_tco_links_are_expanded_and_the_media_link_removed() -> None:
    [linked] = load("dm_with_url")
    assert linked.text == ("The tracking page says lost: https://track.example.com/parcel/ZX991 and "
                           "https://acme.example/orders/A-10023")
    [photo] = load("dm_photo")
    assert photo.text == "The box arrived like this:"
    assert [(m.kind, m.ref[:24]) for m in photo.media] == [("image", "https://ton.twitter.com/")]
    [video] = load("dm_video")
    assert video.text is None
    assert video.media[0].ref.endswith("/1280x720/high.mp4")  # the best MP4 variant


@pytest.mark.parametrize("body", [b"not json", b"[1]"])
def test_what_is_not_a_json_object_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(body))


@pytest.mark.parametrize(
    "delivery",
    [
        {"direct_message_events": []},
        {"for_user_id": ACCOUNT, "direct_message_events": {}},
        {"for_user_id": ACCOUNT, "direct_message_events": ["x"]},
        {"for_user_id": ACCOUNT, "direct_message_events": [{"type": "message_create", "id": "1"}]},
        {"for_user_id": ACCOUNT, "direct_message_events": [
            {"type": "message_create", "id": "1", "message_create": {"message_data": {"text": "x"}}}]},
    ],
)
def test_a_verified_delivery_that_cannot_be_understood_is_quarantined(delivery: dict[str, Any]) -> None:
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps(delivery)))
