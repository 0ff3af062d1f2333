"""The LINE channel through its context: signature checks, answers, every event, media."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.line import DESCRIPTOR, LineConnector
from connectors.line.connector import SIGNATURE_HEADER, signature
from core.errors import ConfigError
from core.settings import Settings
from tests.connectors.line.fake_api import FakeLine, SenderContext, preparing, rate_limited, server_error

Client = TestClient[web.Request, web.Application]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "line"
TOKEN = "line-test-channel-access-token"
SECRET, PREVIOUS = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
IMAGE = "534829601112233449"


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def make_settings(api_base: str = "http://127.0.0.1:9", **channel: Any) -> Settings:
    inboxes = channel.pop("inboxes", {
        "support": {
            "channel_secret": SECRET, "previous_channel_secret": PREVIOUS, "channel_access_token": TOKEN,
        },
    })
    return Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"line": {
            "api_base": api_base, "data_api_base": api_base, "max_body_bytes": 8192, "ingest_timeout": 0.5,
            "media_first_backoff": 10, "media_max_backoff": 60, "media_retry_for": 3600,
            "inboxes": inboxes, **channel,
        }},
    })


@pytest.fixture
async def line_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeLine, str]:
    api = FakeLine(token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def context(line_api: tuple[FakeLine, str], session: aiohttp.ClientSession) -> SenderContext:
    ctx = SenderContext(settings=make_settings(line_api[1]), session=session, channel="line")
    connector = LineConnector.from_settings(ctx.settings)
    assert connector is not None
    connector.setup(ctx)
    return ctx


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[Client]], context: SenderContext) -> Client:
    return await aiohttp_client(context.app)


async def post(client: Client, body: bytes, *, secret: str | None = SECRET, sig: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if sig is not None:
        headers[SIGNATURE_HEADER] = sig
    elif secret is not None:
        headers[SIGNATURE_HEADER] = signature(secret.encode(), body).decode()
    response = await client.post("/line/support", data=body, headers=headers)
    return response.status


# --- configuration ------------------------------------------------------------------------------


def test_the_descriptor_names_the_channel_and_answers_within_two_seconds() -> None:
    assert DESCRIPTOR.name == "line"
    assert DESCRIPTOR.connector is LineConnector
    assert DESCRIPTOR.deadline <= 2.0
    assert "line" in DESCRIPTOR.identity_kinds


@pytest.mark.parametrize(
    ("inbox", "key"),
    [
        ({"channel_access_token": TOKEN}, "channels.line.inboxes.support.channel_secret"),
        ({"channel_secret": "", "channel_access_token": TOKEN},
         "channels.line.inboxes.support.channel_secret"),
        ({"channel_secret": SECRET}, "channels.line.inboxes.support.channel_access_token"),
    ],
)
def test_a_channel_without_its_secrets_refuses_to_start(inbox: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LineConnector.from_settings(make_settings(inboxes={"support": inbox}))
    assert caught.value.key == key


def test_without_media_the_access_token_may_be_left_out() -> None:
    connector = LineConnector.from_settings(
        make_settings(inboxes={"support": {"channel_secret": SECRET, "fetch_media": False}})
    )
    assert connector is not None
    assert [e.address for e in connector.describe_endpoints("https://gw.example")] == [
        "https://gw.example/line/support"
    ]


# --- verification -------------------------------------------------------------------------------


def test_the_signature_is_the_sdks_vector() -> None:
    # line-bot-sdk-python's SignatureValidator test vector.
    expected = b"/gg9a+LvFevTH1sd7XCQycD7tsWclCsInj7MhBHxN7k="
    assert signature(b"channel_secret", b"bodybodybodybody") == expected


async def test_a_signed_delivery_is_stored_and_answered_200(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("text")) == 200
    [event] = context.events
    assert event.text == "注文した商品がまだ届きません。Order #A-10023"


async def test_the_previous_secret_is_accepted_during_a_rotation(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("text"), secret=PREVIOUS) == 200
    assert len(context.events) == 1


@pytest.mark.parametrize("how", ["wrong secret", "missing", "empty", "garbage", "other body"])
async def test_a_forged_delivery_is_refused_before_parsing(
    client: Client, context: SenderContext, how: str
) -> None:
    body = b'{"destination": "U0", "events": [{'  # unparseable: parsing first would be a 400
    sig = {
        "wrong secret": signature(b"guessed-secret", body).decode(),
        "missing": None, "empty": "", "garbage": "\u00e9not base64",
        "other body": signature(SECRET.encode(), fixture("text")).decode(),
    }[how]
    headers = {"Content-Type": "application/json"}
    if sig is not None:
        headers[SIGNATURE_HEADER] = sig
    response = await client.post("/line/support", data=body, headers=headers)
    assert response.status == 401
    assert context.ingests == 0
    assert context.metrics.counts[("refused:signature", "support")] == 1


async def test_an_unknown_inbox_is_404(client: Client) -> None:
    response = await client.post("/line/nobody", data=fixture("text"), headers={SIGNATURE_HEADER: "x"})
    assert response.status == 404


async def test_an_oversized_body_is_413_and_counted(
    client: Client, context: SenderContext
) -> None:
    body = orjson.dumps({"destination": "U0", "events": [], "pad": "x" * 9000})
    assert await post(client, body) == 413
    assert context.ingests == 0
    assert context.metrics.counts[("refused:size", "support")] == 1


async def test_signed_but_not_a_webhook_object_is_400(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, b"[1, 2, 3]") == 400
    assert context.events == []


# --- events -------------------------------------------------------------------------------------


async def test_the_consoles_verify_request_is_200_and_makes_nothing(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("verify_empty")) == 200
    assert await post(client, fixture("verify_dummy_tokens")) == 200
    assert context.events == []
    assert context.metrics.counts[("verify_request", "support")] == 2


async def test_every_event_of_a_batch_is_handled(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("batch_mixed")) == 200
    assert [e.text for e in context.events] == ["first", "second, another customer"]
    assert context.metrics.counts[("event_ignored", "support")] == 3


async def test_the_same_delivery_three_times_at_once_is_one_event(
    client: Client, context: SenderContext
) -> None:
    context.store_delay = 0.05
    body = fixture("text")
    statuses = await asyncio.gather(*(post(client, body) for _ in range(3)))
    assert statuses == [200, 200, 200]
    assert len(context.events) == 1


async def test_a_redelivery_is_marked_and_is_a_duplicate(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("redelivery")) == 200
    assert await post(client, fixture("redelivery")) == 200
    [event] = context.events
    assert event.extra["redelivery"] is True
    assert len(context.claimed) == 1


async def test_a_store_that_cannot_take_it_is_503_with_retry_after(
    client: Client, context: SenderContext
) -> None:
    context.store_down = True
    response = await client.post("/line/support", data=fixture("text"), headers={
        SIGNATURE_HEADER: signature(SECRET.encode(), fixture("text")).decode()})
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"


async def test_a_slow_store_is_answered_503_within_the_deadline(
    client: Client, context: SenderContext
) -> None:
    context.store_delay = 2.0
    async with asyncio.timeout(DESCRIPTOR.deadline):
        assert await post(client, fixture("text")) == 503


# --- media --------------------------------------------------------------------------------------


async def fetch_round(context: SenderContext) -> None:
    """One round of the supervised fetcher (its loop only adds waiting between rounds)."""
    fetcher = context.spawned["media"].__self__  # type: ignore[attr-defined]
    await fetcher.run_once()


async def test_media_that_fails_twice_then_succeeds_is_stored(
    client: Client, context: SenderContext, line_api: tuple[FakeLine, str]
) -> None:
    api, _ = line_api
    api.contents[IMAGE] = (b"\xff\xd8\xffjpeg bytes", "image/jpeg")
    api.content_errors[IMAGE] = [server_error(), rate_limited("3")]
    assert await post(client, fixture("image")) == 200
    [fetch] = context.media.fetches.values()
    assert fetch.ref == IMAGE
    assert fetch.key == f"line/support/{IMAGE}"
    await fetch_round(context)
    assert context.media.fetches[fetch.key].state == "pending"
    context.clock.advance(10)
    await fetch_round(context)
    assert context.media.fetches[fetch.key].state == "pending"
    context.clock.advance(20)
    await fetch_round(context)
    done = context.media.fetches[fetch.key]
    assert done.state == "done"
    assert done.attempts == 3
    assert done.content_type == "image/jpeg"
    assert await context.blobs.read(done.sha256 or "") == b"\xff\xd8\xffjpeg bytes"


async def test_media_that_keeps_failing_ends_failed_and_counted_and_the_message_is_stored(
    client: Client, context: SenderContext, line_api: tuple[FakeLine, str]
) -> None:
    api, _ = line_api
    video = "534829601112233453"
    api.content_errors[video] = [preparing() for _ in range(100)]  # LINE never finishes preparing it
    assert await post(client, fixture("video")) == 200
    assert len(context.events) == 1  # the message does not wait for its media
    key = f"line/support/{video}"
    for _ in range(100):
        await fetch_round(context)
        context.clock.advance(60)
        if context.media.fetches[key].state != "pending":
            break
    failed = context.media.fetches[key]
    assert failed.state == "failed"
    assert "202" in (failed.error or "")
    assert context.metrics.counts[("media_failed", "support")] == 1
    assert context.clock.now() - failed.created_at >= timedelta(seconds=3500)


async def test_gone_content_fails_at_once(
    client: Client, context: SenderContext, line_api: tuple[FakeLine, str]
) -> None:
    api, _ = line_api
    assert await post(client, fixture("file")) == 200
    await fetch_round(context)
    key = "line/support/534829601112233455"
    assert context.media.fetches[key].state == "failed"
    assert api.calls["content"] == 1
    assert context.media.fetches[key].name == "invoice-2026-11.pdf"
    assert context.metrics.counts[("media_failed", "support")] == 1


async def test_external_content_is_not_fetched(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("image_external")) == 200
    assert context.media.fetches == {}
