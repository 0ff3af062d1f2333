"""WhatsApp, Messenger and Instagram through the real application (context, pipeline, SQLite store,
relay) behind one ``/meta/{app}`` endpoint, against a local server that answers like the Graph API."""

from __future__ import annotations

import asyncio
from collections import deque
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
from tests.connectors.meta.fake_graph import FakeGraph
from tests.connectors.meta.probe import sign
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
SECRET, OLD_SECRET, VERIFY = "app-secret-now", "app-secret-before", "verify-me"
PNID, OTHER_PNID = "106540352242922", "106540352242999"


def settings_for(tmp_path: Path, base: str, *, fetch_media: bool = True) -> Settings:
    graph = {"api_base": base, "media_first_backoff": "0s", "media_max_backoff": "0s"}
    token = {"app": "acme", "access_token": "graph-token", "fetch_media": fetch_media}
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
            "store": {"path": str(tmp_path / "meta.db"), "blob_dir": str(tmp_path / "blobs")},
            "outbox": {"relay": "inline", "poll_interval": 0.05},
            "control": {"enabled": False},
            "tenants": {"acme": {}},
            "inboxes": {
                "support": {"tenant": "acme"},
                "sales": {"tenant": "acme"},
                "social": {"tenant": "acme"},
            },
            "channels": {
                "meta": {
                    "apps": {
                        "acme": {
                            "app_secret": SECRET,
                            "previous_app_secret": OLD_SECRET,
                            "verify_token": VERIFY,
                        }
                    }
                },
                "whatsapp": {
                    **graph,
                    "inboxes": {
                        "support": {**token, "phone_number_id": PNID},
                        "sales": {**token, "phone_number_id": OTHER_PNID},
                    },
                },
                "messenger": {**graph, "inboxes": {"social": token}},
                "instagram": {**graph, "inboxes": {"social": token}},
            },
        }
    )


@pytest.fixture
async def graph(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeGraph, str]:
    fake = FakeGraph()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("/"))
    return fake, fake.base


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


def fixture(path: str) -> bytes:
    return (FIXTURES / f"{path}.json").read_bytes()


async def post(client: Client, body: bytes, signature: str | None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    response = await client.post("/meta/acme", data=body, headers=headers)
    await response.release()
    return response.status


async def served(client: Client, url: str) -> tuple[int, bytes]:
    """As a desk does: the media URL answers 202 while the fetch is pending."""
    path = url.removeprefix("http://gateway.test")
    async with asyncio.timeout(10):
        while (response := await client.get(path)).status == 202:
            await response.release()
            await asyncio.sleep(0.02)
    return response.status, await response.read()


async def test_the_subscription_handshake(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    client = await aiohttp_client(
        create_app(settings_for(tmp_path, graph[1]), Overrides(publisher=MemoryPublisher()))
    )
    ok = await client.get(
        "/meta/acme",
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY, "hub.challenge": "1158201444"},
    )
    assert (ok.status, await ok.text()) == (200, "1158201444")
    wrong = await client.get(
        "/meta/acme", params={"hub.mode": "subscribe", "hub.verify_token": "guess", "hub.challenge": "1"}
    )
    assert wrong.status == 403
    assert (await client.get("/meta/nobody")).status == 404


async def test_signed_with_either_secret_forged_refused_redelivery_once(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    bus = MemoryPublisher()
    client = await aiohttp_client(
        create_app(settings_for(tmp_path, graph[1], fetch_media=False), Overrides(publisher=bus))
    )
    body = fixture("whatsapp/text")
    assert await post(client, body, sign(body, "guessed")) == 401
    assert await post(client, body, None) == 401
    assert await post(client, body, "sha1=" + sign(body, SECRET).removeprefix("sha256=")) == 401
    assert await post(client, body, sign(body, SECRET)) == 200
    assert await post(client, body, sign(body, OLD_SECRET)) == 200  # a rotation: both verify
    [event] = await published(bus, 1)
    assert event["message"]["channel"] == "whatsapp"
    assert event["message"]["inbox"] == "support"
    assert {"kind": "phone", "value": "+4915112345678", "verified": True} in event["customer"]["identities"]
    assert event["provenance"]["signature_verified"] is True
    await asyncio.sleep(0.2)
    assert len(bus.published) == 1


async def test_a_batch_over_two_numbers_and_every_channel_share_the_endpoint(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    bus = MemoryPublisher()
    client = await aiohttp_client(
        create_app(settings_for(tmp_path, graph[1], fetch_media=False), Overrides(publisher=bus))
    )
    batch = orjson.loads(fixture("whatsapp/batch_two_entries"))
    batch["entry"][1]["changes"][0]["value"]["metadata"]["phone_number_id"] = OTHER_PNID
    body = orjson.dumps(batch)
    assert await post(client, body, sign(body, SECRET)) == 200
    for path in ("messenger/text", "instagram/text"):
        assert await post(client, fixture(path), sign(fixture(path), SECRET)) == 200
    events = await published(bus, 5)
    placed = sorted(
        (e["message"]["channel"], e["message"]["inbox"], e["message"]["text"] or "") for e in events
    )
    assert placed == [
        ("instagram", "social", "Hallo! Habt ihr die Jacke noch in M?"),
        ("messenger", "social", "Hi, where is my order 4711?"),
        ("whatsapp", "sales", ""),
        ("whatsapp", "sales", "Zweite Nachricht"),
        ("whatsapp", "support", "Erste Nachricht"),
    ]


async def test_media_failing_twice_then_stored_and_failing_for_good_is_marked(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    fake, base = graph
    fake.media["1583929765780123"] = (b"\xff\xd8\xffjpeg bytes", "image/jpeg")
    fake.failures["1583929765780123"] = deque([503, 429])
    fake.corrupt["1583929765780123"] = 1  # and then one truncated download
    bus = MemoryPublisher()
    app = create_app(settings_for(tmp_path, base), Overrides(publisher=bus))
    client = await aiohttp_client(app)
    image, voice = fixture("whatsapp/image"), fixture("whatsapp/voice")  # the voice id is unknown to Graph
    assert await post(client, image, sign(image, SECRET)) == 200
    assert await post(client, voice, sign(voice, SECRET)) == 200
    first, second = await published(bus, 2)
    status, data = await served(client, first["message"]["media"][0]["url"])
    assert (status, data) == (200, b"\xff\xd8\xffjpeg bytes")
    assert fake.calls.count("media_info 1583929765780123") == 4
    status, _ = await served(client, second["message"]["media"][0]["url"])
    assert status == 410  # failed for good: the desk is told, the message was published
    metrics = await (await client.get("/metrics")).text()
    assert (
        'ticketgate_channel_events_total{channel="whatsapp",event="media_failed",inbox="support"} 1.0'
        in metrics
    )


async def test_messenger_attachments_are_fetched_without_the_token(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    fake, base = graph
    fake.cdn["photo.jpg"] = (b"\x89PNG photo", "image/png")
    fake.failures["photo.jpg"] = deque([503])
    item = {
        "sender": {"id": "6254147181305912"},
        "recipient": {"id": "104553821234567"},
        "timestamp": 1764920000001,
        "message": {
            "mid": "m_cdn1",
            "attachments": [{"type": "image", "payload": {"url": f"{base}cdn/photo.jpg"}}],
        },
    }
    body = orjson.dumps(
        {"object": "page", "entry": [{"id": "104553821234567", "time": 1, "messaging": [item]}]}
    )
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, base), Overrides(publisher=bus)))
    assert await post(client, body, sign(body, SECRET)) == 200
    [event] = await published(bus, 1)
    status, data = await served(client, event["message"]["media"][0]["url"])
    assert (status, data) == (200, b"\x89PNG photo")
    assert fake.cdn_authorization
    assert set(fake.cdn_authorization) == {None}


async def test_a_signed_body_that_is_not_json_is_400_and_an_unhandled_object_is_answered(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, graph[1]), Overrides(publisher=bus)))
    assert await post(client, b"{oops", sign(b"{oops", SECRET)) == 400
    other = orjson.dumps({"object": "permissions", "entry": []})
    assert await post(client, other, sign(other, SECRET)) == 200
    assert bus.published == []


async def test_media_that_keeps_failing_ends_failed_and_counted_with_the_message_published(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    fake, base = graph
    fake.failures["gone.jpg"] = deque([503] * 1000)  # Meta's CDN never recovers
    settings = settings_for(tmp_path, base)
    tables = settings.model_dump()["channels"]
    tables["messenger"]["media_retry_for"] = 0.3
    tables["messenger"]["media_first_backoff"] = 0.05
    settings = Settings.model_validate({**settings.model_dump(), "channels": tables})
    item = {
        "sender": {"id": "6254147181305912"},
        "recipient": {"id": "104553821234567"},
        "timestamp": 1764920000002,
        "message": {
            "mid": "m_cdn2",
            "text": "see the photo",
            "attachments": [{"type": "image", "payload": {"url": f"{base}cdn/gone.jpg"}}],
        },
    }
    body = orjson.dumps(
        {"object": "page", "entry": [{"id": "104553821234567", "time": 1, "messaging": [item]}]}
    )
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings, Overrides(publisher=bus)))
    assert await post(client, body, sign(body, SECRET)) == 200
    [event] = await published(bus, 1)
    assert event["message"]["text"] == "see the photo"
    status, answer = await served(client, event["message"]["media"][0]["url"])
    assert status == 410
    assert orjson.loads(answer)["status"] == "failed"
    assert fake.cdn_authorization.count(None) >= 2  # retried before giving up
    metrics = await (await client.get("/metrics")).text()
    assert (
        'ticketgate_channel_events_total{channel="messenger",event="media_failed",inbox="social"} 1.0'
        in metrics
    )


@pytest.mark.parametrize(
    "body",
    [
        {"object": "whatsapp_business_account", "entry": 5},
        {"object": "whatsapp_business_account", "entry": [{"changes": ["not an object"]}]},
        {"object": "page", "entry": {"id": "1"}},
        {"object": "instagram", "entry": [{"id": "1", "messaging": [{"message": {"text": "no mid"}}]}]},
    ],
    ids=["entry-not-a-list", "change-not-an-object", "page-entry-object", "message-without-mid"],
)
async def test_a_signed_body_of_a_broken_shape_is_quarantined_never_a_crash(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str], body: dict[str, Any]
) -> None:
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, graph[1]), Overrides(publisher=bus)))
    raw = orjson.dumps(body)
    assert await post(client, raw, sign(raw, SECRET)) == 200
    [event] = await published(bus, 1)
    assert event["type"] == "message.quarantined"


async def test_a_refused_token_is_retried_until_it_is_fixed(
    aiohttp_client: MakeClient, tmp_path: Path, graph: tuple[FakeGraph, str]
) -> None:
    fake, base = graph
    fake.media["1583929765780123"] = (b"\xff\xd8\xffjpeg", "image/jpeg")
    fake.token = "rotated-token"  # the gateway's token no longer works ...
    bus = MemoryPublisher()
    client = await aiohttp_client(create_app(settings_for(tmp_path, base), Overrides(publisher=bus)))
    image = fixture("whatsapp/image")
    assert await post(client, image, sign(image, SECRET)) == 200
    [event] = await published(bus, 1)
    assert fake.seen is not None
    async with asyncio.timeout(10), fake.seen:
        await fake.seen.wait_for(lambda: fake.calls.count("media_info 1583929765780123") >= 2)
    fake.token = "graph-token"  # ... until someone fixes it
    status, data = await served(client, event["message"]["media"][0]["url"])
    assert (status, data) == (200, b"\xff\xd8\xffjpeg")
