"""normalizers.base.storable: the one rule for text from any channel, on every field."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

import pytest

from core.errors import InvalidInput
from core.model import Attachment, CanonicalMessage, Entity, Identity, Routing
from normalizers.base import storable


class Colour(enum.StrEnum):
    RED = "red"


def message(**fields: object) -> CanonicalMessage:
    base: dict[str, object] = {
        "channel": "api",
        "tenant": "acme",
        "inbox": "app",
        "external_id": "m-1",
        "received_at": datetime(2026, 12, 5, tzinfo=UTC),
        "identities": (Identity(kind="email", value="a@example.com"),),
        "text": "hello",
    }
    return CanonicalMessage(**{**base, **fields})  # type: ignore[arg-type]


def test_a_clean_message_is_kept_as_it_is() -> None:
    clean = message(subject="Hi", entities=(Entity(kind="order_number", value="12345"),), extra={"a": [1]})
    assert storable(clean) is clean


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text": "a\x00b"}, {"text": "ab"}),
        ({"subject": "订单\x00号"}, {"subject": "订单号"}),
        ({"html": "<p>\udcff</p>"}, {"html": "<p>\\xff</p>"}),
        (
            {"entities": (Entity(kind="order_number", value="1\x002"),)},
            {"entities": (Entity(kind="order_number", value="12"),)},
        ),
        ({"routing": Routing(tags=("v\x00ip",))}, {"routing": Routing(tags=("vip",))}),
        (
            {"attachments": (Attachment(name="a\x00.txt", content_type="text/plain", data=b"\x00"),)},
            {"attachments": (Attachment(name="a.txt", content_type="text/plain", data=b"\x00"),)},
        ),
        ({"extra": {"call": {"from\x00": "x\x00y"}}}, {"extra": {"call": {"from": "xy"}}}),
        ({"references": ("<a\x00@b>",)}, {"references": ("<a@b>",)}),
    ],
)
def test_nul_and_lone_surrogates_are_cleaned_wherever_they_are(
    fields: dict[str, object], expected: dict[str, object]
) -> None:
    cleaned = storable(message(**fields))
    assert cleaned == message(**expected)


def test_a_str_subclass_becomes_plain_str() -> None:
    cleaned = storable(message(kind=Colour.RED))
    assert cleaned.kind == "red"
    assert type(cleaned.kind) is str


def test_an_identity_with_a_control_character_is_refused() -> None:
    with pytest.raises(InvalidInput, match="control characters"):
        storable(message(identities=(Identity(kind="email", value="a\x00@example.com"),)))
