"""Extraction and routing enrichment: default extractors on real-looking text, rules as configured."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.model import CanonicalMessage, Entity, Identity, Routing
from core.settings import Settings
from gateway.enrich import MAX_ENTITIES, Enricher
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


# --- `requires`: the substring pre-check must never hide a match ------------------------------------

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


def test_every_default_match_holds_one_of_what_its_extractor_requires() -> None:
    rng = random.Random(20261204)
    extractors = Enricher.from_settings(Settings())._extractors
    assert all(e.requires for e in extractors)
    matched = set()
    for _ in range(20_000):
        text = _random_text(rng)
        for index, extractor in enumerate(extractors):
            for match in extractor.regex.finditer(text):
                matched.add(index)
                folded = match.group().casefold()
                assert any(needle in folded for needle in extractor.requires), (extractor.kind, match.group())
    # The generator reaches every default extractor, so the assertion above covers each of them.
    assert matched == set(range(len(extractors)))


def _without_requires(settings: Settings) -> Enricher:
    from gateway.enrich import DEFAULT_EXTRACTORS

    plain = [spec.model_copy(update={"requires": ()}) for spec in DEFAULT_EXTRACTORS]
    return Enricher(plain, settings.routing.rules)


def test_the_pre_check_changes_no_result_on_real_mail() -> None:
    """Every fixture and corpus mail, raw (headers, base64, digits everywhere): same entities."""
    texts = [path.read_bytes().decode("utf-8", "replace") for path in sorted(FIXTURES.glob("**/*.eml"))]
    texts += [path.read_bytes().decode("utf-8", "replace") for path in email_corpus_mails()]
    texts += [_random_text(random.Random(seed)) for seed in range(2_000)]
    gated, plain = Enricher.from_settings(Settings()), _without_requires(Settings())
    found = 0
    for text in texts:
        expected = plain.enrich(message(text)).entities
        assert gated.enrich(message(text)).entities == expected, text[:200]
        found += bool(expected)
    assert found > 100


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
