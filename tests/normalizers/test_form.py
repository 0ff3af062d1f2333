"""The form normalizer from captured bodies (multipart, urlencoded, JSON) with golden outputs."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import InvalidInput, TooLarge
from core.model import RawEnvelope
from normalizers.form import MAX_PARTS, field_errors, normalize_form, parse_form
from tests.normalizers.golden import as_golden, check_golden

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "form"
RECEIVED = datetime(2026, 11, 22, 3, 0, tzinfo=UTC)


def envelope(body: bytes, content_type: str | None, **meta: Any) -> RawEnvelope:
    return RawEnvelope(
        channel="form", tenant="acme", inbox="support", body=body, content_type=content_type,
        received_at=RECEIVED, meta={"accept_language": "zh-CN,zh;q=0.9", "phone_region": "CN", **meta},
    )


def fixture(name: str) -> RawEnvelope:
    body = None
    for suffix in (".bin", ".txt", ".json"):
        path = FIXTURES / f"{name}{suffix}"
        if path.exists():
            body = path.read_bytes()
    assert body is not None
    content_type = (FIXTURES / f"{name}.content-type").read_text().strip()
    return envelope(body, content_type)


@pytest.mark.parametrize("name", ["chrome_multipart", "urlencoded_zh", "fetch"])
def test_golden(name: str) -> None:
    messages = [as_golden(m) for m in normalize_form(fixture(name))]
    check_golden(messages, FIXTURES / f"{name}.expected.json")


def test_multipart_keeps_binary_attachments_exactly() -> None:
    (message,) = normalize_form(fixture("chrome_multipart"))
    png = message.attachments[0].data
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png.endswith(b"\r\n--not-a-boundary\r\n\x00\xff")  # looks like a delimiter, is not one
    assert message.attachments[1].name == 'note "draft".txt'


def test_a_double_submit_is_one_message_id() -> None:
    first = normalize_form(fixture("urlencoded_zh"))[0]
    again = normalize_form(fixture("urlencoded_zh"))[0]
    assert first.external_id is None
    assert first.message_id() == again.message_id()


def test_honeypot_yields_nothing() -> None:
    bot = envelope(b"message=hi&email=a%40b.co&website=x", "application/x-www-form-urlencoded")
    assert normalize_form(bot) == ()


@pytest.mark.parametrize(("body", "reason"), [
    (b"email=a%40b.co&message=++", "message: required"),
    (b"name=x&message=hello", "contact: contact_required"),
    (b"email=nope&message=hello", "email: invalid"),
    (b"phone=12&message=hello", "phone: invalid"),
])
def test_invalid_submissions_name_the_field(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as caught:
        normalize_form(envelope(body, "application/x-www-form-urlencoded"))
    assert caught.value.status == 400


def test_unusable_phone_with_an_email_is_kept_raw() -> None:
    (message,) = normalize_form(fixture("fetch"))
    assert [i.kind for i in message.identities] == ["email"]
    assert message.extra["phone_raw"] == "12"


@pytest.mark.parametrize(("body", "content_type", "status"), [
    (b"message=hi", "text/plain", 415),
    (b"message=hi", None, 415),
    (b"message=%FF", "application/x-www-form-urlencoded", 400),
    (b"message=\xff", "application/x-www-form-urlencoded", 400),
    (b"message=hi", "application/x-www-form-urlencoded; charset=klingon", 415),
    (b"[1]", "application/json", 400),
    (b'{"attachments": [{"name": "a", "data_base64": "YWJj===="}]}', "application/json", 400),
    (b'{"attachments": [{"name": "a", "data_base64": "YR=="}]}', "application/json", 400),
    (b'{"message": 5}', "application/json", 400),
    (b"--b\r\nContent-Disposition: form-data; name=\"m\"\r\n\r\nhi", "multipart/form-data; boundary=b", 400),
    (b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b--", "multipart/form-data; boundary=b", 400),
    (b"hi", "multipart/form-data", 400),
])
def test_unreadable_bodies(body: bytes, content_type: str | None, status: int) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_form(body, content_type)
    assert caught.value.status == status


def test_part_count_is_bounded() -> None:
    part = b'--b\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    with pytest.raises(TooLarge):
        parse_form(part * (MAX_PARTS + 1) + b"--b--\r\n", "multipart/form-data; boundary=b")


def test_gbk_urlencoded_is_decoded_by_its_charset() -> None:
    body = "message=退款&phone=13800138000".encode("gbk")
    submission = parse_form(body, "application/x-www-form-urlencoded; charset=gbk")
    assert submission.get("message") == "退款"
    assert field_errors(submission) == {}
