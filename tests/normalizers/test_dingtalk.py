"""Golden tests for the DingTalk normalizer: robot messages -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from core.errors import NormalizationError
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.dingtalk import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dingtalk"
RECEIVED = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)


def envelope(body: bytes) -> RawEnvelope:
    return RawEnvelope(
        channel="dingtalk",
        tenant="acme",
        inbox="it-desk",
        body=body,
        received_at=RECEIVED,
        signature_verified=True,
        meta={"transport": "stream"},
    )


def golden(message: CanonicalMessage) -> dict[str, Any]:
    return {**as_golden(message), "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media]}


def fixtures() -> list[Path]:
    return sorted(p for p in FIXTURES.glob("*.json") if not p.name.endswith(".expected.json"))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_bytes()))
    check_golden([golden(m) for m in messages], path.with_name(f"{path.stem}.expected.json"))


def test_an_employee_has_the_staff_id_and_the_way_back() -> None:
    [message] = normalize(envelope((FIXTURES / "text_single.json").read_bytes()))
    assert {i.kind: i.value for i in message.identities}[
        IdentityKind.DINGTALK_STAFF_ID
    ] == "ding9f50b15bccd16741:manager4821"
    assert message.text == "打印机卡纸了，三楼"
    assert message.extra["session_webhook"].startswith("https://oapi.dingtalk.com/robot/sendBySession")
    assert message.extra["conversation_type"] == "single"


def test_a_group_message_without_the_robot_mentioned_is_not_a_ticket() -> None:
    assert normalize(envelope((FIXTURES / "group_not_at.json").read_bytes())) == ()


@pytest.mark.parametrize(
    "body",
    [b"nope", b"[]", orjson.dumps({"msgtype": "text"}), orjson.dumps({"msgId": "m1", "msgtype": "text"})],
)
def test_broken_messages_are_quarantined(body: bytes) -> None:
    with pytest.raises(NormalizationError):
        normalize(envelope(body))
