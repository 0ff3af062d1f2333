"""The X channel through its context: the CRC challenge, signature checks, routing, answers, media,
read receipts."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.x import DESCRIPTOR, XConnector
from connectors.x.connector import SIGNATURE_HEADER, signature
from core.errors import ConfigError
from core.settings import Settings
from tests.connectors.line.fake_api import SenderContext
from tests.connectors.x.fake_api import FakeX, server_error, too_many_requests

Client = TestClient[web.Request, web.Application]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "x"
SECRET, PREVIOUS = "x-consumer-secret-0123456789abcdefghijklmnopq", "x-previous-consumer-secret-0123456789"
KEY, TOKEN, TOKEN_SECRET = "x-consumer-key", "1432107654321098752-accesstoken", "access-token-secret"
ACCOUNT = "1432107654321098752"


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def with_media_base(body: bytes, base: str) -> bytes:
    """A fixture whose media URLs point at the local server (as media_hosts allows)."""
    text = body.decode()
    for host in ("https://ton.twitter.com/", "https://video.twimg.com/"):
        text = text.replace(host, f"{base}media/{'ton' if 'ton' in host else 'video'}/")
    return text.encode()


def make_settings(api_base: str = "http://127.0.0.1:9/", **app: Any) -> Settings:
    account = app.pop("account", {
        "inbox": "support", "access_token": TOKEN, "access_token_secret": TOKEN_SECRET,
    })
    return Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"x": {
            "api_base": api_base, "max_body_bytes": 8192, "ingest_timeout": 0.5,
            "media_hosts": [f"{api_base}media/"], "media_first_backoff": 10, "media_max_backoff": 60,
            "media_retry_for": 3600,
            "apps": {"acme": {
                "consumer_key": KEY, "consumer_secret": SECRET, "previous_consumer_secret": PREVIOUS,
                "accounts": {ACCOUNT: account}, **app,
            }},
        }},
    })


@pytest.fixture
async def x_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeX, str]:
    api = FakeX(consumer_key=KEY, token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def context(x_api: tuple[FakeX, str], session: aiohttp.ClientSession) -> SenderContext:
    ctx = SenderContext(settings=make_settings(x_api[1]), session=session, channel="x")
    connector = XConnector.from_settings(ctx.settings)
    assert connector is not None
    connector.setup(ctx)
    return ctx


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[Client]], context: SenderContext) -> Client:
    return await aiohttp_client(context.app)


async def post(client: Client, body: bytes, *, secret: str | None = SECRET) -> int:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[SIGNATURE_HEADER] = signature(secret.encode(), body).decode()
    response = await client.post("/x/acme", data=body, headers=headers)
    return response.status


# --- configuration ------------------------------------------------------------------------------


def test_the_descriptor_answers_within_three_seconds() -> None:
    assert DESCRIPTOR.name == "x"
    assert DESCRIPTOR.deadline <= 3.0
    assert "x" in DESCRIPTOR.identity_kinds


@pytest.mark.parametrize(
    ("app", "key"),
    [
        ({"consumer_secret": ""}, "channels.x.apps.acme.consumer_secret"),
        ({"consumer_key": None}, "channels.x.apps.acme.consumer_key"),
        ({"account": {"inbox": "support", "access_token": TOKEN}},
         'channels.x.apps.acme.accounts."1432107654321098752".access_token_secret'),
    ],
)
def test_an_app_without_its_secrets_refuses_to_start(app: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        XConnector.from_settings(make_settings(**app))
    assert caught.value.key == key


def test_accounts_are_keyed_by_user_id_and_inboxes_must_exist() -> None:
    with pytest.raises(ConfigError, match="numeric X user id"):
        XConnector.from_settings(Settings.model_validate({
            "tenants": {"acme": {}}, "inboxes": {"support": {"tenant": "acme"}},
            "channels": {"x": {"apps": {"a": {"consumer_secret": "s", "accounts": {
                "@acme": {"inbox": "support", "fetch_media": False}}}}}},
        }))
    with pytest.raises(ConfigError):
        XConnector.from_settings(make_settings(account={"inbox": "nowhere", "fetch_media": False}))
    two = {"consumer_secret": "s", "accounts": {
        "1": {"inbox": "support", "fetch_media": False}, "2": {"inbox": "support", "fetch_media": False}}}
    with pytest.raises(ConfigError, match="already routed") as caught:
        XConnector.from_settings(Settings.model_validate({
            "tenants": {"acme": {}}, "inboxes": {"support": {"tenant": "acme"}},
            "channels": {"x": {"apps": {"a": two}}},
        }))
    assert caught.value.key == 'channels.x.apps.a.accounts."2".inbox'


# --- CRC and verification -----------------------------------------------------------------------


def test_the_crc_response_is_the_devrel_vector() -> None:
    secret = b"z3ZX4v7mAAUGykl3EcmkqbartmuW8VFOOzCloLx9Q45P0hLrFu"
    token = b"9b4507b3-9040-4669-9ca3-6b94edb50553"
    assert signature(secret, token) == b"sha256=Cytd4Sq+NvEcV3MMrXxWJGJx5A+y/lXzzU2Maartkx8="


async def test_the_crc_challenge_is_answered_with_the_current_secret(client: Client) -> None:
    response = await client.get("/x/acme", params={"crc_token": "challenge-123"})
    assert response.status == 200
    expected = base64.b64encode(hmac.new(SECRET.encode(), b"challenge-123", hashlib.sha256).digest()).decode()
    assert await response.json() == {"response_token": f"sha256={expected}"}
    assert (await client.get("/x/acme")).status == 400
    assert (await client.get("/x/other", params={"crc_token": "x"})).status == 404


async def test_a_signed_dm_is_stored_and_answered_200(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("dm_text")) == 200
    [event] = context.events
    assert event.inbox == "support"
    assert event.text == "Hi, my order #A-10023 hasn't arrived yet. Can you check?"


async def test_the_previous_secret_is_accepted_during_a_rotation(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("dm_text"), secret=PREVIOUS) == 200
    assert len(context.events) == 1


@pytest.mark.parametrize("how", ["wrong secret", "missing", "no prefix", "other body"])
async def test_a_forged_delivery_is_refused_before_parsing(
    client: Client, context: SenderContext, how: str
) -> None:
    body = b'{"for_user_id": "1", "direct_message_events": [{'
    value = {
        "wrong secret": signature(b"guessed", body).decode(), "missing": None,
        "no prefix": signature(SECRET.encode(), body).decode().removeprefix("sha256="),
        "other body": signature(SECRET.encode(), fixture("dm_text")).decode(),
    }[how]
    headers = {SIGNATURE_HEADER: value} if value is not None else {}
    response = await client.post("/x/acme", data=body, headers=headers)
    assert response.status == 401
    assert context.ingests == 0
    assert context.metrics.counts[("refused:signature", "support")] == 1


async def test_an_oversized_body_is_413(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, orjson.dumps({"for_user_id": ACCOUNT, "pad": "x" * 9000})) == 413
    assert context.metrics.counts[("refused:size", "support")] == 1


async def test_signed_but_not_json_is_400(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, b"not json") == 400
    assert context.events == []


# --- routing and activities ---------------------------------------------------------------------


async def test_a_delivery_for_an_unrouted_account_is_200_counted_and_not_stored(
    client: Client, context: SenderContext
) -> None:
    body = fixture("dm_text").replace(ACCOUNT.encode(), b"999999999")
    assert await post(client, body) == 200
    assert context.ingests == 0
    assert context.metrics.counts[("unrouted", "support")] == 1


async def test_echoes_and_other_activities_are_200_and_counted(
    client: Client, context: SenderContext
) -> None:
    for name in ("dm_outgoing_echo", "typing", "tweet_mention", "follow"):
        assert await post(client, fixture(name)) == 200
    assert context.events == []
    assert context.metrics.counts[("echo_ignored", "support")] == 1
    assert context.metrics.counts[("event_ignored", "support")] == 3


async def test_every_dm_of_a_batch_is_stored_and_the_echo_is_not(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("dm_batch_with_echo")) == 200
    assert [e.text for e in context.events] == ["first question", "我的退款什么时候到账？"]


async def test_the_same_delivery_three_times_at_once_is_one_event(
    client: Client, context: SenderContext
) -> None:
    context.store_delay = 0.05
    statuses = await asyncio.gather(*(post(client, fixture("dm_text")) for _ in range(3)))
    assert statuses == [200, 200, 200]
    assert len(context.events) == 1


async def test_a_read_receipt_is_reported_on_our_reply(
    client: Client, context: SenderContext
) -> None:
    assert await post(client, fixture("mark_read")) == 200
    assert context.deliveries == [("1864000000000099999", "read")]
    assert context.events == []


async def test_a_store_that_cannot_take_it_is_503(
    client: Client, context: SenderContext
) -> None:
    context.store_down = True
    assert await post(client, fixture("dm_text")) == 503


async def test_a_slow_store_is_answered_503_within_the_deadline(
    client: Client, context: SenderContext
) -> None:
    context.store_delay = 2.0
    async with asyncio.timeout(DESCRIPTOR.deadline):
        assert await post(client, fixture("dm_text")) == 503


# --- media --------------------------------------------------------------------------------------


async def fetch_round(context: SenderContext) -> None:
    fetcher = context.spawned["media"].__self__  # type: ignore[attr-defined]
    await fetcher.run_once()


PHOTO = "ton/1.1/ton/data/dm/1864000000000012345/1864000000000001111/AbCdEfGh.jpg"


async def test_a_dm_photo_failing_twice_then_fetched_signed_is_stored(
    client: Client, context: SenderContext, x_api: tuple[FakeX, str]
) -> None:
    api, base = x_api
    api.media[PHOTO] = (b"\xff\xd8\xffphoto", "image/jpeg")
    api.media_errors[PHOTO] = [server_error(), too_many_requests(retry_after="5")]
    assert await post(client, with_media_base(fixture("dm_photo"), base)) == 200
    [event] = context.events
    key = next(iter(context.media.fetches))
    await fetch_round(context)
    context.clock.advance(10)
    await fetch_round(context)
    assert context.media.fetches[key].state == "pending"
    context.clock.advance(20)
    await fetch_round(context)
    done = context.media.fetches[key]
    assert done.state == "done"
    assert done.attempts == 3
    assert await context.blobs.read(done.sha256 or "") == b"\xff\xd8\xffphoto"
    assert done.name == "AbCdEfGh.jpg"
    assert event.media[0].ref.startswith(base)


async def test_media_that_keeps_failing_ends_failed_and_counted(
    client: Client, context: SenderContext, x_api: tuple[FakeX, str]
) -> None:
    api, base = x_api
    api.media_errors[PHOTO] = [server_error() for _ in range(100)]
    assert await post(client, with_media_base(fixture("dm_photo"), base)) == 200
    assert len(context.events) == 1
    key = next(iter(context.media.fetches))
    for _ in range(100):
        await fetch_round(context)
        context.clock.advance(60)
        if context.media.fetches[key].state != "pending":
            break
    assert context.media.fetches[key].state == "failed"
    assert context.metrics.counts[("media_failed", "support")] == 1


async def test_media_outside_the_allowed_hosts_is_never_fetched(
    client: Client, context: SenderContext, x_api: tuple[FakeX, str]
) -> None:
    api, _ = x_api
    assert await post(client, fixture("dm_photo")) == 200  # ton.twitter.com is not allowed here
    await fetch_round(context)
    [fetch] = context.media.fetches.values()
    assert fetch.state == "failed"
    assert api.calls["media"] == 0
