"""Golden tests for the Messenger and Instagram normalizer: Meta messaging webhooks -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.messenger import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)


def envelope(channel: str, body: bytes) -> RawEnvelope:
    return RawEnvelope(
        channel=channel,
        tenant="acme",
        inbox="social",
        body=body,
        received_at=RECEIVED,
        signature_verified=True,
        meta={"app": "acme"},
    )


def golden(message: CanonicalMessage) -> dict[str, Any]:
    return {
        **as_golden(message),
        "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media],
        "in_reply_to": message.in_reply_to,
        "edit_of": message.edit_of,
        "delete_of": message.delete_of,
    }


def fixtures() -> list[Path]:
    return sorted(
        p
        for channel in ("messenger", "instagram")
        for p in (FIXTURES / channel).glob("*.json")
        if not p.name.endswith(".expected.json")
    )


def load(channel: str, name: str, **kwargs: Any) -> list[CanonicalMessage]:
    body = (FIXTURES / channel / f"{name}.json").read_bytes()
    return list(normalize(envelope(channel, body), channel=channel, **kwargs))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_golden(path: Path) -> None:
    channel = path.parent.name
    messages = normalize(envelope(channel, path.read_bytes()), channel=channel)
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 20
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_psid_and_igsid_are_verified_identities() -> None:
    [messenger] = load("messenger", "text")
    [instagram] = load("instagram", "text")
    assert [(i.kind, i.verified) for i in messenger.identities] == [(IdentityKind.MESSENGER_PSID, True)]
    assert [(i.kind, i.verified) for i in instagram.identities] == [(IdentityKind.INSTAGRAM_IGSID, True)]


def test_echoes_are_ignored_or_recorded_for_the_customer() -> None:
    assert load("messenger", "echo") == []
    [echo] = load("messenger", "echo", echoes="record")
    assert echo.kind == "agent_message"
    assert echo.identities[0].value == "6254147181305912"
    assert echo.extra["app_id"] == 263902037430900


def test_standby_items_are_messages_too() -> None:
    [message] = load("messenger", "standby")
    assert message.text == "Is anyone there?"
    assert message.extra["standby"] is True


def test_receipts_are_not_messages() -> None:
    assert load("messenger", "receipts") == []
    assert load("instagram", "read") == []


def test_an_edit_names_the_original() -> None:
    [original] = load("messenger", "text")
    [edit] = load("messenger", "message_edit")
    assert edit.edit_of == original.message_id()
    assert edit.idempotency_key() != original.idempotency_key()


def test_a_deleted_instagram_message_is_an_event_naming_it() -> None:
    [original] = load("instagram", "text")
    [deleted] = load("instagram", "deleted")
    assert deleted.kind == "event"
    assert deleted.extra["event"] == "message_deleted"
    assert deleted.extra["deletes"]["message_id"] == original.message_id()
    assert deleted.delete_of == original.message_id()
    assert deleted.idempotency_key() != original.idempotency_key()


def test_story_replies_and_mentions_are_kept() -> None:
    [reply] = load("instagram", "story_reply")
    assert reply.extra["story_reply"]["id"] == "17890455123456789"
    [mention] = load("instagram", "story_mention")
    assert mention.extra["story_mention"] is True
    assert mention.media[0].ref.startswith("https://")


def test_echoes_of_our_own_app_are_never_recorded() -> None:
    # The fixture's echo was sent by app 263902037430900: when that app is ours, it is our reply.
    assert load("messenger", "echo", echoes="record", own_apps=frozenset({"263902037430900"})) == []
    assert len(load("messenger", "echo", echoes="record", own_apps=frozenset({"1"}))) == 1

