"""Golden tests for the WeChat / WeCom normalizer, and a sweep over the wechatpy sample corpus."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidInput, NormalizationError, TooLarge
from core.model import CanonicalMessage, IdentityKind, RawEnvelope
from normalizers.wechat import normalize, parse_callback_xml
from tests.support.corpora import CORPORA as CORPORA_DIR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "wechat"
CORPUS = CORPORA_DIR / "wechatpy"
DEFUSED = CORPORA_DIR / "defusedxml"
RECEIVED = datetime(2024, 6, 10, 8, 0, tzinfo=UTC)
APP_ID = "wx0123456789abcdef"
CORP_ID = "ww0123456789abcdef"


def envelope(channel: str, plaintext: str | bytes, *, verified: bool = True) -> RawEnvelope:
    meta: dict[str, Any] = {"plaintext": plaintext, "account": "demo", "mode": "safe"}
    meta.update({"corp_id": CORP_ID, "agent_id": 1000002} if channel == "wecom" else {"app_id": APP_ID})
    return RawEnvelope(
        channel=channel, tenant="acme", inbox=f"{channel}-demo", body=b"<xml>raw as received</xml>",
        received_at=RECEIVED, signature_verified=verified, meta=meta,
    )


def summarize(message: CanonicalMessage) -> dict[str, Any]:
    """The golden projection: everything but the bulky ``fields`` / ``xml`` copies in ``extra``."""
    return {
        "kind": message.kind,
        "external_id": message.external_id,
        "dedupe_key": message.dedupe_key,
        "idempotency_key": message.idempotency_key(),
        "sent_at": message.sent_at.isoformat() if message.sent_at else None,
        "text": message.text,
        "identities": [[i.kind, i.value, i.verified] for i in message.identities],
        "media": [[m.kind, m.ref, m.name, m.content_type] for m in message.media],
        "extra": {k: v for k, v in message.extra.items() if k not in ("fields", "xml")},
        "has_raw_xml": "xml" in message.extra,
    }


def _fixtures() -> list[Path]:
    return sorted(FIXTURES.glob("*/*.xml"))


@pytest.mark.parametrize("path", _fixtures(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_golden(path: Path) -> None:
    channel = "wecom" if path.parent.name == "wecom" else "wechat"
    messages = normalize(envelope(channel, path.read_text(encoding="utf-8")))
    assert len(messages) == 1
    got = summarize(messages[0])
    golden = path.with_suffix(".expected.json")
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(got, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    assert got == json.loads(golden.read_text(encoding="utf-8"))


def test_every_fixture_has_a_golden() -> None:
    paths = _fixtures()
    assert len(paths) >= 25
    assert all(p.with_suffix(".expected.json").exists() for p in paths)


def one(channel: str, name: str, *, verified: bool = True) -> CanonicalMessage:
    folder = "wecom" if channel == "wecom" else "official_account"
    text = (FIXTURES / folder / f"{name}.xml").read_text("utf-8")
    return normalize(envelope(channel, text, verified=verified))[0]


def test_text_keeps_content_and_msgid() -> None:
    message = one("wechat", "text")
    assert message.text == "订单 TG-1234 还没到，请帮忙查一下"
    assert message.external_id == "24611111111111111"
    assert message.kind == "message"
    assert message.sent_at == datetime.fromtimestamp(1718000001, UTC)


def test_openid_is_scoped_to_the_account_and_verified_only_when_signed() -> None:
    signed = one("wechat", "text_unionid")
    kinds = {i.kind: i for i in signed.identities}
    assert kinds[IdentityKind.WECHAT_OPENID].value == f"{APP_ID}:oUser9x8y7z6w5v4u3t2s1r0q"
    assert kinds[IdentityKind.WECHAT_OPENID].verified is True
    assert kinds[IdentityKind.WECHAT_UNIONID].value == "uUnion000111222"
    unsigned = one("wechat", "text_unionid", verified=False)
    assert not any(i.verified for i in unsigned.identities)


def test_voice_uses_recognition_as_text() -> None:
    assert one("wechat", "voice").text == "我要退货"
    assert one("wechat", "voice_plain").text is None
    assert one("wechat", "voice").media[0].ref == "VOICE_MEDIA_1"


def test_events_dedupe_on_sender_time_event_and_key() -> None:
    click = one("wechat", "event_click")
    assert click.kind == "event"
    assert click.external_id is None
    assert click.dedupe_key == "event:oUser9x8y7z6w5v4u3t2s1r0q:1718000015:CLICK:MENU_CONTACT_US"
    # The same callback delivered again (WeChat retries three times) maps to the same key.
    assert one("wechat", "event_click").idempotency_key() == click.idempotency_key()


def test_qrscene_subscription_exposes_scene() -> None:
    message = one("wechat", "event_subscribe_qrscene")
    assert message.extra["scene_id"] == "store42"
    assert message.extra["ticket"] == "QR_TICKET_1"


def test_unknown_types_are_kept_with_raw_xml() -> None:
    unknown_message = one("wechat", "unknown_message")
    assert unknown_message.kind == "message"
    assert "<AppId>" in unknown_message.extra["xml"]
    unknown_event = one("wechat", "unknown_event")
    assert unknown_event.kind == "event"
    assert "TEMPLATESENDJOBFINISH" in unknown_event.extra["xml"]


def test_wecom_identities() -> None:
    internal = one("wecom", "text")
    assert [(i.kind, i.value) for i in internal.identities] == [
        (IdentityKind.WECOM_USERID, f"{CORP_ID}:zhangsan")
    ]
    external = one("wecom", "event_external_contact")
    assert [(i.kind, i.value) for i in external.identities] == [
        (IdentityKind.WECOM_EXTERNAL_USERID, f"{CORP_ID}:wmEXTERNAL0001")
    ]


def test_missing_plaintext_is_a_normalization_error() -> None:
    broken = RawEnvelope(channel="wechat", tenant="acme", inbox="x", body=b"", received_at=RECEIVED)
    with pytest.raises(NormalizationError):
        normalize(broken)


def test_xml_without_msgtype_is_a_normalization_error() -> None:
    with pytest.raises(NormalizationError):
        normalize(envelope("wechat", "<xml><FromUserName>a</FromUserName></xml>"))


def test_parser_bounds_size_and_depth() -> None:
    with pytest.raises(TooLarge):
        parse_callback_xml("<xml>" + "a" * 200 + "</xml>", max_bytes=100)
    deep = "<xml>" + "<a>" * 20 + "x" + "</a>" * 20 + "</xml>"
    with pytest.raises(InvalidInput):
        parse_callback_xml(deep)


def test_parser_keeps_repeated_and_nested_elements() -> None:
    fields = parse_callback_xml("<xml><L><T>1</T></L><L><T>2</T></L><E/></xml>")
    assert fields == {"L": [{"T": "1"}, {"T": "2"}], "E": ""}


@pytest.mark.skipif(not DEFUSED.is_dir(), reason="defusedxml corpus not present")
@pytest.mark.parametrize("name", sorted(p.name for p in DEFUSED.glob("*.xml")) if DEFUSED.is_dir() else [])
def test_hostile_documents_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_callback_xml((DEFUSED / name).read_bytes())
    assert info.value.status == 400


def _corpus_samples() -> list[Path]:
    if not CORPUS.is_dir():
        return []
    return sorted([*CORPUS.glob("xml_official_account/*.xml"), *CORPUS.glob("xml_work/*.xml")])


@pytest.mark.skipif(not CORPUS.is_dir(), reason="wechatpy corpus not present")
def test_corpus_is_present_and_complete() -> None:
    assert len(_corpus_samples()) == 74


@pytest.mark.skipif(not CORPUS.is_dir(), reason="wechatpy corpus not present")
@pytest.mark.parametrize("path", _corpus_samples(), ids=lambda p: p.stem)
def test_every_corpus_sample_normalizes(path: Path) -> None:
    channel = "wecom" if path.parent.name == "xml_work" else "wechat"
    messages = normalize(envelope(channel, path.read_bytes()))
    assert len(messages) == 1
    message = messages[0]
    assert message.kind in ("message", "event")
    # Every message is idempotent: a provider id or a documented event key.
    assert (message.external_id is None) != (message.dedupe_key is None) or message.dedupe_key is not None
    assert message.identities


def test_a_doctype_is_refused_even_on_an_otherwise_valid_callback() -> None:
    doc = (
        '<?xml version="1.0"?><!DOCTYPE xml [<!ELEMENT xml ANY>]>'
        "<xml><FromUserName>a</FromUserName><CreateTime>1</CreateTime><MsgType>text</MsgType></xml>"
    )
    with pytest.raises(InvalidInput, match="DTDForbidden"):
        parse_callback_xml(doc)
