"""Every signing vector and event payload of the slackapi corpus through the channel
(``bench/conformance_slack.py``); skipped when the corpus is absent."""

from __future__ import annotations

import pytest

from bench.conformance_slack import run
from tests.support.corpora import CORPORA


@pytest.mark.skipif(not (CORPORA / "slackapi").is_dir(), reason="no slackapi corpus beside the checkout")
async def test_the_channel_agrees_with_every_vector_and_payload() -> None:
    report = await run(CORPORA)
    assert report.disagreements == []
    assert report.total["signing vector"] == 3
    assert report.total["url_verification"] == 2
    # Every payload was also sent forged and stale first, and refused.
    payloads = sum(n for category, n in report.total.items()
                   if category not in ("signing vector", "forged/stale refused"))
    assert report.total["forged/stale refused"] == payloads >= 50
