"""Telegram through the real application: the real channel context, pipeline, SQLite store and relay."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from tests.connectors.telegram.context import FakeBotApi
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "telegram"
TOKEN = "7000000001:AAE-app-test-bot-token"
SECRET = "app-test-secret"
HEADER = "X-Telegram-Bot-Api-Secret-Token"
PHOTO = "AgACAgUAAxkBAAIBK2dPhotoLarge"


def settings_for(tmp_path: Path, api_base: str, **inbox: Any) -> Settings:
    return Settings.model_validate({
        "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
        "store": {"path": str(tmp_path / "tg.db"), "blob_dir": str(tmp_path / "blobs")},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"telegram": {
            "api_base": api_base, "poll_timeout": 0,
            "inboxes": {"support": {"bot_token": TOKEN, "secret_token": SECRET, **inbox}},
        }},
    })


@pytest.fixture
async def bot_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeBotApi, str]:
    api = FakeBotApi(token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


async def test_a_signed_photo_is_one_event_and_its_media_is_served(
    aiohttp_client: MakeClient, tmp_path: Path, bot_api: tuple[FakeBotApi, str]
) -> None:
    api, base = bot_api
    api.files[PHOTO] = b"\xff\xd8\xffreal jpeg"
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, base), Overrides(publisher=bus)))
    body = (FIXTURES / "photo_caption.json").read_bytes()
    forged = await client.post("/telegram/support", data=body, headers={HEADER: "not-the-secret"})
    assert forged.status == 401
    for _ in range(2):  # a redelivery
        response = await client.post("/telegram/support", data=body, headers={HEADER: SECRET})
        assert response.status == 200
    [event] = await published(bus, 1)
    assert event["message"]["text"] == "The box arrived broken"
    [media] = event["message"]["media"]
    assert media["url"].startswith("http://gateway.test/media/telegram/support/")
    path = media["url"].removeprefix("http://gateway.test")
    # As a desk does: the media URL answers 202 while the fetch is pending, then the bytes.
    async with asyncio.timeout(10):
        while (served := await client.get(path)).status == 202:
            await served.release()
            await asyncio.sleep(0.02)
    assert served.status == 200
    assert await served.read() == b"\xff\xd8\xffreal jpeg"


async def test_the_polling_offset_survives_a_restart(
    aiohttp_client: MakeClient, tmp_path: Path, bot_api: tuple[FakeBotApi, str]
) -> None:
    api, base = bot_api
    names = ("private_text.json", "voice.json")
    api.updates = [orjson.loads((FIXTURES / name).read_bytes()) for name in names]
    settings = settings_for(tmp_path, base, mode="polling", fetch_media=False)
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings, Overrides(publisher=bus)))
    await published(bus, 2)
    # The offset is advanced after the commit; the next getUpdates shows it.
    await api.wait(lambda: len(api.offsets_asked) >= 2)
    await client.close()
    asked = list(api.offsets_asked)
    assert asked[0] is None
    assert asked[-1] == api.updates[-1]["update_id"] + 1

    # Restarted on the same store: it resumes from the stored offset and publishes nothing twice.
    bus = MemoryPublisher()
    api.offsets_asked.clear()
    client = await aiohttp_client(create_app(settings, Overrides(publisher=bus)))
    await api.wait(lambda: len(api.offsets_asked) >= 2)
    await client.close()
    assert api.offsets_asked
    assert set(api.offsets_asked) == {api.updates[-1]["update_id"] + 1}
    assert bus.published == []
