"""line-bot-sdk-python's webhook set and signature vectors through the LINE channel (skipped when
the shared corpora are absent): every SDK assertion agrees, every vector is judged as the SDK
judges it, and a tampered delivery is refused by the real handler before anything parses it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bench.conformance_line import run
from connectors.line import LineConnector
from connectors.line.connector import SIGNATURE_HEADER
from core.settings import Settings
from tests.connectors.line.fake_api import SenderContext
from tests.support.corpora import CORPORA

CORPUS = CORPORA / "line_bot_sdk_python"
pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"no LINE corpus at {CORPUS}")
Client = TestClient[web.Request, web.Application]


def test_every_sdk_assertion_agrees_and_every_vector_is_judged_right() -> None:
    report = run(CORPORA)
    assert report.disagreements == []
    assert report.compared >= 300
    assert report.agreed == report.compared
    assert set(report.signatures) == {"vectors agree", "tampered body refused", "tampered signature refused"}
    for counts in report.batches.values():
        assert counts["events"] == counts["messages"] + counts["kind=event"] + counts["not tickets"]


async def test_the_vectors_through_the_handler_and_nothing_tampered_is_parsed(
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    vectors = json.loads((CORPUS / "signature_vectors.json").read_text(encoding="utf-8"))["vectors"]
    secret = vectors[0]["channel_secret"]
    settings = Settings.model_validate({
        "tenants": {"acme": {}}, "inboxes": {"sdk": {"tenant": "acme"}},
        "channels": {"line": {"inboxes": {"sdk": {"channel_secret": secret, "fetch_media": False}}}},
    })
    async with aiohttp.ClientSession() as session:
        ctx = SenderContext(settings=settings, session=session, channel="line")
        connector = LineConnector.from_settings(settings)
        assert connector is not None
        connector.setup(ctx)
        client = await aiohttp_client(ctx.app)
        for vector in vectors:
            body, offered = vector["raw_body"].encode(), vector["expected_signature"]
            response = await client.post("/line/sdk", data=body, headers={SIGNATURE_HEADER: offered})
            if vector["expect"] == "valid":
                # Signed right; "bodybodybodybody" is no webhook object, so the normalizer refuses it.
                assert response.status == 400
                assert ctx.ingests == 1
                headers = {SIGNATURE_HEADER: offered}
                tampered = await client.post("/line/sdk", data=body + b" ", headers=headers)
                assert tampered.status == 401
            else:
                assert response.status == 401
        assert ctx.ingests == 1  # only the valid vector reached the pipeline
