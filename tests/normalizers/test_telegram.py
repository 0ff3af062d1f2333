"""Golden tests for the Telegram normalizer: realistic Bot API updates -> canonical messages."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.telegram import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "telegram"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)
SENDER = "5123456789"


def envelope(body: bytes, *, verified: bool = True) -> RawEnvelope:
    return RawEnvelope(
        channel="telegram", tenant="acme", inbox="support-bot", body=body, received_at=RECEIVED,
        signature_verified=verified, meta={"bot_id": "7000000001", "mode": "webhook"},
    )


def golden(message: CanonicalMessage) -> dict[str, Any]:
    """``as_golden`` plus what Telegram adds: media, threading and the edit's original."""
    return {
        **as_golden(message),
        "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media],
        "in_reply_to": message.in_reply_to,
        "thread_ref": message.thread_ref,
        "auto_generated": message.auto_generated,
        "edit_of": message.edit_of,
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
    assert len(fixtures()) >= 20
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_the_sender_is_a_verified_telegram_identity_only_when_the_update_was_verified() -> None:
    [signed] = load("private_text")
    assert [(i.kind, i.value, i.verified) for i in signed.identities] == [
        (IdentityKind.TELEGRAM, SENDER, True)
    ]
    [unsigned] = load("private_text", verified=False)
    assert not any(i.verified for i in unsigned.identities)


def test_redelivery_and_another_update_with_the_same_message_share_one_key() -> None:
    body = orjson.loads((FIXTURES / "private_text.json").read_bytes())
    [first] = normalize(envelope(orjson.dumps(body)))
    [again] = normalize(envelope(orjson.dumps(body)))
    [other_update] = normalize(envelope(orjson.dumps({**body, "update_id": body["update_id"] + 9})))
    assert first.idempotency_key() == again.idempotency_key() == other_update.idempotency_key()
    # The same message id in another chat is another message.
    moved = {**body, "message": {**body["message"], "chat": {"id": 1, "type": "private"}}}
    assert normalize(envelope(orjson.dumps(moved)))[0].idempotency_key() != first.idempotency_key()


def test_an_edit_names_the_original_and_each_edit_is_its_own_event() -> None:
    [original] = load("private_text")
    [edit] = load("edited_message")
    assert edit.edit_of == original.message_id()
    assert edit.external_id == original.external_id
    assert edit.idempotency_key() != original.idempotency_key()
    later = replace(edit, dedupe_key=f"edit:{edit.extra['chat']['id']}:42:{edit.extra['edit_date'] + 1}")
    assert later.idempotency_key() != edit.idempotency_key()


def test_a_group_is_the_thread_and_a_reply_names_the_message_it_answers() -> None:
    [message] = load("group_reply")
    assert message.thread_ref == "chat:-1001987654321"
    assert message.in_reply_to == "-1001987654321:1050"
    [topic] = load("forum_topic")
    assert topic.thread_ref == "chat:-1001555000111:topic:77"
    assert topic.in_reply_to is None  # the topic's first message, not a reply


def test_a_phone_is_identity_only_when_the_contact_is_the_sender() -> None:
    [own] = load("contact_own")
    identities = [(i.kind, i.value, i.verified) for i in own.identities]
    assert (IdentityKind.PHONE, "+8613800138000", True) in identities
    [other] = load("contact_other")
    assert [i.kind for i in other.identities] == [IdentityKind.TELEGRAM]
    assert other.extra["contact"]["phone_number"] == "+44 7700 900123"


def test_files_over_the_download_limit_are_a_marker_not_a_fetch() -> None:
    [message] = load("document_too_big")
    assert message.media == ()
    assert message.extra["media_skipped"][0]["reason"] == "too_big"


@pytest.mark.parametrize("name", ["callback_query", "my_chat_member"])
def test_updates_that_are_not_messages_yield_nothing(name: str) -> None:
    assert load(name) == []


@pytest.mark.parametrize("body", [b"", b"{not json", b"\xff\xfe", b"[1, 2]", b'"update"'])
def test_a_body_that_is_not_a_json_object_is_invalid_input(body: bytes) -> None:
    with pytest.raises(InvalidInput) as caught:
        normalize(envelope(body))
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "update",
    [
        {"message": {"message_id": 1, "chat": {"id": 1}, "date": 1}},
        {"update_id": "1", "message": {"message_id": 1, "chat": {"id": 1}, "date": 1}},
        {"update_id": 1, "message": "hello"},
        {"update_id": 1, "message": {"message_id": 1, "date": 1}},
        {"update_id": 1, "message": {"message_id": True, "chat": {"id": 1}, "date": 1}},
        {"update_id": 1, "edited_message": {"message_id": 1, "chat": {"id": 1}, "date": 1}},
    ],
)
def test_a_verified_update_we_cannot_understand_is_a_normalization_error(update: dict[str, Any]) -> None:
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps(update)))
