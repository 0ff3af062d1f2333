"""Golden tests for the Mini Program normalizer: JSON and XML pushes -> canonical messages."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.errors import InvalidInput
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.wechat_miniprogram import normalize
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "miniprogram"
RECEIVED = datetime(2025, 12, 5, 8, 0, 1, tzinfo=UTC)
APP_ID = "wx0123456789abcdef"


def envelope(plaintext: str) -> RawEnvelope:
    return RawEnvelope(
        channel="miniprogram",
        tenant="acme",
        inbox="mini",
        body=b"<encrypted>",
        received_at=RECEIVED,
        signature_verified=True,
        meta={"plaintext": plaintext, "app_id": APP_ID, "account": "shop", "mode": "safe"},
    )


def fixtures() -> list[Path]:
    return sorted(
        p
        for p in FIXTURES.iterdir()
        if p.suffix in (".json", ".xml") and not p.name.endswith(".expected.json")
    )


def load(name: str) -> list[CanonicalMessage]:
    return list(normalize(envelope((FIXTURES / name).read_text(encoding="utf-8"))))


@pytest.mark.parametrize("path", fixtures(), ids=lambda p: p.name)
def test_golden(path: Path) -> None:
    messages = normalize(envelope(path.read_text(encoding="utf-8")))
    check_golden([as_golden(m) for m in messages], path.with_name(f"{path.stem}{path.suffix}.expected.json"))


def test_every_fixture_has_a_golden() -> None:
    assert len(fixtures()) >= 6
    assert all(p.with_name(f"{p.stem}{p.suffix}.expected.json").exists() for p in fixtures())


def test_json_and_xml_of_one_message_are_the_same_message() -> None:
    [as_json], [as_xml] = load("text.json"), load("text.xml")
    assert as_json.idempotency_key() == as_xml.idempotency_key()
    assert (as_json.text, as_json.external_id) == (as_xml.text, as_xml.external_id)
    assert (as_json.extra["format"], as_xml.extra["format"]) == ("json", "xml")


def test_the_unionid_joins_the_openid() -> None:
    [message] = load("text_with_unionid.json")
    kinds = [(i.kind, i.value) for i in message.identities]
    assert kinds == [
        (IdentityKind.WECHAT_OPENID, f"{APP_ID}:oMini_6f5e4d3c2b1a0987"),
        (IdentityKind.WECHAT_UNIONID, "oUnion_ab12cd34ef56"),
    ]


@pytest.mark.parametrize(
    "plaintext", ["[1]", '{"MsgType": ', "<xml><MsgType>text", '<!DOCTYPE x [<!ENTITY a "b">]><xml/>']
)
def test_documents_that_are_not_pushes_are_invalid(plaintext: str) -> None:
    with pytest.raises(InvalidInput):
        normalize(envelope(plaintext))
