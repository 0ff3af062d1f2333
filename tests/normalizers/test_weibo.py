"""Golden tests for the Weibo fan-service normalizer: push bodies -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.weibo import normalize, reply_quota_key
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "weibo"
RECEIVED = datetime(2025, 12, 5, 8, 0, 10, tzinfo=UTC)


def envelope(body: bytes) -> RawEnvelope:
    return RawEnvelope(
        channel="weibo",
        tenant="acme",
        inbox="weibo-fans",
        body=body,
        received_at=RECEIVED,
        signature_verified=True,
        meta={"account": "brand"},
    )


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


def load(name: str) -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / f"{name}.json").read_bytes())))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([as_golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 8
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_a_text_is_the_fans_message_keyed_by_what_identifies_it() -> None:
    [message] = load("text")
    assert message.text == "你好，我的快递三天没动了"
    assert [(i.kind, i.value) for i in message.identities] == [(IdentityKind.WEIBO, "2489518277")]
    assert message.sent_at == datetime(2025, 12, 5, 8, 0, 5, tzinfo=UTC)
    # The same push again (Weibo's retry, whitespace aside) is the same message.
    again = normalize(envelope(orjson.dumps(orjson.loads((FIXTURES / "text.json").read_bytes()))))
    assert again[0].idempotency_key() == message.idempotency_key()


def test_the_same_text_at_another_second_is_another_message() -> None:
    body: dict[str, Any] = orjson.loads((FIXTURES / "text.json").read_bytes())
    body["created_at"] = "Fri Dec 05 16:00:06 +0800 2025"
    assert normalize(envelope(orjson.dumps(body)))[0].idempotency_key() != load("text")[0].idempotency_key()


def test_events_and_mentions() -> None:
    [follow] = load("event_follow")
    assert (follow.kind, follow.extra["event"], follow.text) == ("event", "follow", None)
    [mention] = load("mention")
    assert mention.kind == "message"
    assert reply_quota_key(mention.extra) is not None
    assert reply_quota_key(load("text")[0].extra) is None


def test_unknown_types_are_ignored_as_weibo_asks() -> None:
    assert load("unknown_type") == []


@pytest.mark.parametrize(
    "body",
    [b"[]", b'{"type": "text"', b'{"type": "text", "sender_id": "abc"}'],
    ids=["array", "broken", "no-uid"],
)
def test_bodies_that_are_not_pushes_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(body))
