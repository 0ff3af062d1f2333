"""The Mini Program's XML and JSON paths agree on every Official Account packet of the wechatpy
corpus, and its crypto vectors pass through the JSON body path (bench/conformance_miniprogram.py)."""

from __future__ import annotations

import pytest

from bench.conformance_miniprogram import CORPUS, packets, vectors


@pytest.fixture(autouse=True)
def _corpus() -> None:
    if not CORPUS.is_dir():
        pytest.skip("corpus not present")


def test_every_packet_is_the_same_message_as_xml_and_as_json() -> None:
    agreed, total, problems = packets(CORPUS)
    assert total >= 40
    assert (agreed, problems) == (total, [])


def test_the_crypto_vectors_pass_through_the_json_body_path() -> None:
    passed, count, problems = vectors(CORPUS)
    assert count >= 3
    assert (passed, problems) == (count, [])
