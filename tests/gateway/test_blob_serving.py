"""What a desk's browser gets from ``/blobs/{sha256}`` and ``/media/...``: the stored type, never a page
that runs in the gateway's origin."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.media import file_response
from gateway.publisher import MemoryPublisher
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
KEY = "blob-test-key-0123456789"
FILES = {
    "page.html": ("text/html", b"<script>alert(document.domain)</script>"),
    "logo.svg": ("image/svg+xml", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>'),
    "photo.png": ("image/png", b"\x89PNG\r\n\x1a\nnot really"),
    "notes.txt": ("text/plain", b"plain notes"),
}


def settings_for(tmp_path: Path) -> Settings:
    return Settings.model_validate({
        "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
        "store": {"path": str(tmp_path / "g.db"), "blob_dir": str(tmp_path / "blobs")},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"app": {"tenant": "acme"}},
        "channels": {"api": {"inboxes": {"app": {"keys": [KEY]}}}},
    })


async def test_blobs_are_served_with_their_type_and_active_types_only_as_downloads(
    aiohttp_client: Callable[..., Awaitable[Client]], tmp_path: Path
) -> None:
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path), Overrides(publisher=bus)))
    attachments = [
        {"name": name, "content_type": kind, "data_base64": base64.b64encode(data).decode()}
        for name, (kind, data) in FILES.items()
    ]
    body: dict[str, Any] = {"customer": {"external_id": "u1"}, "text": "files", "attachments": attachments}
    posted = await client.post("/api/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert posted.status == 202, await posted.text()
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= 1)
    event = validate_event(bus.published[0].body)

    served = {}
    for attachment in event["message"]["attachments"]:
        response = await client.get(attachment["url"].removeprefix("http://gateway.test"))
        assert response.status == 200
        assert await response.read() == FILES[attachment["name"]][1]
        served[attachment["name"]] = response.headers

    for name, headers in served.items():
        assert headers["Content-Type"].split(";")[0] == FILES[name][0]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Content-Security-Policy"].startswith("sandbox")
    assert served["page.html"]["Content-Disposition"] == "attachment"
    assert served["logo.svg"]["Content-Disposition"] == "attachment"
    assert "Content-Disposition" not in served["photo.png"]
    assert "Content-Disposition" not in served["notes.txt"]


@pytest.mark.parametrize(
    ("stored", "served", "disposition"),
    [
        ("image/jpeg", "image/jpeg", "inline; filename*=UTF-8''a%20b.jpg"),
        ("TEXT/HTML", "text/html", "attachment; filename*=UTF-8''a%20b.jpg"),
        ("application/xhtml+xml", "application/xhtml+xml", "attachment; filename*=UTF-8''a%20b.jpg"),
        ("text/html\r\nX-Evil: 1", "application/octet-stream", "attachment; filename*=UTF-8''a%20b.jpg"),
        (None, "application/octet-stream", "attachment; filename*=UTF-8''a%20b.jpg"),
    ],
)
def test_provider_media_types_are_served_the_same_way(
    stored: str | None, served: str, disposition: str
) -> None:
    response = file_response(b"bytes", sha256="0" * 64, content_type=stored, name="a b.jpg")
    assert response.content_type == served
    assert response.headers["Content-Disposition"] == disposition
    assert response.headers["X-Content-Type-Options"] == "nosniff"
