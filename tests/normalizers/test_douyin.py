"""Golden tests for the Douyin normalizer: webhook bodies -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.douyin import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "douyin"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)
CLIENT_KEY = "awdemo0123456789"


def envelope(body: bytes, msg_id: str | None = "dy-msg-1") -> RawEnvelope:
    return RawEnvelope(
        channel="douyin",
        tenant="acme",
        inbox="douyin-support",
        body=body,
        received_at=RECEIVED,
        signature_verified=True,
        meta={"account": "brand", "client_key": CLIENT_KEY, "msg_id": msg_id},
    )


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


def load(name: str, msg_id: str | None = "dy-msg-1") -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / f"{name}.json").read_bytes(), msg_id)))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([as_golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 7
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_a_private_message_is_keyed_by_its_server_message_id_whatever_the_msg_id() -> None:
    [first], [again] = load("im_text", "a"), load("im_text", "b")
    assert first.external_id == "@9VwKzcyVS8s8bzXa0001=="
    assert first.idempotency_key() == again.idempotency_key()
    assert first.identities[0].kind == IdentityKind.DOUYIN_OPEN_ID
    assert first.identities[0].value == f"{CLIENT_KEY}:_000customerOpenId0001"
    assert first.display_name == "小王"


def test_the_enter_event_is_keyed_by_douyins_msg_id() -> None:
    [one], [same], [other] = (
        load("enter_direct_msg", "m1"),
        load("enter_direct_msg", "m1"),
        load("enter_direct_msg", "m2"),
    )
    assert one.kind == "event"
    assert one.idempotency_key() == same.idempotency_key() != other.idempotency_key()


def test_a_comment_carries_its_video_and_comment_for_the_way_back() -> None:
    [comment] = load("comment")
    assert comment.external_id == "comment:@9VwKzcyVS8s8bzComment01=="
    assert comment.text == "这个颜色还有货吗？"
    assert (comment.extra["source"], comment.extra["item_id"]) == ("comment", "@9VwKzcyVS8s8bzItem0001==")


def test_the_accounts_own_messages_and_unknown_events_are_not_tickets() -> None:
    assert load("im_send_msg") == []
    assert normalize(envelope(orjson.dumps({"event": "authorize", "content": {}}))) == []


@pytest.mark.parametrize(
    "body",
    [
        b"[1, 2]",
        b'{"event": "im_receive_msg", "content": {',
        b'{"event": "im_receive_msg", "content": "{no"}',
        orjson.dumps({"event": "im_receive_msg", "content": {}}),
    ],
    ids=["array", "broken", "broken-content-string", "no-sender"],
)
def test_bodies_that_are_not_events_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(body))


def test_deep_nesting_is_invalid() -> None:
    deep: Any = "x"
    for _ in range(40):
        deep = {"k": deep}
    with pytest.raises(InvalidInput):
        normalize(envelope(orjson.dumps({"event": "im_receive_msg", "from_user_id": "u", "content": deep})))
