"""Identity normalisation and text folding."""

from __future__ import annotations

import pytest

from core.model import Identity
from dedupe.identities import normalize, normalize_all, normalize_email, normalize_phone
from dedupe.similarity import is_duplicate, normalize_text


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("Ada.Lovelace@Example.COM", "ada.lovelace@example.com"),
        ("<ada@example.com>", "ada@example.com"),
        ("ada@xn--bcher-kva.de", "ada@bücher.de"),
        ("Ada@BÜCHER.de.", "ada@bücher.de"),
        ("ada+shop@example.com", "ada+shop@example.com"),
        ("not-an-address", None),
    ],
)
def test_email(given: str, expected: str | None) -> None:
    assert normalize_email(given) == expected


@pytest.mark.parametrize(
    ("given", "region", "expected"),
    [
        ("+41 79 123 45 67", None, "+41791234567"),
        ("0041791234567", None, "+41791234567"),
        ("079 123 45 67", "CH", "+41791234567"),
        ("8613800138000", None, "+8613800138000"),
        ("12", None, None),
        ("call me", None, None),
    ],
)
def test_phone(given: str, region: str | None, expected: str | None) -> None:
    assert normalize_phone(given, region) == expected


def test_whatsapp_id_is_also_a_phone_with_the_same_verification() -> None:
    assert normalize(Identity(kind="whatsapp", value="41791234567", verified=True)) == [
        Identity(kind="whatsapp", value="41791234567", verified=True),
        Identity(kind="phone", value="+41791234567", verified=True),
    ]


def test_normalize_all_dedupes_and_prefers_verified() -> None:
    found = normalize_all(
        [
            Identity(kind="email", value="ADA@example.com"),
            Identity(kind="email", value="ada@example.com", verified=True),
            Identity(kind="slack", value="t1:u1 "),
            Identity(kind="phone", value="garbage"),
        ]
    )
    assert found == [
        Identity(kind="email", value="ada@example.com", verified=True),
        Identity(kind="slack", value="T1:U1"),
    ]


def test_text_folding_handles_punctuation_case_and_cjk() -> None:
    assert normalize_text("  Hello,   WORLD!!\n") == "hello world"
    # The ASCII path folds as the general one does: underscores and controls are separators.
    assert normalize_text("snake_case\tTAB\x00nul #42") == "snake case tab nul 42"
    assert normalize_text("Straße_STRASSE") == "strasse strasse"
    assert normalize_text("我的订单没到！") == "我 的 订 单 没 到"
    assert normalize_text("ｆｕｌｌｗｉｄｔｈ") == "fullwidth"


def test_duplicates_need_similar_and_long_enough_text() -> None:
    a = normalize_text("我的订单1234还没有到，请帮我查一下物流")
    b = normalize_text("我的订单 1234 还没有到。请帮我查一下物流！")
    c = normalize_text("我想退货，订单5678的尺码不对，怎么办")
    assert is_duplicate(a, b, 90)
    assert not is_duplicate(a, c, 90)
    assert not is_duplicate("ok thanks", "ok thanks", 90)
    # A message that contains the first plus a new problem is not the same content.
    short = normalize_text("My order 1234 is late")
    longer = normalize_text("My order 1234 is late, and my refund for order 99 never arrived either")
    assert not is_duplicate(short, longer, 90)
