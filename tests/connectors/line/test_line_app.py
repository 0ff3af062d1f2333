"""LINE through the real application: the real channel context, pipeline, SQLite store, media queue
and relay, against a local server that answers like LINE's content API."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.line.connector import SIGNATURE_HEADER, signature
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from tests.connectors.line.fake_api import FakeLine, server_error
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "line"
TOKEN, SECRET = "app-test-line-token", "app-test-line-channel-secret"
IMAGE = "534829601112233449"


def settings_for(tmp_path: Path, api_base: str) -> Settings:
    return Settings.model_validate({
        "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
        "store": {"path": str(tmp_path / "line.db"), "blob_dir": str(tmp_path / "blobs")},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"line": {
            "api_base": api_base, "data_api_base": api_base, "media_first_backoff": 0, "media_max_backoff": 0,
            "inboxes": {"support": {"channel_secret": SECRET, "channel_access_token": TOKEN}},
        }},
    })


@pytest.fixture
async def line_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeLine, str]:
    api = FakeLine(token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


async def test_an_image_failing_twice_is_then_stored_and_served(
    aiohttp_client: MakeClient, tmp_path: Path, line_api: tuple[FakeLine, str]
) -> None:
    api, base = line_api
    api.contents[IMAGE] = (b"\xff\xd8\xffline jpeg", "image/jpeg")
    api.content_errors[IMAGE] = [server_error(), server_error()]
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, base), Overrides(publisher=bus)))
    body = (FIXTURES / "image.json").read_bytes()
    headers = {SIGNATURE_HEADER: signature(SECRET.encode(), body).decode()}
    for _ in range(2):  # a redelivery
        response = await client.post("/line/support", data=body, headers=headers)
        assert response.status == 200
    [event] = await published(bus, 1)
    [media] = event["message"]["media"]
    assert media["url"] == f"http://gateway.test/media/line/support/{IMAGE}"
    path = media["url"].removeprefix("http://gateway.test")
    # As a desk does: 202 while the fetch is pending (two failures, then the bytes).
    async with asyncio.timeout(15):
        while (served := await client.get(path)).status == 202:
            await served.release()
            await asyncio.sleep(0.05)
    assert served.status == 200
    assert await served.read() == b"\xff\xd8\xffline jpeg"
    assert api.calls["content"] == 3


async def test_content_line_no_longer_has_is_a_410_marker_and_a_metric_and_the_message_is_published(
    aiohttp_client: MakeClient, tmp_path: Path, line_api: tuple[FakeLine, str]
) -> None:
    _, base = line_api  # the fake has no content for this message id: 404
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, base), Overrides(publisher=bus)))
    body = (FIXTURES / "file.json").read_bytes()
    response = await client.post("/line/support", data=body,
                                 headers={SIGNATURE_HEADER: signature(SECRET.encode(), body).decode()})
    assert response.status == 200
    [event] = await published(bus, 1)
    path = event["message"]["media"][0]["url"].removeprefix("http://gateway.test")
    async with asyncio.timeout(15):
        while (served := await client.get(path)).status == 202:
            await served.release()
            await asyncio.sleep(0.05)
    assert served.status == 410
    metrics = await (await client.get("/metrics")).text()
    counted = 'ticketgate_channel_events_total{channel="line",event="media_failed",inbox="support"} 1.0'
    assert counted in metrics
