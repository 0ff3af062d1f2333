"""Unit tests of the email normalizer's parts: charsets, headers, senders, replies, HTML, loops."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from core.errors import ConfigError
from normalizers.content import normalized
from normalizers.email import normalize_email
from normalizers.email.addresses import Sender, parse_sender, sender_verified
from normalizers.email.charsets import decode
from normalizers.email.headers import decode_text
from normalizers.email.reply import extract_reply
from normalizers.html import sanitize, to_text
from tests.support.mailkit import mail

# --- charsets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "codec", "declared"),
    [
        ("您好，订单", "gbk", "gb2312"),  # GB2312 label, GBK bytes
        ("朱镕基", "gb18030", "gb2312"),
        ("請問退貨", "big5", "big5"),
        ("すみません。", "iso2022_jp", "iso-2022-jp"),
        ("すみません", "cp932", "shift_jis"),
        ("스티해", "cp949", "ks_c_5601-1987"),
        ("Hi Mom -☺-!", "utf-7", "utf-7"),
        ("Привет", "cp1251", "windows-1251"),
        ("Grüße €", "iso8859-15", "latin-9"),
    ],
)
def test_declared_charsets(text: str, codec: str, declared: str) -> None:
    assert decode(text.encode(codec), declared).text == text


def test_missing_charset_is_detected() -> None:
    data = "你好，我上周申请了退款，请问现在处理到哪一步了？麻烦尽快回复，谢谢。".encode("gbk")
    result = decode(data, None)
    assert result.text.startswith("你好")
    assert result.how == "detected"


def test_lying_charset_falls_back() -> None:
    data = "退款进度查询，请尽快回复我，谢谢你们的帮助。".encode("gbk")
    assert decode(data, "utf-8").text.startswith("退款")
    assert decode("Grüße".encode(), "iso-8859-1").text == "Grüße"  # UTF-8 labeled Latin-1


def test_undecodable_is_lossy_and_marked() -> None:
    result = decode(b"\xff\xfe\xfa\xfb" * 3 + b"\x00\x81", "utf-8")
    assert result.lossy == ("\ufffd" in result.text) or result.how == "detected"


def _iso2022_cn(text: str) -> bytes:
    """ISO-2022-CN (RFC 1922) with GB2312 designated to G1: no Python codec writes it."""
    gb = text.encode("gb2312")
    return b"\x1b$)A\x0e" + bytes(b & 0x7F for b in gb) + b"\x0f"


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ("お問い合わせの件".encode("iso2022_jp"), "お問い合わせの件"),  # ESC $ B ... ESC ( B
        (b"\x1b$@\x24\x33\x24\x73\x1b(J abc", "こん abc"),  # ESC $ @ (JIS C 6226), ESC ( J
        ("ｶﾀｶﾅ です".encode("iso2022_jp_ext"), "ｶﾀｶﾅ です"),  # ESC ( I: half-width katakana
        ("문의 드립니다".encode("iso2022_kr"), "문의 드립니다"),  # ESC $ ) C, SO / SI
        (_iso2022_cn("你好，退款"), "你好，退款"),  # ESC $ ) A, SO / SI
        (b"\x1b$A\x44\x63\x3a\x43\x1b(B", "你好"),  # ESC $ A: GB2312 in ISO-2022-JP-2
    ],
)
@pytest.mark.parametrize("declared", [None, "us-ascii"])
def test_unlabelled_iso2022_escapes_are_decoded(data: bytes, text: str, declared: str | None) -> None:
    assert data.isascii()
    result = decode(data, declared)
    assert result.text == text
    assert not result.lossy


def test_unlabelled_iso2022_body_and_header_reach_the_message() -> None:
    body = "お問い合わせの件です。".encode("iso2022_jp")
    subject = "お問い合わせ".encode("iso2022_jp").decode("ascii")
    message = normalize_email(mail(f"From: a@example.com\nSubject: Re: {subject}", body + b"\r\n"))[0]
    assert message.text == "お問い合わせの件です。\r\n".replace("\r\n", "\n")
    assert message.subject == "Re: お問い合わせ"
    assert "lossy_decoding" not in message.extra


def test_escape_sequences_no_codec_reads_are_marked_lossy() -> None:
    # ESC $ ) G designates CNS 11643 plane 1, which Python has no codec for.
    result = decode(b"\x1b$)G\x0e\x44\x63\x0f hello", None)
    assert result.lossy
    message = normalize_email(mail("From: a@example.com\nSubject: s", b"\x1b$)G\x0e\x44\x63\x0f hi\r\n"))[0]
    assert message.extra["lossy_decoding"]


# --- headers --------------------------------------------------------------------------------------


def test_encoded_words_split_inside_a_character_are_joined() -> None:
    data = "发票问题".encode()
    raw = (
        f"=?utf-8?B?{base64.b64encode(data[:4]).decode()}?= =?utf-8?B?{base64.b64encode(data[4:]).decode()}?="
    )
    assert decode_text(raw) == "发票问题"


def test_raw_8bit_headers_utf8_and_gbk() -> None:
    message = normalize_email(
        mail("From: a@example.com\nSubject: " + "Säying Hello".encode().decode("ascii", "surrogateescape"))
    )[0]
    assert message.subject == "Säying Hello"
    # A raw GBK header is read with the charset the body turned out to have (a dozen bytes alone
    # are too few for statistical detection).
    gbk = "咨询退款进度".encode("gbk").decode("ascii", "surrogateescape")
    body = "你好，我上周申请了退款，请问现在处理到哪一步了？麻烦尽快回复，谢谢。".encode("gbk")
    message = normalize_email(mail(f"From: a@example.com\nSubject: {gbk}", body))[0]
    assert message.subject == "咨询退款进度"


@pytest.mark.parametrize("fold", ["\n ", "\n\t", " \n  "])
def test_subject_folded_right_after_its_colon_has_no_leading_space(fold: str) -> None:
    # "Subject:" CRLF SP value: the fold's whitespace is not part of the value (compat32 drops the
    # whitespace after the colon only when the value starts on the same line).
    word = base64.b64encode("关于退款的问题".encode()).decode()
    message = normalize_email(mail(f"From: a@example.com\nSubject:{fold}=?utf-8?B?{word}?="))[0]
    assert message.subject == "关于退款的问题"
    plain = normalize_email(mail(f"From: a@example.com\nSubject:{fold}Refund  question \t"))[0]
    assert plain.subject == "Refund  question"


def test_q_encoded_word_with_spaces_and_unknown_label() -> None:
    assert decode_text("=?UTF-8?Q? Personal=C3=A4nderung?=") == " Personaländerung"
    assert decode_text("=?unicode-1-1-utf-7?Q?+ANw-bermittlung?=") == "Übermittlung"


# --- senders and trust ----------------------------------------------------------------------------


def test_display_name_with_another_address_never_becomes_the_identity() -> None:
    sender = parse_sender(["support@bank.example <attacker@evil.example>"])
    assert sender.address == "attacker@evil.example"
    assert "display_name_contains_address" in sender.flags


def test_encoded_word_cannot_smuggle_an_address() -> None:
    sender = parse_sender(["=?utf-8?q?ceo@bank.example?= <attacker@evil.example>"])
    assert sender.address == "attacker@evil.example"
    sender = parse_sender([f"=?utf-8?b?{base64.b64encode(b'ceo@bank.example').decode()}?="])
    assert sender.address is None


def test_idna_and_case_of_domain() -> None:
    assert parse_sender(["Jöhn <John@XN--MCHINE-BUA.Example>"]).address == "John@mächine.example"


def test_verified_only_with_aligned_upstream_pass() -> None:
    sender = parse_sender(["a@mail.example.com"])
    assert sender_verified(sender, {"dmarc": "pass", "header_from": "mail.example.com"})
    assert sender_verified(sender, {"dkim": [{"result": "pass", "domain": "example.com"}]})
    assert not sender_verified(sender, {"dkim": [{"result": "pass", "domain": "other.example"}]})
    assert not sender_verified(sender, {"dmarc": "fail", "header_from": "mail.example.com"})
    assert not sender_verified(sender, None)
    two = Sender("a@mail.example.com", None, ("multiple_from",))
    assert not sender_verified(two, {"dmarc": "pass", "header_from": "mail.example.com"})


def test_several_from_headers_are_never_verified() -> None:
    envelope = mail(
        "From: a@example.com\nFrom: b@example.com\nSubject: x",
        authentication={"dmarc": "pass", "header_from": "example.com"},
    )
    message = normalize_email(envelope)[0]
    assert [i.verified for i in message.identities] == [False]
    assert "multiple_from" in message.extra["sender_flags"]


# --- replies --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "history",
    [
        "On Mon, Jan 8, 2024 at 10:00 AM Support <s@x.com> wrote:\n> old",
        "On Mon, Jan 8, 2024 at 10:00 AM Support <s@x.com>\nwrote:\n> old",
        "-----Original Message-----\nFrom: s@x.com\nSent: Monday\nold",
        "From: Support <s@x.com>\nSent: Monday, January 8, 2024 10:00\nTo: me\nSubject: x\n\nold",
        "发件人: Support <s@x.com>\n发送时间: 2024年1月8日 10:00\n收件人: me\n主题: x\n\nold",
        '------------------ 原始邮件 ------------------\n发件人: "Support"<s@x.com>;\nold',
        '在 2024-01-08 10:00:00，"Support" <s@x.com> 写道：\n>old',
        "在 2024年1月8日，上午10:00，Support <s@x.com> 写道：\nold",
        "On 8 Jan 2024, at 10:00, Support <s@x.com> wrote:\n\nold",
        "-- \nJane Doe\nACME Corp",
        "Sent from my iPhone",
        "发自我的iPhone",
        "> old\n> older",
    ],
)
def test_reply_markers(history: str) -> None:
    assert extract_reply(f"New answer here.\n\n{history}\n") == "New answer here."


def test_reply_keeps_a_plain_from_line_in_prose() -> None:
    text = "From: the warehouse, the parcel left today.\nThanks"
    assert extract_reply(text) == text


# --- HTML -----------------------------------------------------------------------------------------


def test_sanitize_removes_active_and_remote_content_keeps_cid() -> None:
    html = sanitize(
        '<p onclick="x()">Hi<script>alert(1)</script></p><img src="https://t.example/p.gif">'
        '<img src="cid:logo@x"><a href="javascript:alert(1)">a</a><style>p{}</style>'
        '<iframe src="https://x"></iframe><form action="https://x"><input></form>'
    )
    for removed in ("script", "onclick", "alert", "t.example", "iframe", "javascript", "form"):
        assert removed not in html
    assert 'src="cid:logo@x"' in html


def test_html_to_text_marks_quotes() -> None:
    text = to_text("<div>Yes<br>ok</div><blockquote>old<p>older</p></blockquote><ul><li>a</li></ul>")
    assert text.splitlines()[:2] == ["Yes", "ok"]
    assert "> old" in text
    assert "- a" in text


# --- auto replies, threading, dates ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ("Auto-Submitted: auto-replied", "auto-reply"),
        ("Auto-Submitted: auto-generated", "auto-generated"),
        ("X-Autoreply: yes", "auto-reply"),
        ("X-Autorespond: yes", "auto-reply"),
        ("Precedence: bulk", "bulk"),
        ("Precedence: junk", "bulk"),
        ("Precedence: list", "list"),
        ("List-Id: <users.lists.example.com>", "list"),
        ("List-Unsubscribe: <mailto:u@example.com>", "list"),
        ("X-Loop: ticketgate@demo.localhost", "loop"),
        ("Return-Path: <>", "auto-generated"),
        ("Subject: Automatic reply: your ticket", "auto-reply"),
        ("Subject: Out of Office", "auto-reply"),
        ("Subject: =?utf-8?B?6Ieq5Yqo5Zue5aSN?=", "auto-reply"),
    ],
)
def test_auto_generated(headers: str, reason: str) -> None:
    assert normalize_email(mail(f"From: a@example.com\n{headers}"))[0].auto_generated == reason


def test_person_is_not_auto_generated() -> None:
    message = normalize_email(mail("From: a@example.com\nAuto-Submitted: no\nSubject: help"))[0]
    assert message.auto_generated is None


def test_mailer_daemon_is_a_bounce() -> None:
    message = normalize_email(mail("From: MAILER-DAEMON@mx.example.com\nSubject: failure"))[0]
    assert message.auto_generated == "bounce"


def test_custom_loop_marker_and_ticket_pattern() -> None:
    envelope = mail(
        "From: a@example.com\nX-Loop: acme-desk\nSubject: Re: [Case 77] x",
        loop_marker="acme-desk",
        ticket_ref_pattern=r"\[Case (?P<number>\d+)\]",
    )
    message = normalize_email(envelope)[0]
    assert (message.auto_generated, message.thread_ref) == ("loop", "ticket:77")
    with pytest.raises(ConfigError):
        normalize_email(mail("From: a@example.com\nSubject: x", ticket_ref_pattern="(["))


def test_threading_headers() -> None:
    message = normalize_email(
        mail(
            "From: a@example.com\nMessage-ID: <m3@x>\nIn-Reply-To: <m2@x>\nReferences: <m1@x>\n <m2@x> <m1@x>"
        )
    )[0]
    assert (message.external_id, message.in_reply_to, message.references) == (
        "m3@x",
        "m2@x",
        ("m1@x", "m2@x"),
    )


def test_synthetic_id_is_stable_across_relays_and_differs_by_body() -> None:
    first = normalize_email(mail("From: a@example.com\nDate: Mon, 1 Jan 2024 10:00:00 +0000\nSubject: q"))[0]
    relayed = normalize_email(
        mail(
            "Received: from mx by mx2; Mon, 1 Jan 2024\nFrom: a@example.com\n"
            "Date: Mon, 1 Jan 2024 10:00:00 +0000\nSubject: q"
        )
    )[0]
    other = normalize_email(
        mail("From: a@example.com\nDate: Mon, 1 Jan 2024 10:00:00 +0000\nSubject: q", b"another body\r\n")
    )[0]
    assert first.external_id == relayed.external_id != other.external_id
    assert first.idempotency_key() == relayed.idempotency_key()


@pytest.mark.parametrize(
    "date", ["not a date", "Mon, 32 Foo 2024 99:99:99", "", "Tue, 1 Jan 99999 10:00 +0000"]
)
def test_broken_dates_are_none(date: str) -> None:
    assert normalize_email(mail(f"From: a@example.com\nDate: {date}"))[0].sent_at is None


def test_naive_date_is_utc() -> None:
    message = normalize_email(mail("From: a@example.com\nDate: Mon, 1 Jan 2024 10:00:00 -0000"))[0]
    assert message.sent_at == datetime(2024, 1, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("请问我的订单什么时候发货？", "zh"),
        ("ご注文ありがとうございます。", "ja"),
        ("주문 감사합니다", "ko"),
        ("Hello, could you please tell me when my order will arrive? Thanks", "en"),
        ("12345", None),
    ],
)
def test_language_guess(text: str, language: str | None) -> None:
    raw = mail("From: a@example.com\nContent-Type: text/plain; charset=utf-8", text.encode())
    assert normalized(normalize_email, raw)[0].language == language


def test_forwarded_message_is_one_attachment_and_dsn_links_the_bounced_id() -> None:
    inner = b"From: b@example.com\r\nSubject: Original\r\nMessage-ID: <orig@example.com>\r\n\r\nold\r\n"
    body = (
        b"--B\r\nContent-Type: text/plain\r\n\r\nsee below\r\n--B\r\nContent-Type: message/rfc822\r\n\r\n"
        + inner
        + b"--B--\r\n"
    )
    message = normalize_email(
        mail("From: MAILER-DAEMON@example.com\nContent-Type: multipart/mixed; boundary=B", body)
    )[0]
    assert [a.name for a in message.attachments] == ["Original.eml"]
    assert message.attachments[0].data.startswith(b"From: b@example.com")
    assert (message.auto_generated, message.in_reply_to) == ("bounce", "orig@example.com")
