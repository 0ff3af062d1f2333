"""The X samples through the X channel (skipped when the shared corpora are absent): the CRC vector,
Zammad's real Account Activity deliveries field by field, and signatures through the real handler."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from bench.conformance_x import SAMPLES, run
from connectors.x import XConnector
from connectors.x.connector import SIGNATURE_HEADER, signature
from core.settings import Settings
from tests.connectors.line.fake_api import SenderContext
from tests.support.corpora import CORPORA

GIST = CORPORA / "twitterdev_gist"
pytestmark = pytest.mark.skipif(
    not (CORPORA / SAMPLES).is_dir() or not GIST.is_dir(), reason=f"no X samples under {CORPORA}"
)
Client = TestClient[web.Request, web.Application]


def test_every_sample_field_and_the_crc_vector_agree() -> None:
    report = run(CORPORA)
    assert report.disagreements == []
    assert report.agreed == report.compared >= 60
    assert set(report.crc) == {"response_token agrees", "json body agrees"}
    assert all("ACCEPTED" not in k and "REFUSED" not in k for k in report.signatures)


async def test_the_samples_through_the_handler(aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    vector = json.loads((GIST / "crc_vectors.json").read_text(encoding="utf-8"))["vectors"][0]
    secret = vector["consumer_secret"]
    settings = Settings.model_validate({
        "tenants": {"acme": {}}, "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"x": {"apps": {"zammad": {"consumer_secret": secret, "accounts": {
            "2975699229": {"inbox": "support", "fetch_media": False}}}}}},
    })
    async with aiohttp.ClientSession() as session:
        ctx = SenderContext(settings=settings, session=session, channel="x")
        connector = XConnector.from_settings(settings)
        assert connector is not None
        connector.setup(ctx)
        client = await aiohttp_client(ctx.app)
        crc = await client.get("/x/zammad", params={"crc_token": vector["crc_token"]})
        assert await crc.json() == json.loads(vector["expected_json_body"])
        samples = sorted((CORPORA / SAMPLES).glob("*.json"))
        for path in samples:
            body = path.read_bytes()
            signed = signature(secret.encode(), body).decode()
            forged = await client.post("/x/zammad", data=body + b" ", headers={SIGNATURE_HEADER: signed})
            assert forged.status == 401
            response = await client.post("/x/zammad", data=body, headers={SIGNATURE_HEADER: signed})
            assert response.status == 200, path.name
        assert ctx.ingests == len(samples)  # every signed one, no forged one
        assert len(ctx.events) == 4  # the four incoming DMs
