"""DingTalk through the real application (context, pipeline, SQLite store, relay), with a local
server answering like DingTalk: the HTTP callback, Stream mode over a local WebSocket speaking the
Stream protocol, media and the directory."""

from __future__ import annotations

import asyncio
import time
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
from gateway.store import build_store
from tests.connectors.dingtalk.fake_dingtalk import APP_KEY, APP_SECRET, FakeDingTalk
from tests.connectors.dingtalk.kit import CORP, STAFF, robot, signed_headers
from tests.contract.kit import ContractStore, StoreMode
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
OLD_SECRET = "old-dingtalk-app-secret"
URL = "/dingtalk/it-desk"


def settings_for(tmp_path: Path, fake: FakeDingTalk, **bot: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
            "store": {"path": str(tmp_path / "dingtalk.db"), "blob_dir": str(tmp_path / "blobs")},
            "outbox": {"relay": "inline", "poll_interval": 0.05},
            "control": {"enabled": False},
            "tenants": {"acme": {}},
            "inboxes": {"it-desk": {"tenant": "acme"}},
            "channels": {
                "dingtalk": {
                    "api_base": fake.base,
                    "oapi_base": fake.base,
                    "stream_first_backoff": 0.05,
                    "stream_max_backoff": 0.2,
                    "inboxes": {
                        "it-desk": {
                            "mode": "http",
                            "app_key": APP_KEY,
                            "app_secret": APP_SECRET,
                            "previous_app_secret": OLD_SECRET,
                            **bot,
                        }
                    },
                }
            },
        }
    )


@pytest.fixture
async def dingtalk(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeDingTalk:
    fake = FakeDingTalk()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


async def post(client: Client, body: bytes, *, secret: str = APP_SECRET, at: float | None = None) -> int:
    response = await client.post(URL, data=body, headers=signed_headers(secret, at=at))
    await response.release()
    return response.status


async def test_http_callbacks_forged_stale_unsigned_refused_redeliveries_one_directory_email_linked(
    aiohttp_client: MakeClient, tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    dingtalk.staff[STAFF] = {"userid": STAFF, "name": "张伟", "org_email": "Zhang.Wei@corp.example"}
    bus = MemoryPublisher()
    client = await aiohttp_client(
        create_app(settings_for(tmp_path, dingtalk, fetch_media=False), Overrides(publisher=bus))
    )
    body = orjson.dumps(robot(1, "VPN 连不上"))
    assert await post(client, body, secret="guessed") == 401
    assert await post(client, body, at=time.time() - 3700) == 401
    assert (await client.post(URL, data=body)).status == 401
    assert await post(client, b'{"msgId": ', secret="guessed") == 401  # refused before it is read
    assert await asyncio.gather(*(post(client, body) for _ in range(3))) == [200, 200, 200]
    assert await post(client, orjson.dumps(robot(2, "still down")), secret=OLD_SECRET) == 200  # rotation
    first, second = await published(bus, 2)
    await asyncio.sleep(0.2)
    assert len(bus.published) == 2
    assert first["message"]["text"] == "VPN 连不上"
    assert {"kind": "dingtalk_staff_id", "value": f"{CORP}:{STAFF}", "verified": True} in first["customer"][
        "identities"
    ]
    assert {"kind": "email", "value": "zhang.wei@corp.example", "verified": True} in second["customer"][
        "identities"
    ]
    assert second["customer"]["id"] == first["customer"]["id"]
    assert dingtalk.calls["user"] == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'ticketgate_refusals_total{channel="dingtalk",inbox="it-desk",reason="signature"} 4.0' in metrics


async def test_pictures_are_fetched_through_the_robot_file_api(
    aiohttp_client: MakeClient, tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    dingtalk.files["mIofN681YE3f/+m+NntqpT4ieP3b2"] = (b"\x89PNG screenshot", "image/png")
    bus = MemoryPublisher()
    client = await aiohttp_client(
        create_app(settings_for(tmp_path, dingtalk, directory_emails=False), Overrides(publisher=bus))
    )
    assert await post(client, orjson.dumps(robot(5, fixture="picture"))) == 200
    [event] = await published(bus, 1)
    [media] = event["message"]["media"]
    path = media["url"].removeprefix("http://gateway.test")
    async with asyncio.timeout(10):
        while (served := await client.get(path)).status == 202:
            await served.release()
            await asyncio.sleep(0.05)
    assert served.status == 200
    assert await served.read() == b"\x89PNG screenshot"


async def test_stream_mode_acks_after_the_commit_answers_pings_and_reconnects(
    aiohttp_client: MakeClient, tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    bus = MemoryPublisher()
    settings = settings_for(tmp_path, dingtalk, mode="stream", fetch_media=False, directory_emails=False)
    client = await aiohttp_client(create_app(settings, Overrides(publisher=bus)))
    await dingtalk.wait_for(lambda: dingtalk.connections == 1)
    ping = await dingtalk.system("ping")
    await dingtalk.wait_for(lambda: any(a["headers"]["messageId"] == ping for a in dingtalk.acks))
    first = await dingtalk.callback(robot(11, "over the stream"))
    await dingtalk.wait_for(lambda: first not in dingtalk.unacked)
    [event] = await published(bus, 1)
    assert event["message"]["text"] == "over the stream"
    # DingTalk moves the connection: the client reconnects and goes on.
    await dingtalk.system("disconnect")
    await dingtalk.wait_for(lambda: dingtalk.connections == 2)
    second = await dingtalk.callback(robot(12, "after the move"))
    await dingtalk.wait_for(lambda: second not in dingtalk.unacked)
    assert [e["message"]["text"] for e in await published(bus, 2)] == ["over the stream", "after the move"]
    metrics = await (await client.get("/metrics")).text()
    counted = 'ticketgate_channel_events_total{channel="dingtalk",event="stream_reconnect",inbox="it-desk"}'
    assert f"{counted} 1.0" in metrics


async def test_a_stream_connection_cut_mid_callback_loses_and_duplicates_nothing(
    aiohttp_client: MakeClient, tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    bus = MemoryPublisher()
    settings = settings_for(tmp_path, dingtalk, mode="stream", fetch_media=False, directory_emails=False)
    await aiohttp_client(create_app(settings, Overrides(publisher=bus)))
    await dingtalk.wait_for(lambda: dingtalk.connections == 1)
    dingtalk.drop_after_next_callback = True
    cut = await dingtalk.callback(robot(21, "cut mid-callback"))
    # The socket closed before an acknowledgement could arrive: DingTalk redelivers on the next
    # connection, the gateway finds it stored and acknowledges it.
    await dingtalk.wait_for(lambda: dingtalk.connections >= 2 and cut not in dingtalk.unacked)
    after = await dingtalk.callback(robot(22, "sentinel"))
    await dingtalk.wait_for(lambda: after not in dingtalk.unacked)
    events = await published(bus, 2)
    await asyncio.sleep(0.2)
    assert [e["message"]["text"] for e in events] == ["cut mid-callback", "sentinel"]
    assert len(bus.published) == 2


async def test_a_stream_message_the_store_cannot_take_is_not_acknowledged_until_it_is_stored(
    aiohttp_client: MakeClient, tmp_path: Path, dingtalk: FakeDingTalk
) -> None:
    bus = MemoryPublisher()
    settings = settings_for(tmp_path, dingtalk, mode="stream", fetch_media=False, directory_emails=False)
    store = ContractStore(build_store(settings), StoreMode.FAILING, stall=0.0)
    await aiohttp_client(create_app(settings, Overrides(publisher=bus, store=store)))  # type: ignore[arg-type]
    await dingtalk.wait_for(lambda: dingtalk.connections == 1)
    pending = await dingtalk.callback(robot(31, "while the store is down"))
    await asyncio.sleep(0.5)
    assert pending in dingtalk.unacked
    assert not [a for a in dingtalk.acks if a["headers"]["messageId"] == pending]
    store.mode = StoreMode.OK
    await dingtalk.redeliver()
    await dingtalk.wait_for(lambda: pending not in dingtalk.unacked)
    [event] = await published(bus, 1)
    assert event["message"]["text"] == "while the store is down"
