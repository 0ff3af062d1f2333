"""The step every channel's message goes through after its normalizer (normalizers/content.py)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from core.model import CanonicalMessage
from normalizers.content import decode_base64, finish


def message(**fields: str | None) -> CanonicalMessage:
    return CanonicalMessage(
        channel="any", tenant="t", inbox="i", external_id="1", received_at=datetime(2026, 1, 1, tzinfo=UTC),
        **fields,  # type: ignore[arg-type]
    )


def test_html_is_sanitized_and_gives_the_text() -> None:
    done = finish(message(html='<p onclick="x()">订单<script>steal()</script> 还没到</p>'))
    assert done.html == "<p>订单 还没到</p>"
    assert done.text == "订单 还没到"
    assert done.language == "zh"


def test_what_the_normalizer_set_is_kept() -> None:
    done = finish(message(text="hello", html="<b>hi</b>", language="de"))
    assert (done.text, done.html, done.language) == ("hello", "<b>hi</b>", "de")
    plain = message(text="12345")
    assert finish(plain) is plain  # nothing to do: the same object


@pytest.mark.parametrize("data", [b"", b"a", b"ab", b"abc", bytes(range(256))])
def test_canonical_base64_decodes(data: bytes) -> None:
    assert decode_base64(base64.b64encode(data).decode()) == data


@pytest.mark.parametrize("value", ["YWJj=", "YWJj====", "YR==", "YQ", "YQ=", "YW Jj", "YWJj\n", "YW_j", "ä"])
def test_anything_else_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64(value)
