"""Socket Mode through the real application, against a local WebSocket server speaking Slack's
envelope protocol: hello, events_api envelopes, acknowledgements by envelope_id, disconnect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from core.errors import StoreError
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from gateway.store import build_store
from gateway.store.base import Store
from tests.connectors.slack.fake_slack import APP_TOKEN, BOT_TOKEN, FakeSlack
from tests.connectors.slack.kit import dm
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


class WatchedStore:
    """The real store; ``accept`` can be made to fail, and the end of every commit is timed."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.failing = False
        self.committed: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def accept(self, *args: Any, **kwargs: Any) -> Any:
        if self.failing:
            raise StoreError("socket test: the store is down")
        await asyncio.sleep(0.2)  # a slow commit: an early ack would arrive before it ends
        placed = await self.inner.accept(*args, **kwargs)
        self.committed.append(time.monotonic())
        return placed


@pytest.fixture
async def slack(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeSlack:
    fake = FakeSlack()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


def settings_for(tmp_path: Path, slack: FakeSlack) -> Settings:
    return Settings.model_validate({
        "server": {"normalizer_process": False},
        "store": {"path": str(tmp_path / "socket.db"), "blob_dir": str(tmp_path / "blobs")},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"slack": {
            "api_base": f"{slack.base}/api", "socket_ping_interval": 1, "ingest_timeout": 1,
            "inboxes": {"support": {"mode": "socket", "app_token": APP_TOKEN, "bot_token": BOT_TOKEN,
                                    "profile_emails": False, "fetch_files": False}},
        }},
    })


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


async def acked(slack: FakeSlack, envelope: dict[str, Any]) -> float:
    await slack.wait(lambda: envelope["envelope_id"] in slack.acks)
    return time.monotonic()


async def test_envelopes_are_acknowledged_after_the_commit_and_survive_a_reconnect(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    settings = settings_for(tmp_path, slack)
    store = WatchedStore(build_store(settings))
    bus = MemoryPublisher()
    await aiohttp_client(create_app(settings, Overrides(publisher=bus, store=cast(Store, store))))
    await slack.wait(lambda: slack.connections == 1)
    assert slack.calls["apps.connections.open"] == 1  # with the app-level token (FakeSlack checks)

    first = slack.envelope(dm(1, "over the socket"))
    acked_at = await acked(slack, first)
    assert store.committed
    assert store.committed[0] <= acked_at
    [event] = await published(bus, 1)
    assert event["message"]["text"] == "over the socket"
    assert event["message"]["extra"]["channel"] == "D000000001"
    assert event["provenance"]["signature_verified"] is True

    # A store that cannot take it: no acknowledgement, so Slack redelivers the envelope.
    store.failing = True
    second = slack.envelope(dm(2, "while the store is down"))
    await asyncio.sleep(1.5)
    assert second["envelope_id"] not in slack.acks
    store.failing = False
    again = slack.envelope(second["payload"], envelope_id=second["envelope_id"], retry_attempt=1,
                           retry_reason="timeout")
    await acked(slack, again)
    _, retried = await published(bus, 2)
    assert retried["message"]["text"] == "while the store is down"
    assert retried["provenance"]["retry"] == 1
    assert retried["provenance"]["retry_reason"] == "timeout"
    assert retried["message"]["extra"]["retry"] == {"num": 1, "reason": "timeout"}

    # Slack asks the client to reconnect: a new URL from apps.connections.open, a new socket.
    slack.disconnect()
    await slack.wait(lambda: slack.connections == 2, within=15)
    assert slack.calls["apps.connections.open"] == 2
    third = slack.envelope(dm(3, "after the reconnect"))
    await acked(slack, third)
    # A redelivery of an envelope already stored is acknowledged and makes no second event.
    repeat = slack.envelope(third["payload"], retry_attempt=1, retry_reason="timeout")
    await acked(slack, repeat)
    events = await published(bus, 3)
    await asyncio.sleep(0.3)
    assert [e["message"]["text"] for e in events] == [
        "over the socket", "while the store is down", "after the reconnect"
    ]
    assert len(bus.published) == 3


async def test_what_is_not_an_event_is_acknowledged_and_not_stored(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    settings = settings_for(tmp_path, slack)
    bus = MemoryPublisher()
    await aiohttp_client(create_app(settings, Overrides(publisher=bus)))
    await slack.wait(lambda: slack.connections == 1)
    command = {"envelope_id": "slash-1", "type": "slash_commands", "accepts_response_payload": True,
               "payload": {"command": "/ticket", "text": "help"}}
    slack.to_send.put_nowait(command)
    await slack.wait(lambda: "slash-1" in slack.acks)
    reaction = slack.envelope({"type": "event_callback", "team_id": "T0TICKETS", "event_id": "Ev0R",
                               "event": {"type": "reaction_added", "user": "U1", "reaction": "eyes",
                                         "item": {"type": "message", "channel": "C1", "ts": "1.2"}}})
    await acked(slack, reaction)
    await asyncio.sleep(0.3)
    assert bus.published == []
