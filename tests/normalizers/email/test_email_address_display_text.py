"""An address written only inside a display name, quoted string or comment is never an identity.

The display name is free text the sender chooses; only an addr-spec outside quotes and comments
names the mailbox. These tests hold every header that yields identities (From, and the Sender,
Reply-To and Return-Path fallbacks, To/Cc/Reply-To in ``extra``) to that.
"""

from __future__ import annotations

import base64
import random
from email.utils import getaddresses

import pytest

from normalizers.email import normalize_email
from normalizers.email.addresses import (
    _AT_MASK,
    _address_fields,
    _quote_phrases,
    parse_addresses,
    parse_sender,
)
from tests.support.mailkit import mail

PASS = {"dmarc": "pass", "header_from": "bank.example"}


@pytest.mark.parametrize(
    "value",
    [
        '"a@b"',
        '"ceo@bank.example"',
        '  "ceo@bank.example"  ',
        '"ceo@bank.example" (comment)',
        '"ceo@bank.example".tail',
        '"ceo@bank.example"" <x@y.example>',  # unbalanced quotes: the angle-addr is inside one
        'group: "ceo@bank.example";',
        "(ceo@bank.example)",
        "Name (ceo@bank.example)",
        '"Name" (ceo@bank.example)',
        '"ceo@bank.example" <>',
        "ceo@bank.example <>",
    ],
)
def test_an_address_only_in_display_text_gives_no_sender(value: str) -> None:
    sender = parse_sender([value])
    assert sender.address is None
    assert "no_valid_address" in sender.flags


@pytest.mark.parametrize(
    "value",
    ['"ceo@bank.example"', "Name (ceo@bank.example)", 'group: "ceo@bank.example";'],
)
def test_the_address_in_display_text_is_flagged(value: str) -> None:
    assert "display_name_contains_address" in parse_sender([value]).flags


@pytest.mark.parametrize(
    ("value", "address", "name"),
    [
        ('"support@bank.example" <evil@x.example>', "evil@x.example", "support@bank.example"),
        ("support@bank.example <evil@x.example>", "evil@x.example", "support@bank.example"),
        ("(support@bank.example) <evil@x.example>", "evil@x.example", "(support@bank.example)"),
        ('"a@b" <evil@x.example>', "evil@x.example", "a@b"),
        ("evil@x.example (support@bank.example)", "evil@x.example", "support@bank.example"),
        ('"support@bank.example" evil@x.example', None, None),  # not a mailbox at all
    ],
)
def test_the_angle_addr_or_bare_addr_spec_is_the_only_address(
    value: str, address: str | None, name: str | None
) -> None:
    sender = parse_sender([value])
    assert (sender.address, sender.name) == (address, name)


@pytest.mark.parametrize(
    ("value", "address", "name"),
    [
        ("a@b.example", "a@b.example", None),
        ("<a@b.example>", "a@b.example", None),
        ("Name <a@b.example>", "a@b.example", "Name"),
        ('"Doe, John" <a@b.example>', "a@b.example", "Doe, John"),
        ('"O\'Brien \\"Bob\\"" <a@b.example>', "a@b.example", 'O\'Brien "Bob"'),
        ("a@b.example (comment)", "a@b.example", "comment"),
        ("a@b.example (nested (comment))", "a@b.example", "nested comment"),
        ("=?utf-8?q?J=C3=B6rg?= <j@x.example>", "j@x.example", "Jörg"),
        ("Jöhn <John@XN--MCHINE-BUA.Example>", "John@mächine.example", "Jöhn"),
        ("Jörg <jörg@bücher.example>", "jörg@bücher.example", "Jörg"),
        (
            "MAILER-DAEMON (Mail Delivery System) <m@x.example>",
            "m@x.example",
            "MAILER-DAEMON (Mail Delivery System)",
        ),
    ],
)
def test_legitimate_forms_keep_working(value: str, address: str, name: str | None) -> None:
    raw = value.encode().decode("latin-1")  # as headers.raw_values hands 8-bit headers over
    sender = parse_sender([raw])
    assert (sender.address, sender.name) == (address, name)
    assert "display_name_contains_address" not in sender.flags


def test_an_encoded_word_in_a_quoted_name_stays_a_name() -> None:
    word = f"=?utf-8?b?{base64.b64encode(b'ceo@bank.example').decode()}?="
    assert parse_sender([f'"{word}"']).address is None
    sender = parse_sender([f'"{word}" <evil@x.example>'])
    assert (sender.address, sender.name) == ("evil@x.example", "ceo@bank.example")


def test_quoted_from_gives_no_identity_and_the_usual_fallback() -> None:
    # No usable From: like any other, the mail is accepted and the identity (if any) comes from
    # Sender/Reply-To/Return-Path as a claim, flagged from_fallback.
    message = normalize_email(mail('From: "ceo@bank.example"\nSubject: x', authentication=PASS))[0]
    assert message.identities == ()
    assert message.display_name is None
    assert message.extra["sender_flags"] == [
        "display_name_contains_address",
        "no_valid_address",
        "no_usable_sender",
    ]
    message = normalize_email(
        mail('From: "ceo@bank.example"\nReply-To: r@other.example\nSubject: x', authentication=PASS)
    )[0]
    assert [(i.value, i.verified) for i in message.identities] == [("r@other.example", False)]
    assert "from_fallback" in message.extra["sender_flags"]


def test_display_name_spoof_yields_only_the_real_address() -> None:
    message = normalize_email(mail('From: "ceo@bank.example" <evil@x.example>\nSubject: x'))[0]
    assert [i.value for i in message.identities] == ["evil@x.example"]


@pytest.mark.parametrize("header", ["Sender", "Reply-To", "Return-Path"])
def test_fallback_headers_ignore_addresses_in_display_text(header: str) -> None:
    message = normalize_email(mail(f'From: "x" <>\n{header}: "ceo@bank.example"\nSubject: x'))[0]
    assert message.identities == ()
    message = normalize_email(mail(f'From: "x" <>\n{header}: "ceo@bank.example" <r@x.example>\nSubject: x'))[
        0
    ]
    assert [i.value for i in message.identities] == ["r@x.example"]


def test_envelope_sender_in_quotes_is_no_identity() -> None:
    message = normalize_email(mail('From: "x" <>\nSubject: x', mail_from='"ceo@bank.example"'))[0]
    assert message.identities == ()


def test_recipient_lists_ignore_addresses_in_display_text() -> None:
    message = normalize_email(
        mail(
            'From: a@b.example\nTo: "x@y.example", real@y.example (x@z.example)\n'
            'Cc: "c@d.example" <cc@d.example>\nReply-To: "r@other.example"\nSubject: x'
        )
    )[0]
    assert message.extra["to"] == ["real@y.example"]
    assert message.extra["cc"] == ["cc@d.example"]
    assert "reply_to" not in message.extra


def test_quotes_opened_in_one_header_continue_into_the_next() -> None:
    # getaddresses reads several headers as one list joined by ", ", so a quote left open in the
    # first From swallows the second: the second's address is inside it.
    assert parse_sender(['"', 'x": "ceo@bank.example";']).address is None
    assert parse_addresses(['"', 'x": "ceo@bank.example";']) == []


# --- the mask changes nothing but the "@" in quoted strings, comments and literals ---------------


def test_parsing_is_getaddresses_but_for_the_masked_at_signs() -> None:
    rng = random.Random(20240101)
    alphabet = ['"', "(", ")", "[", "]", "\\", "@", "<", ">", ",", ":", ";", ".", " ", "\t", "a", "b", "é"]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        got = [(name, address.replace(_AT_MASK, "@")) for name, address in _address_fields([text])]
        assert got == getaddresses([_quote_phrases(text)]), text


def test_a_mask_character_in_the_header_is_not_taken_for_an_at_sign() -> None:
    assert parse_sender([f'"ceo{_AT_MASK}bank.example" <evil@x.example>']).name == "ceo\x1abank.example"


BOB = "bob@customer.example"
REPLY_TO = "r@customer.example"
ENCODED_FROM = f"From: =?utf-8?b?{base64.b64encode(b'ceo@bank.example').decode()}?="


@pytest.mark.parametrize(
    ("headers", "meta", "identity", "source"),
    [
        # No From at all, or only an encoded word where the address should be (rightly not trusted).
        ("Subject: x", {"mail_from": BOB}, BOB, "mail_from"),
        (f"{ENCODED_FROM}\nSubject: x", {"mail_from": BOB}, BOB, "mail_from"),
        (f"{ENCODED_FROM}\nReply-To: {REPLY_TO}", {"mail_from": ""}, REPLY_TO, "reply_to"),
        (f"{ENCODED_FROM}\nSender: s@customer.example", {}, "s@customer.example", "sender"),
        # Read from a mailbox (IMAP): Return-Path is what the delivering MTA wrote, the envelope sender.
        (f"Return-Path: <rp@customer.example>\n{ENCODED_FROM}", {}, "rp@customer.example", "return_path"),
        ("From: a@customer.example", {"mail_from": BOB}, "a@customer.example", "from"),
    ],
)
def test_no_usable_from_takes_a_claimed_identity_and_says_where_from(
    headers: str, meta: dict[str, object], identity: str, source: str
) -> None:
    message = normalize_email(mail(headers, **meta, authentication=PASS))[0]
    # Never verified: the verdict is for bank.example, and a fallback is a claim whatever it says.
    assert [(i.value, i.verified) for i in message.identities] == [(identity, False)]
    assert message.extra.get("sender_source", "from") == source
    assert ("from_fallback" in message.extra.get("sender_flags", [])) is (source != "from")


@pytest.mark.parametrize(
    "meta",
    [
        {"mail_from": ""},  # a null reverse path: no sender to take
        {"mail_from": "not an address"},
        {"mail_from": "=?utf-8?b?Ym9iQGN1c3RvbWVyLmV4YW1wbGU=?="},
    ],
)
def test_no_usable_sender_anywhere_is_flagged(meta: dict[str, object]) -> None:
    # Received over SMTP, a Return-Path header is the sender's own claim about the envelope (the
    # final MTA writes it, and that is us): the envelope itself is what counts.
    message = normalize_email(mail(f"Return-Path: <forged@evil.example>\n{ENCODED_FROM}", **meta))[0]
    assert message.identities == ()
    assert "sender_source" not in message.extra
    assert message.extra["sender_flags"][-1] == "no_usable_sender"
