"""Golden tests for the WhatsApp normalizer: Cloud API webhook bodies -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import InvalidInput, NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.whatsapp import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "whatsapp"
RECEIVED = datetime(2025, 12, 5, 8, 0, tzinfo=UTC)


def envelope(body: bytes, *, verified: bool = True) -> RawEnvelope:
    return RawEnvelope(
        channel="whatsapp",
        tenant="acme",
        inbox="wa-support",
        body=body,
        received_at=RECEIVED,
        signature_verified=verified,
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
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


def load(name: str, **kwargs: Any) -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / f"{name}.json").read_bytes()), **kwargs))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 20
    assert all(p.with_name(f"{p.stem}.expected.json").exists() for p in fixtures())


def test_the_wa_id_is_the_verified_e164_phone() -> None:
    [message] = load("text")
    identities = {(i.kind, i.value, i.verified) for i in message.identities}
    assert identities == {
        (IdentityKind.WHATSAPP, "4915112345678", True),
        (IdentityKind.PHONE, "+4915112345678", True),
    }
    unsigned = normalize(envelope((FIXTURES / "text.json").read_bytes(), verified=False))
    assert not any(i.verified for i in unsigned[0].identities)


def test_the_wamid_is_the_idempotency_key() -> None:
    [message] = load("text")
    again = normalize(envelope((FIXTURES / "text.json").read_bytes()))[0]
    assert message.external_id.startswith("wamid.")
    assert message.idempotency_key() == again.idempotency_key()


def test_every_entry_and_every_message_of_a_batch() -> None:
    messages = load("batch_two_entries")
    assert [m.text for m in messages] == ["Erste Nachricht", "Zweite Nachricht", None]
    assert len({m.idempotency_key() for m in messages}) == 3
    assert messages[2].media[0].ref == "99001122334455"


def test_an_edit_names_the_original_and_is_its_own_event() -> None:
    [original] = load("text")
    [edit] = load("edit")
    assert edit.edit_of == original.message_id()
    assert edit.idempotency_key() != original.idempotency_key()
    assert edit.text is not None
    assert "4712" in edit.text


def test_a_revoke_is_an_event_naming_the_deleted_message() -> None:
    [original] = load("text")
    [revoke] = load("revoke")
    assert revoke.kind == "event"
    assert revoke.extra["event"] == "message_deleted"
    assert revoke.extra["deletes"]["message_id"] == original.message_id()
    assert revoke.delete_of == original.message_id()  # a message.deleted event


def test_unsupported_is_an_explicit_marker() -> None:
    [message] = load("unsupported")
    assert message.kind == "event"
    assert message.extra["event"] == "unsupported"
    assert message.extra["unsupported"] == {"type": "poll"}


def test_statuses_are_not_messages() -> None:
    assert load("statuses") == []


def test_echoes_are_ignored_or_recorded_as_agent_messages() -> None:
    assert load("echo_text") == []
    [echo] = load("echo_text", echoes="record")
    assert echo.kind == "agent_message"
    assert echo.identities[0].value == "4915112345678"  # the customer written to


def test_a_changed_number_links_both_numbers() -> None:
    [message] = load("system_number_change")
    phones = {i.value for i in message.identities if i.kind == IdentityKind.PHONE}
    assert phones == {"+4915112345678", "+4917612345678"}


def test_not_json_is_invalid_input_and_a_broken_shape_is_quarantined() -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(b"{not json"))
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps({"object": "whatsapp_business_account", "entry": {}})))
    body = orjson.loads((FIXTURES / "text.json").read_bytes())
    del body["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps(body)))
