"""Extraction and routing enrichment: default extractors on real-looking text, rules as configured."""

from __future__ import annotations

import functools
import random
import re
import unicodedata
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import phonenumbers
import pytest

from core.model import CanonicalMessage, Entity, Identity, Routing
from core.settings import ExtractorSettings, Settings
from gateway.enrich import DEFAULT_EXTRACTORS, MAX_ENTITIES, MAX_SCAN_CHARS, Enricher
from normalizers.content import finish
from tests.support.corpora import email_corpus_mails

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def message(text: str, *, subject: str | None = None, **fields: Any) -> CanonicalMessage:
    base: dict[str, Any] = {
        "channel": "form", "tenant": "acme", "inbox": "support", "external_id": None,
        "received_at": datetime(2026, 11, 22, tzinfo=UTC), "subject": subject, "text": text,
    }
    return CanonicalMessage(**{**base, **fields})


def entities(text: str, **settings: Any) -> list[tuple[str, str]]:
    enricher = Enricher.from_settings(Settings.model_validate(settings))
    return [(e.kind, e.value) for e in enricher.enrich(message(text)).entities]


@pytest.mark.parametrize(("text", "expected"), [
    ("我的订单号：123456789012345678 还没发货", [("order_number", "123456789012345678")]),
    ("订单编号 1234567890123456789", [("order_number", "1234567890123456789")]),
    ("Order no. 123456789012345678 please", [("order_number", "123456789012345678")]),
    ("where is #12345?", [("order_number", "12345")]),
    ("Order 98765 arrived broken", [("order_number", "98765")]),
    ("UPS 1Z999AA10123456784 stuck", [("tracking_number", "1Z999AA10123456784")]),
    ("顺丰单号SF123456789012", [("tracking_number", "SF123456789012")]),
    ("EMS EA123456789CN 未到", [("tracking_number", "EA123456789CN")]),
    ("京东物流 JDVA12345678901", [("tracking_number", "JDVA12345678901")]),
    ("圆通 YT1234567890123", [("tracking_number", "YT1234567890123")]),
    ("中通快递单号：73100012345678", [("tracking_number", "73100012345678")]),
    ("请回电 138 0013 8000", [("phone", "+8613800138000")]),
    ("call me at +1 415-555-2671", [("phone", "+14155552671")]),
    # Keywords in any letter case; a keyword inside a longer word is no keyword.
    ("ORDER NO. 123456789012345678", [("order_number", "123456789012345678")]),
    ("oRdEr ab-12345 late", [("order_number", "ab-12345")]),
    ("reorder 98765", []),
    ("TRACKING NUMBER: ab1234567890", [("tracking_number", "ab1234567890")]),
    ("Tracking no.1234567890 / tracking# 2234567890", [
        ("tracking_number", "1234567890"), ("tracking_number", "2234567890"),
    ]),
    ("+8613800138000 or 12+13800138000", [("phone", "+8613800138000")]),
])
def test_default_extractors(text: str, expected: list[tuple[str, str]]) -> None:
    assert entities(text) == expected


@pytest.mark.parametrize("text", [
    "身份证 110101199003074578",  # an 18-digit number without an order keyword
    "ticket [#TG-1234] again",  # a ticket reference, not an order
    "price 12345 yuan",
    "",
])
def test_no_false_positives(text: str) -> None:
    assert entities(text) == []


def test_an_order_number_is_not_also_a_phone() -> None:
    assert entities("订单号 13800138000123") == [("order_number", "13800138000123")]


def test_entities_are_deduped_bounded_and_keep_existing() -> None:
    enricher = Enricher.from_settings(Settings())
    text = " ".join(f"SF{n:012d}" for n in range(100)) + " SF000000000001"
    existing = (Entity(kind="order_number", value="given"),)
    result = enricher.enrich(message(text, entities=existing)).entities
    assert len(result) == MAX_ENTITIES
    assert result[0] == existing[0]
    assert len(set(result)) == len(result)


def test_configured_extractors_replace_the_defaults() -> None:
    settings = {"extractors": [{"kind": "ticket", "pattern": r"CASE-(?P<n>\d+)", "group": "n"}]}
    assert entities("CASE-77 and SF123456789012", **settings) == [("ticket", "77")]
    assert entities("SF123456789012", extractors=[]) == []


RULES = [
    {"name": "complaints", "keywords": ["投诉", "退款", "urgent"], "priority": "high",
     "tags": ["complaint"], "queue": "escalations"},
    {"name": "vip", "customers": ["boss@example.com", "+8613800138000"], "priority": "urgent",
     "tags": ["vip"]},
    {"name": "api-apps", "channels": ["api"], "tags": ["app"], "queue": "apps"},
    {"name": "kiosk-refunds", "inboxes": ["kiosk"], "keywords": ["refund"], "tags": ["kiosk-refund"]},
    {"name": "low", "keywords": ["newsletter"], "priority": "low", "tags": ["bulk"]},
]


def routing(text: str, **fields: Any) -> Routing:
    enricher = Enricher.from_settings(Settings.model_validate({"routing": {"rules": RULES}}))
    return enricher.enrich(message(text, **fields)).routing


def test_keyword_rules_are_case_insensitive_and_speak_chinese() -> None:
    assert routing("我要投诉") == Routing(priority="high", tags=("complaint",), queue="escalations")
    assert routing("URGENT: help") == Routing(priority="high", tags=("complaint",), queue="escalations")
    assert routing("", subject="申请退款").queue == "escalations"
    assert routing("it is uRgEnT").priority == "high"
    assert routing("urgen t").priority == "normal"


def test_highest_priority_wins_tags_union_first_queue() -> None:
    vip = (Identity(kind="email", value="Boss@Example.com"),)
    result = routing("退款 please", channel="api", identities=vip)
    assert result == Routing(priority="urgent", tags=("complaint", "vip", "app"), queue="escalations")


def test_criteria_of_one_rule_must_all_match() -> None:
    assert routing("refund", inbox="kiosk").tags == ("kiosk-refund",)
    assert routing("refund", inbox="support").tags == ()
    assert routing("hello", inbox="kiosk").tags == ()


def test_a_low_rule_can_lower_and_no_rule_keeps_the_default() -> None:
    assert routing("our newsletter").priority == "low"
    assert routing("hello") == Routing()
    preset = Routing(priority="high", tags=("x",))
    assert routing("hello", routing=preset) == preset


def test_unchanged_message_is_returned_as_is() -> None:
    original = message("hello")
    assert Enricher.from_settings(Settings()).enrich(original) is original


def test_bad_group_fails_at_start() -> None:
    settings = Settings.model_validate({"extractors": [{"kind": "x", "pattern": "a", "group": "missing"}]})
    with pytest.raises(ValueError, match="missing"):
        Enricher.from_settings(settings)


# --- `requires` and `digit_run`: the pre-checks must never hide a match ------------------------------

# Pieces that the default patterns are made of, spelled in the ways that fold oddly (Turkish dotted
# and dotless i, the Kelvin sign), in every digit script, next to noise.
_PIECES = (
    "order", "ORDER", "Order", "oRdEr", "reorder", "订单", "订单号", "订单编号", "#", "[#TG-", "1Z", "1z",
    "SF", "JD", "JDV", "JDX", "YT", "EA", "CN", "RR", "track", "TRACKING", "Tracking no.", "trackİng",
    "trackıng", "trac\u212aing", "快递单号", "运单号", "物流单号", "快递号", "单号", "中通", "圆通", "韵达",
    "申通", "百世", "极兔", "快递", "：", ":", " ", "  ", "-", "(", ")", "+", ".", "no.", "number", "是",
    "\n", "ß", "x", "Q", "AB",
)
_DIGIT_SCRIPTS = (
    "0123456789", "０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "၀၁၂၃၄၅၆၇၈၉",
)


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        if rng.random() < 0.35:
            digits = rng.choice(_DIGIT_SCRIPTS)
            parts.append("".join(rng.choice(digits) for _ in range(rng.randint(1, 20))))
        else:
            parts.append(rng.choice(_PIECES))
    return "".join(parts)


_DIGIT_RUN = re.compile(r"\d+")


def test_every_default_match_holds_what_its_extractor_requires() -> None:
    """Each match holds one of the extractor's ``requires`` and a run of its ``digit_run`` digits."""
    rng = random.Random(20261204)
    extractors = Enricher.from_settings(Settings())._extractors
    assert all(e.requires and e.digit_run for e in extractors)
    matched = set()
    for _ in range(20_000):
        text = _random_text(rng)
        for index, extractor in enumerate(extractors):
            for match in extractor.regex.finditer(text):
                matched.add(index)
                folded = match.group().casefold()
                assert any(needle in folded for needle in extractor.requires), (extractor.kind, match.group())
                longest = max(map(len, _DIGIT_RUN.findall(match.group())), default=0)
                assert longest >= extractor.digit_run, (extractor.kind, match.group())
    # The generator reaches every default extractor, so the assertions above cover each of them.
    assert matched == set(range(len(extractors)))


# The extraction as it reads, with no pre-check and no cache: every default regex over the whole text.
@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _reference(text: str) -> tuple[Entity, ...]:
    found: list[Entity] = []
    claimed: list[tuple[int, int]] = []
    for spec in DEFAULT_EXTRACTORS:
        group = spec.group or 0
        for match in _compiled(spec.pattern).finditer(text):
            start, end = match.span(group)
            if start < 0 or any(start < e and s < end for s, e in claimed):
                continue
            value: str | None = match.group(group)
            if spec.kind == "phone":
                value = _valid_phone(match.group(group))
            if not value or Entity(kind=spec.kind, value=value) in found:
                continue
            claimed.append((start, end))
            found.append(Entity(kind=spec.kind, value=value))
            if len(found) >= MAX_ENTITIES:
                return tuple(found)
    return tuple(found)


def _valid_phone(candidate: str) -> str | None:
    try:
        number = phonenumbers.parse(candidate, "CN")
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


# Shapes the extractors look for, and what sits around them in real text: phones, emails, URLs,
# CJK, letters that fold or encode oddly, lone surrogates, digits of scripts near the UTF-8 lead
# bytes the digit-run check treats specially (Arabic-Indic, NKo, Devanagari, Thai, Myanmar, Vai,
# full-width, mathematical, Adlam), and digit runs just under and over each extractor's length.
_SHAPES = (
    "+1 415-555-2671", "(021) 6234-5678", "138 0013 8000", "+44 20 7946 0958", "+٩٧١٥٠١٢٣٤٥٦٧",
    "１３８００１３８０００", "+86-138-0013-8000", "010-12345678", "jane.doe+13800138000@example.com",
    "order12345@shop.cn", "https://example.com/t?id=1Z999AA10123456784&order=12345",
    "http://t.cn/SF123456789012", "www.example.com/#12345", "Order #00001234", "order no. AB-12345",
    "订单号：", "您好，", "。", "快递单号", "中通", "tracking# ", "EA123456789CN", "JDVA", "YT", "SF",
    "1Z", "1ZABCDEFGHJKLMNPQR ", " 1 3 8 0 0 1 3 8 0 0 0 ", "é", "İ", "ı", "ß", "\u212a", "📦", "क",
    "\ud800", "\udfff", "Ж", "ا", "\n", " ", "-", "#",
)
_SCRIPTS = (
    *_DIGIT_SCRIPTS, "๐๑๒๓๔๕๖๗๘๙", "߀߁߂߃߄߅߆߇߈߉", "꘠꘡꘢꘣꘤꘥꘦꘧꘨꘩", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗", "𞥐𞥑𞥒𞥓𞥔𞥕𞥖𞥗𞥘𞥙",
)
_RUN_LENGTHS = (3, 4, 8, 9, 10, 11, 12, 13, 20)  # around every default extractor's digit_run


def _adversarial_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 10)):
        roll = rng.random()
        if roll < 0.3:
            digits = rng.choice(_SCRIPTS)
            parts.append("".join(rng.choice(digits) for _ in range(rng.choice(_RUN_LENGTHS))))
        elif roll < 0.4:
            parts.append(rng.choice(_PIECES))
        else:
            parts.append(rng.choice(_SHAPES))
    return "".join(parts)


def _fixture_texts() -> list[str]:
    """Every fixture file of every channel (mails, JSON and XML payloads, expected outputs), as text."""
    paths = sorted(path for path in FIXTURES.glob("**/*") if path.is_file())
    return [path.read_bytes().decode("utf-8", "replace") for path in paths]


def test_pre_checks_change_no_result() -> None:
    """The gated extraction finds what every regex over the whole text finds, on real and odd text.

    Raw fixtures and corpus mails (headers, base64, digits everywhere), the bodies the pipeline
    passes, texts made of extractor pieces and of the shapes above.
    """
    corpus = email_corpus_mails()
    texts = _fixture_texts() + [path.read_bytes().decode("utf-8", "replace") for path in corpus]
    texts += [_random_text(random.Random(seed)) for seed in range(2_000)]
    texts += [_adversarial_text(random.Random(seed)) for seed in range(4_000)]
    enricher = Enricher.from_settings(Settings())
    found = 0
    for text in texts:
        expected = _reference(text[:MAX_SCAN_CHARS])
        assert enricher.enrich(message(text)).entities == expected, text[:200]
        found += bool(expected)
    assert found > 1_000


def test_pre_checks_change_no_result_with_a_subject() -> None:
    """What the pipeline passes: subject and text joined, as the API and mail connectors fill them."""
    enricher = Enricher.from_settings(Settings())
    rng = random.Random(7)
    for seed in range(1_000):
        subject, text = _adversarial_text(random.Random(seed)), _adversarial_text(rng)
        expected = _reference(f"{subject}\n{text}")
        assert enricher.enrich(message(text, subject=subject)).entities == expected, (subject, text)


def test_a_run_of_any_decimal_digits_passes_the_digit_check() -> None:
    """Every character `\\d` matches counts towards a run, whatever its script and neighbours."""
    decimals = [chr(c) for c in range(0x80, 0x110000) if chr(c).isdecimal()]
    assert len(decimals) > 600
    spec = {"kind": "n", "pattern": r"(?<!\d)\d{3}(?!\d)"}
    gated = Enricher.from_settings(Settings.model_validate({"extractors": [{**spec, "digit_run": 3}]}))
    for digit in decimals:
        for text in (digit * 3, f"中{digit * 3}，", f"é{digit}{digit}{digit}\U0001f4e6", f"{digit}1{digit}"):
            found = [e.value for e in gated.enrich(message(text)).entities]
            assert found == [text.strip("中，é\U0001f4e6")], (unicodedata.name(digit), text)


def test_digit_run_gates_the_pattern() -> None:
    spec = {"kind": "ticket", "pattern": r"CASE-(?P<n>\d+)", "group": "n"}
    both = [("ticket", "77"), ("ticket", "1234")]
    assert entities("CASE-77 CASE-1234", extractors=[{**spec, "digit_run": 2}]) == both
    # The longest run decides, wherever it is in the text.
    assert entities("CASE-7 and 1234", extractors=[{**spec, "digit_run": 4}]) == [("ticket", "7")]
    # A wrong bound is the operator's mistake, and it does hide the match: proof it is consulted.
    assert entities("CASE-77", extractors=[{**spec, "digit_run": 3}]) == []
    with pytest.raises(ValueError, match="digit_run"):
        ExtractorSettings.model_validate({**spec, "digit_run": -1})


def test_phone_numbers_in_full_width_and_arabic_indic_digits() -> None:
    assert entities("请回电 １３８ ００１３ ８０００") == [("phone", "+8613800138000")]
    assert entities("اتصل على +٩٧١٥٠١٢٣٤٥٦٧") == [("phone", "+971501234567")]


def test_configured_requires_gates_the_pattern_case_insensitively() -> None:
    spec = {"kind": "ticket", "pattern": r"CASE-(?P<n>\d+)", "group": "n"}
    assert entities("CASE-77", extractors=[{**spec, "requires": ["case-"]}]) == [("ticket", "77")]
    # A wrong pre-check is the operator's mistake, and it does hide the match: proof it is consulted.
    assert entities("CASE-77", extractors=[{**spec, "requires": ["nope"]}]) == []
    with pytest.raises(ValueError, match="requires"):
        Settings.model_validate({"extractors": [{**spec, "requires": [""]}]})


@pytest.mark.parametrize("fields", [
    # HTML only: the text the finishing step reads out of the HTML is what gets scanned.
    {"text": None, "html": "<p>Where is order 98765? <b>urgent</b></p>"},
    {"text": "Order #100123 late; tracking SF12345678901", "subject": "Where is my parcel?"},
    {"text": "hello", "html": "<b>hi</b>", "language": "de"},
    {"text": "nothing to find here at all"},
    {"text": "订单号：123456789012345678", "entities": (Entity(kind="order_number", value="1"),)},
])
def test_finishing_and_enriching_in_one_step_is_finishing_then_enriching(fields: dict[str, Any]) -> None:
    enricher = Enricher.from_settings(Settings.model_validate({"routing": {"rules": RULES}}))
    original = message(**fields)
    assert enricher.finish_and_enrich(original) == enricher.enrich(finish(original))
