"""``bench.meta_send``, the guides' test sender, against the real app with the dev config's app."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from bench import meta_send
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher


def settings_for(tmp_path: Path) -> Settings:
    inbox = {"app": "demo", "access_token": "t", "fetch_media": False}
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False},
            "store": {"path": str(tmp_path / "cli.db"), "blob_dir": str(tmp_path / "blobs")},
            "outbox": {"relay": "inline", "poll_interval": 0.05},
            "control": {"enabled": False},
            "tenants": {"demo": {}},
            "inboxes": {"demo": {"tenant": "demo"}},
            "channels": {
                "meta": {
                    "apps": {
                        "demo": {"app_secret": meta_send.DEV_SECRET, "verify_token": meta_send.DEV_VERIFY}
                    }
                },
                "whatsapp": {"api_base": "http://127.0.0.1:9", "inboxes": {"demo": inbox}},
                "messenger": {"api_base": "http://127.0.0.1:9", "inboxes": {"demo": inbox}},
                "instagram": {"api_base": "http://127.0.0.1:9", "inboxes": {"demo": inbox}},
            },
        }
    )


async def test_the_cli_signs_as_meta_does(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = MemoryPublisher()
    server = await aiohttp_server(create_app(settings_for(tmp_path), Overrides(publisher=bus)))
    url = str(server.make_url("/meta/demo"))

    async def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["meta_send", "--url", url, *args])
        return await asyncio.to_thread(meta_send.main)

    assert await run("--handshake") == 0
    for channel in ("whatsapp", "messenger", "instagram"):
        assert await run("--channel", channel, f"hello from {channel}") == 0
    assert await run("--wrong-secret", "forged") == 1
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= 3)
    await asyncio.sleep(0.2)
    assert len(bus.published) == 3
