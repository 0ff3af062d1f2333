"""The normalizer's shortcuts for common mail give what the general path gives.

Each shortcut (header-block-only parsing of single-part mail, boundary search with ``bytes.find``,
the first-character filter of reply extraction, byte counting in the language guess, cached
address parsing) is checked against the general computation on inputs chosen to sit on the edge
of the shortcut: odd line ends, case folding, non-ASCII text, headers that end early.
"""

from __future__ import annotations

from email.message import Message
from email.parser import BytesParser, Parser
from email.policy import compat32
from pathlib import Path

import pytest

from core.errors import NormalizationError
from normalizers.email.addresses import parse_addresses, parse_sender
from normalizers.email.parse import (
    _BOUNDARY_OR_DELIMITER,
    EmailLimits,
    _boundaries_and_delimiters,
    _charset_param,
    _content_charset,
    _parse,
    _parse_header_block,
    _prescan,
)
from normalizers.email.reply import extract_reply
from normalizers.language import detect as _language
from tests.support.corpora import email_corpus_mails

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "email"


def _shape(message: Message) -> tuple[object, ...]:
    return (
        message.get_unixfrom(),
        list(message.raw_items()),
        message.is_multipart(),
        None if message.is_multipart() else message.get_payload(),
        [type(d).__name__ for d in message.defects],
        message.get_content_type(),
        _flat(message),
    )


def _flat(message: Message) -> bytes | str:
    try:
        return message.as_bytes(policy=compat32.clone(max_line_length=0))
    except Exception as exc:  # the same failure either way counts as the same result
        return repr(exc)


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@example.com\r\nSubject: hi\r\n\r\nbody\r\nline two\r\n",
        b"From: a@example.com\nSubject: hi\n\nbody\n\n\nmore\n",
        b"From: a@example.com\r\n\r\n",  # no body at all
        b"From: a@example.com\r\nSubject: no blank line",
        b"From: a@example.com\rSubject: lone CR\r\rbody\r\n\r\nrest",
        b"From: a@example.com\r\ngarbage line\r\nSubject: x\r\n\r\nbody",  # headers end early
        b"From: a@example.com\x0bX: vertical tab\r\n\r\nbody",  # str.splitlines breaks here
        b"From: a@example.com\r\n folded\r\n\r\n8-bit \xe9\xff body\r\n",
        b"From nobody Mon Jan 1 00:00:00 2024\nFrom: a@example.com\n\nmbox body\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\npart\r\n--x--\r\n",
        b"Content-Type: message/rfc822\r\n\r\nFrom: inner@example.com\r\n\r\ninner\r\n",
        b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\nAction: failed\r\n",
        b"Content-Type: text/plain\r\n\r\n\r\n\r\nbody after blank lines",
        b"\r\n\r\nno headers at all",
    ],
)
def test_parse_is_the_full_parse(raw: bytes) -> None:
    assert _shape(_parse(raw)) == _shape(BytesParser(policy=compat32).parsebytes(raw))


def _headers_only(head: str) -> Message:
    return Parser(policy=compat32).parsestr(head, headersonly=True)


@pytest.mark.parametrize(
    ("head", "read_here"),
    [
        ("From: a@example.com\r\nSubject: hi\r\n\r\n", True),
        ("Subject:no space\r\nX-Empty:\r\nX-Spaces:   \t  \r\nTo: b@x\r\n\r\n", True),
        ("Subject: folded\r\n  once\r\n\tand twice \r\nX: y\r\n\r\n", True),
        ("Subject: =?utf-8?q?x?=\r\nX-8bit: caf\udce9\r\nX-Ctl: a\x00b\x0bc\x7f\r\n\r\n", True),
        ("Subject: a: b: c\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n", True),
        # Read by the stdlib parser: an envelope line, a leading colon or continuation, a space
        # before the colon, a name that is not ASCII, lone line ends, no blank line at the end.
        ("From nobody Mon Jan 1 00:00:00 2024\r\nFrom: a@x\r\n\r\n", False),
        (": no name\r\nSubject: x\r\n\r\n", False),
        (" continued first\r\nSubject: x\r\n\r\n", False),
        ("Subject : spaced\r\n\r\n", False),
        ("Sub\udce9ject: x\r\n\r\n", False),
        ("Subject: x\rX: lone CR\r\n\r\n", False),
        ("Subject: x\nX: lone LF\r\n\r\n", False),
        ("Subject: x\r\n", False),
        ("\r\n\r\n", False),
    ],
)
def test_header_block_is_read_as_the_stdlib_reads_it(head: str, read_here: bool) -> None:
    message = _parse_header_block(head)
    assert (message is not None) == read_here
    if message is not None:
        assert vars(message) == vars(_headers_only(head))


def test_every_corpus_and_fixture_header_block_reads_as_the_stdlib_reads_it() -> None:
    mails = [*email_corpus_mails(), *sorted(FIXTURES.glob("*.eml"))]
    read_here = 0
    for path in mails:
        raw = path.read_bytes()
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            continue
        head = raw[: end + 4].decode("ascii", "surrogateescape")
        message = _parse_header_block(head)
        if message is not None:
            read_here += 1
            assert vars(message) == vars(_headers_only(head)), path.name
    assert read_here >= 10


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"plain text without any",
        b"--starts with a delimiter\r\nx\r\n",
        b'Content-Type: multipart/mixed; BOUNDARY="a b"\r\n\r\n--a b\r\n--a b--\r\n',
        b"Content-Type: multipart/mixed;\r\n boundary=x\r\n\r\n--x\r\n--x--\r\n",
        b"boundaryboundary=x\n--x\n",
        b"a boundary in prose, without an equals sign\n--\n----\n",
        b"\n--" + b"y" * 300 + b"\n",  # longer than the delimiter group allows
    ],
)
def test_boundary_search_matches_the_pattern_everywhere(raw: bytes) -> None:
    def spans(matches: object) -> list[tuple[tuple[int, int], tuple[bytes | None, ...]]]:
        return [(m.span(), m.groups()) for m in matches]  # type: ignore[attr-defined]

    assert spans(_boundaries_and_delimiters(raw)) == spans(_BOUNDARY_OR_DELIMITER.finditer(raw))


def test_prescan_still_refuses_deep_nesting_with_upper_case_boundaries() -> None:
    raw = b"".join(
        f'Content-Type: multipart/mixed; BOUNDARY="b{i}"\r\n\r\n--b{i}\r\n'.encode() for i in range(40)
    )
    with pytest.raises(NormalizationError, match="nesting deeper"):
        _prescan(raw, EmailLimits(max_depth=32))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Leading whitespace and NBSP before a marker, markers in other cases.
        ("New.\n \u00a0 On Mon, Bob <b@x.com> wrote:\n> old", "New."),
        ("New.\nON MON, BOB <B@X.COM> WROTE:\nold", "New."),
        # Python's IGNORECASE folds the long s to s: the filter must not skip such a line.
        ("New.\n\u017fent from my phone", "New."),
        ("New.\n\t*From:* Bob\n*Sent:* Monday\nold", "New."),
        ("New.\n2024年1月8日 10:00，x <x@gmail.com> 写道：\nold", "New."),
        # Lines starting with digits: only four of them can start the dated marker (any script).
        ("New.\n\uff12\uff10\uff12\uff14年1月8日 10:00，x <x@gmail.com> 写道：\nold", "New."),
        ("12 Main St\n123 wrote:\n1XXXX", "12 Main St\n123 wrote:\n1XXXX"),
        # Lines that look like nothing keep the text whole; trailing spaces go, blank runs shrink.
        ("Hello   \n\n\n\nthere\t\nBye", "Hello\n\nthere\nBye"),
        ("  > quoted\nkept\n>also quoted", "kept"),
        ("line\rwith\r\nmixed ends", "line\nwith\nmixed ends"),
        ("   \n\t\n", None),
    ],
)
def test_reply_extraction_edge_cases(text: str, expected: str | None) -> None:
    assert extract_reply(text) == expected


@pytest.mark.parametrize(
    ("text", "language"),
    [
        ("Thank you — the café order, please check it for me and my wife’s parcel", "en"),
        ("Hello\u00a0there, could you please\u2028check the status of my order", "en"),
        ("Kelvin \u212a is not an English word at all, but this is the order", "en"),
        ("Grüß Gott, könnten Sie bitte meine Bestellung prüfen", None),
        ("订单 order 请问 what 什么时候 发货", "zh"),
        ("", None),
    ],
)
def test_language_guess_on_mixed_text(text: str, language: str | None) -> None:
    assert _language(text) == language


def test_cached_addresses_are_fresh_lists_and_depend_on_the_hint() -> None:
    first = parse_addresses(["Support <support@Example.COM>"])
    first.clear()
    assert [a.address for a in parse_addresses(["Support <support@Example.COM>"])] == ["support@example.com"]
    # The same raw 8-bit name reads differently with another charset from the body.
    raw = "\u00c4\u00e3 <a@example.com>"  # "Ää" as raw bytes C4 E3 in a compat32 value
    assert parse_sender([raw], hint="gb18030").name == "你"
    assert parse_sender([raw], hint="big5").name != "你"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain; charset=UTF-8",
        'text/plain; charset="ISO-8859-1"',
        "text/plain; charset=",
        "text/plain; charset",
        "text/plain; charset*=utf-8''ISO-8859-1",
        "text/plain; charset*=x-unknown''latin1",
        "text/plain; charset*=utf-8''caf%C3%A9",
        "text/plain; charset=caf\udce9",
    ],
)
def test_content_charset_is_the_stdlibs(content_type: str | None) -> None:
    message = Message()
    if content_type is not None:
        message["Content-Type"] = content_type
    assert _content_charset(message.get_param("charset")) == message.get_content_charset()


def test_content_charset_is_the_stdlibs_for_every_corpus_part() -> None:
    for path in email_corpus_mails():
        for part in BytesParser(policy=compat32).parsebytes(path.read_bytes()).walk():
            assert _content_charset(part.get_param("charset")) == part.get_content_charset(), path.name


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain; charset=utf-8",
        "text/plain;charset=UTF-8",
        'text/plain; CHARSET="iso-8859-1"',
        "text/plain; charſet=utf-8",  # the long s: not "charset" to the stdlib, as to us
        "text/plain; \u212aharset=utf-8",
        "text/plain; charset=utf-8 ",
        "text/plain; charset=utf-8;",
        "text/plain; charset=utf-8; format=flowed",
        "text/plain; format=flowed; charset=utf-8",
        "text/plain;\r\n charset=utf-8",
        'text/plain; charset="utf-8',
        'text/plain; charset="a;b"',
        "text/plain; charset=",
        "text/plain; charset*=utf-8''latin1",
        "text/plain; charset=caf\udce9",
        "text/plain charset=utf-8",
        "text/pl=ain; charset=utf-8",
    ],
)
def test_charset_param_is_the_stdlibs(content_type: str | None) -> None:
    message = Message()
    if content_type is not None:
        message["Content-Type"] = content_type
    assert _charset_param(message) == message.get_param("charset")


def test_charset_param_is_the_stdlibs_for_every_corpus_part() -> None:
    for path in email_corpus_mails():
        for part in BytesParser(policy=compat32).parsebytes(path.read_bytes()).walk():
            assert _charset_param(part) == part.get_param("charset"), path.name
