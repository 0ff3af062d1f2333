"""Golden tests for the Feishu normalizer: event callbacks (plaintext) -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.feishu import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "feishu"
RECEIVED = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
BOT = "ou_bot0000000000000000000000000001"


def envelope(body: bytes, **meta: Any) -> RawEnvelope:
    return RawEnvelope(channel="feishu", tenant="acme", inbox="it-desk", body=body, received_at=RECEIVED,
                       signature_verified=True, meta={"bot_open_id": BOT, "host": "feishu", **meta})


def golden(message: CanonicalMessage) -> dict[str, Any]:
    return {**as_golden(message), "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media],
            "thread_ref": message.thread_ref}


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((FIXTURES / f"{name}.json").read_bytes())
    return data


def test_a_private_message_has_the_three_ids_and_joins_the_open_thread() -> None:
    [message] = normalize(envelope((FIXTURES / "text_p2p.json").read_bytes()))
    kinds = {i.kind: i.value for i in message.identities}
    assert kinds == {
        IdentityKind.FEISHU_OPEN_ID: "cli_a1b2c3d4e5f60001:ou_84aad35d084aa403a838cf73ee18467",
        IdentityKind.FEISHU_UNION_ID: "on_8ed6aa67826108097d9ee143816345",
        IdentityKind.FEISHU_USER_ID: "2ca1d211f64f6438:e33ggbyz",
    }
    assert all(i.verified for i in message.identities)
    assert message.thread_ref is None
    assert message.external_id == "om_dc13264520392913993dd051dba20001"


def test_group_messages_need_the_bot_mentioned_only_when_the_bot_is_known() -> None:
    body = (FIXTURES / "group_without_mention.json").read_bytes()
    assert normalize(envelope(body)) == ()
    assert len(normalize(envelope(body, bot_open_id=""))) == 1


def test_mention_placeholders_become_names() -> None:
    [message] = normalize(envelope((FIXTURES / "text_group_mention.json").read_bytes()))
    assert message.text == "@IT Helpdesk the printer on floor 3 is jammed, cc @Li Lei"
    assert message.thread_ref == "oc_a0553eda9014c201e6969b478895c230:om_dc13264520392913993dd051dba20002"


def test_redeliveries_with_other_event_ids_are_one_message() -> None:
    first = load("text_p2p")
    again = load("text_p2p")
    again["header"]["event_id"] = "another-delivery"
    [a] = normalize(envelope(orjson.dumps(first)))
    [b] = normalize(envelope(orjson.dumps(again)))
    assert a.idempotency_key() == b.idempotency_key()
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("body", [b"not json", b"[]", orjson.dumps({"schema": "2.0", "header": {
    "event_type": "im.message.receive_v1"}})])
def test_broken_callbacks_are_quarantined(body: bytes) -> None:
    with pytest.raises(NormalizationError):
        normalize(envelope(body))


def test_content_that_is_not_json_is_quarantined() -> None:
    data = load("text_p2p")
    data["event"]["message"]["content"] = "{not json"
    with pytest.raises(NormalizationError):
        normalize(envelope(orjson.dumps(data)))
