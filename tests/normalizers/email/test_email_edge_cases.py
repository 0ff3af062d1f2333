"""Real-world gaps found by the conformance runner: made-up attachment names, lossy plain parts,
raw legacy-charset headers without any charset in the mail, damaged base64."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from core.model import RawEnvelope
from normalizers.email import normalize_email
from normalizers.email.charsets import decode_unlabeled_cjk
from normalizers.email.headers import decode_text


def envelope(raw: bytes) -> RawEnvelope:
    return RawEnvelope(
        channel="email",
        tenant="t",
        inbox="support@demo.localhost",
        body=raw.replace(b"\n", b"\r\n"),
        received_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


def multipart(subtype: str, *parts: bytes, head: bytes = b"") -> bytes:
    body = b"".join(b"--b0\n" + part + b"\n" for part in parts)
    return (
        b"From: a@example.com\nSubject: s\nMessage-ID: <m@example.com>\n"
        + head
        + b"Content-Type: multipart/"
        + subtype.encode()
        + b'; boundary="b0"\n\n'
        + body
        + b"--b0--\n"
    )


JPEG = base64.b64encode(b"\xff\xd8\xff\xe0 not really a jpeg").decode().encode()


# --- made-up names of nameless parts -----------------------------------------------------------


def test_parts_sharing_a_content_id_get_distinct_stable_names() -> None:
    # Zammad mail100: three copies of one image under the same Content-ID, only one with a name.
    part = (
        b"Content-Type: %s\nContent-ID: <32497.1617621278.2@humeexp>\nContent-Transfer-Encoding: base64\n\n"
    )
    raw = multipart(
        "related",
        b"Content-Type: text/html\n\n<img src=cid:32497.1617621278.2@humeexp>",
        part % b'application/others; name="scan.jpg"' + JPEG,
        part % b"application/others" + JPEG,
        part % b"application/others" + JPEG,
        part % b"image/jpg" + JPEG,
    )
    names = [a.name for a in normalize_email(envelope(raw))[0].attachments]
    # The sender's name is kept; a sequence number is not an extension ("…1278.2"), so the content
    # type names the image; the others take the Content-ID's local part, made unique.
    assert names == ["scan.jpg", "32497.1617621278.2", "32497.1617621278.21", "image.jpg"]
    assert [a.name for a in normalize_email(envelope(raw))[0].attachments] == names


def test_content_id_with_a_file_name_names_the_part_uniquely() -> None:
    part = (
        b"Content-Type: image/png\nContent-ID: <image001.png@01D4C3>\nContent-Transfer-Encoding: base64\n\n"
    )
    raw = multipart("mixed", b"Content-Type: text/plain\n\nhi", part + JPEG, part + JPEG)
    assert [a.name for a in normalize_email(envelope(raw))[0].attachments] == [
        "image001.png",
        "image0011.png",
    ]


def test_non_root_html_of_multipart_related_is_an_attachment() -> None:
    # RFC 2387: only the root of a multipart/related is the body; other members are its resources.
    raw = multipart(
        "related",
        b"Content-Type: text/html\n\n<p>the body</p>",
        b"Content-Type: text/html\n\n<html>a resource</html>",
        head=b"",
    )
    message = normalize_email(envelope(raw))[0]
    assert message.html is not None
    assert "the body" in message.html
    assert "resource" not in message.html
    assert [(a.name, a.data.strip()) for a in message.attachments] == [
        ("document.html", b"<html>a resource</html>")
    ]


def test_related_start_parameter_chooses_the_root() -> None:
    raw = multipart(
        "related",
        b"Content-Type: text/html\nContent-ID: <res@x>\n\n<p>resource</p>",
        b"Content-Type: text/html\nContent-ID: <root@x>\n\n<p>root</p>",
    ).replace(b'boundary="b0"', b'boundary="b0"; start="<root@x>"')
    message = normalize_email(envelope(raw))[0]
    assert message.html is not None
    assert "root" in message.html
    assert "resource" not in message.html


# --- plain part decoded lossily --------------------------------------------------------------------


def alternative(plain: bytes, html: bytes) -> bytes:
    return multipart(
        "alternative",
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + plain,
        b"Content-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + html,
    )


def test_lossy_plain_part_gives_way_to_clean_html() -> None:
    broken = "prosazuje lepší".encode() + b" \xff prostor"  # one damaged byte in UTF-8
    message = normalize_email(envelope(alternative(broken, "<p>prosazuje lepší prostor</p>".encode())))[0]
    assert message.text == "prosazuje lepší prostor"
    assert message.extra["text_source"] == "html"
    assert message.extra["lossy_decoding"]


def test_clean_plain_part_stays_even_when_html_says_more() -> None:
    message = normalize_email(envelope(alternative(b"short", b"<p>short</p><p>and much more besides</p>")))[0]
    assert message.text == "short"
    assert "text_source" not in message.extra


def test_blank_plain_part_gives_way_to_html() -> None:
    message = normalize_email(envelope(alternative(b"  \n", b"<p>the real text</p>")))[0]
    assert message.text == "the real text"


def test_both_lossy_keeps_the_plain_part() -> None:
    message = normalize_email(envelope(alternative(b"plain \xff\xfe\xc3(", b"<p>html \xff\xfe\xc3(</p>")))[0]
    assert message.text is not None
    assert message.text.startswith("plain")
    assert "text_source" not in message.extra


# --- raw legacy-charset headers, no charset anywhere in the mail -----------------------------------


@pytest.mark.parametrize(
    ("name", "subject", "codec", "expected_codec"),
    [
        ("张伟", "关于订单的问题", "gbk", "gb18030"),
        ("王小明", "请问退款进度", "gbk", "gb18030"),
        ("陳大文", "請問訂單何時出貨", "big5", "big5"),
        ("林志玲", "台灣退貨申請", "big5", "big5"),
        ("山田太郎", "ご注文の確認", "shift_jis", "cp932"),
        ("田中", "ファイルを送ります", "shift_jis", "cp932"),
    ],
)
def test_raw_legacy_cjk_from_name_and_subject(
    name: str, subject: str, codec: str, expected_codec: str
) -> None:
    raw = (
        b'From: "'
        + name.encode(codec)
        + b'" <a@example.com>\nSubject: '
        + subject.encode(codec)
        + b"\nMessage-ID: <m@example.com>\n\nplain ascii body\n"
    )
    message = normalize_email(envelope(raw))[0]
    assert (message.display_name, message.subject) == (name, subject)
    guessed = decode_unlabeled_cjk(subject.encode(codec))
    assert guessed is not None
    assert guessed.charset == expected_codec


def test_gbk_outside_gb2312_is_still_gbk() -> None:
    # 喆 and 灣 are GBK but not GB2312: the first round rejects GB18030, the second takes it back.
    assert decode_text("喆 台灣".encode("gbk").decode("latin-1")) == "喆 台灣"


@pytest.mark.parametrize("text", ["Gérard Müller", "José", "Ångström", "Réunion à Paris"])
def test_raw_latin_header_is_not_taken_for_cjk(text: str) -> None:
    assert decode_text(text.encode("latin-1").decode("latin-1")) == text


def test_raw_utf8_header_stays_utf8() -> None:
    assert decode_text("Grüße 你好".encode().decode("latin-1")) == "Grüße 你好"


def test_multibyte_charset_of_the_body_still_wins() -> None:
    # With a GBK body the same bytes are GBK, even where a Big5 reading would also pass.
    data = "林志玲".encode("big5")
    assert decode_text(data.decode("latin-1"), hint="big5") == "林志玲"
    assert decode_text("咨询".encode("gbk").decode("latin-1"), hint="gb2312") == "咨询"


def test_single_byte_body_charset_does_not_stop_cjk_headers() -> None:
    # Zammad mail046: body iso-8859-1, raw GBK display name in From.
    raw = "武兰成".encode("gbk").decode("latin-1")
    assert decode_text(raw, hint="iso-8859-1") == "武兰成"
    assert decode_text("Łódź".encode("iso8859-2").decode("latin-1"), hint="iso-8859-2") == "Łódź"


# --- damaged base64 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # Zammad mail062: 4n+1 characters; the stdlib returns these still encoded (21 bytes).
        (b"/9j/4AAQSkZJABC123456", b"\xff\xd8\xff\xe0\x00\x10JFI\x00\x10\xb5\xdb~9"),
        (b"/9j/4AAQSkZJABC", b"\xff\xd8\xff\xe0\x00\x10JFI\x00\x10"),  # padding missing
        (b"aGVsbG8=\n-- \nlist footer!", b"hello"),  # garbage after the padding is not data
        (b"aGVs*bG8g\nd29y bGQ", b"hello world"),  # stray characters inside, no padding
    ],
)
def test_broken_base64_decodes_the_valid_groups(payload: bytes, expected: bytes) -> None:
    raw = multipart(
        "mixed",
        b"Content-Type: text/plain\n\nsee attached",
        b'Content-Type: application/octet-stream; name="x.bin"\nContent-Transfer-Encoding: base64\n\n'
        + payload,
    )
    message = normalize_email(envelope(raw))[0]
    assert message.attachments[0].data == expected
    assert any(d.startswith("InvalidBase64") for d in message.extra["mime_defects"])


def test_valid_base64_is_untouched() -> None:
    raw = multipart(
        "mixed",
        b"Content-Type: text/plain\n\nsee attached",
        b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n" + JPEG,
    )
    message = normalize_email(envelope(raw))[0]
    assert message.attachments[0].data == b"\xff\xd8\xff\xe0 not really a jpeg"
    assert "mime_defects" not in message.extra


def test_empty_forwarded_message_is_empty() -> None:
    raw = multipart(
        "mixed",
        b"Content-Type: text/plain\n\nbounced",
        b"Content-Type: message/rfc822\n\n",
    )
    message = normalize_email(envelope(raw))[0]
    assert [a.data for a in message.attachments] == [b""]


def test_damaged_utf8_stays_utf8_and_is_marked_lossy() -> None:
    from normalizers.email.charsets import decode

    result = decode("Grüße, lepší".encode() + b" \xff!", "utf-8")
    assert (result.text, result.how) == ("Grüße, lepší \ufffd!", "lossy")
    # Latin-1 mislabeled as UTF-8 has no well-formed sequences: still detected, not replaced.
    assert decode("Grüße aus Köln".encode("latin-1"), "utf-8").how != "lossy"


# --- consecutive body parts of a multipart/mixed ----------------------------------------------


def text_and_html(raw: bytes) -> tuple[str, str]:
    message = normalize_email(envelope(raw))[0]
    assert message.text is not None
    assert message.html is not None
    return message.text, message.html


ALTERNATIVE = (
    b'Content-Type: multipart/alternative; boundary="alt"\n\n'
    b"--alt\nContent-Type: text/plain\n\nPlain body\n"
    b"--alt\nContent-Type: text/html\n\n<p>HTML <i>body</i></p>\n--alt--"
)


@pytest.mark.parametrize(
    ("parts", "text_order", "html_order"),
    [
        pytest.param(  # a server appended a plain disclaimer after the sender's HTML body
            (
                b"Content-Type: text/html; charset=utf-8\n\n<p>Where is my <b>refund</b>?</p>",
                b"Content-Type: text/plain; charset=utf-8\n\n-- \nSent via Example Mail <gateway>",
            ),
            ["Where is my refund?", "Sent via Example Mail <gateway>"],
            ["<b>refund</b>", "Sent via Example Mail &lt;gateway&gt;"],  # escaped, never parsed
            id="html-plain",
        ),
        pytest.param(
            (
                b"Content-Type: text/plain\n\nHello,",
                b"Content-Type: text/html\n\n<p>the <i>order</i> 1234 never came.</p>",
                b"Content-Type: text/plain\n\nThis mail is confidential.",
            ),
            ["Hello,", "the order 1234 never came.", "confidential"],
            ["Hello,", "<i>order</i>", "confidential"],
            id="plain-html-plain",
        ),
        pytest.param(  # the alternatives still give one version each
            (ALTERNATIVE, b"Content-Type: text/plain\n\nDisclaimer <text>"),
            ["Plain body", "Disclaimer <text>"],
            ["HTML <i>body</i>", "Disclaimer &lt;text&gt;"],
            id="alternative-plain",
        ),
    ],
)
def test_consecutive_parts_of_mixed_are_one_message_in_order(
    parts: tuple[bytes, ...], text_order: list[str], html_order: list[str]
) -> None:
    text, html = text_and_html(multipart("mixed", *parts))
    assert [text.index(piece) for piece in text_order] == sorted(text.index(piece) for piece in text_order)
    assert [html.index(piece) for piece in html_order] == sorted(html.index(piece) for piece in html_order)
    assert "HTML body" not in text
    assert "Plain body" not in html
    assert "<gateway>" not in html
    assert "<text>" not in html


def test_alternatives_alone_are_still_alternatives() -> None:
    text, html = text_and_html(
        multipart(
            "alternative",
            b"Content-Type: text/plain\n\nPlain body",
            b"Content-Type: text/html\n\n<p>HTML body</p>",
        )
    )
    assert text == "Plain body"
    assert "Plain body" not in html
