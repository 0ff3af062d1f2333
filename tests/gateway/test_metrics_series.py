"""/metrics shows every documented outcome of every configured channel, before the first message."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient

from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher


async def test_every_outcome_is_exposed_from_the_start(tmp_path: Path, aiohttp_client: object) -> None:
    settings = Settings.model_validate(
        {
            "store": {"path": str(tmp_path / "db.sqlite"), "blob_dir": str(tmp_path / "blobs")},
            "server": {"normalizer_process": False},
            "outbox": {"relay": "inline"},
            "control": {"enabled": False},
            "tenants": {"demo": {}},
            "inboxes": {"demo": {"tenant": "demo"}},
            "channels": {"api": {"inboxes": {"demo": {"keys": ["metrics-test-key-0001"]}}}},
        }
    )
    app = create_app(settings, Overrides(publisher=MemoryPublisher()))
    client: TestClient = await aiohttp_client(app)  # type: ignore[operator]
    resp = await client.get("/metrics")
    text = await resp.text()
    for outcome in ("accepted", "duplicate", "rejected", "quarantined", "retry"):
        assert f'ticketgate_messages_total{{channel="api",outcome="{outcome}"}} 0.0' in text, outcome
