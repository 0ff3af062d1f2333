"""Slack through the real application: context, pipeline, SQLite store and relay, with a local
server answering like Slack's Web API."""

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

from connectors.slack.intake import Profiles
from core.settings import Settings
from gateway.app import Overrides, create_app
from gateway.publisher import MemoryPublisher
from tests.connectors.slack.fake_slack import BOT_TOKEN, FakeSlack
from tests.connectors.slack.kit import TEAM, body, callback, dm, signed_headers
from tests.support.schema import validate_event

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "slack"
SECRET, OLD_SECRET = "app-test-signing-secret", "app-test-old-signing-secret"
URL = "/slack/support/events"


def settings_for(tmp_path: Path, api_base: str, **inbox: Any) -> Settings:
    host = api_base.split("//", 1)[1].split(":", 1)[0]
    return Settings.model_validate({
        "server": {"normalizer_process": False, "public_url": "http://gateway.test"},
        "store": {"path": str(tmp_path / "slack.db"), "blob_dir": str(tmp_path / "blobs")},
        "outbox": {"relay": "inline", "poll_interval": 0.05},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"slack": {
            "api_base": f"{api_base}/api", "file_hosts": [host],
            "inboxes": {"support": {
                "signing_secret": SECRET, "previous_signing_secret": OLD_SECRET, "bot_token": BOT_TOKEN,
                "channels": ["C0SUPPORT", "C0SHARED"], **inbox,
            }},
        }},
    })


@pytest.fixture
async def slack(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeSlack:
    fake = FakeSlack()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def published(bus: MemoryPublisher, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(10), bus.changed:
        await bus.changed.wait_for(lambda: len(bus.published) >= count)
    return [validate_event(m.body) for m in bus.published]


async def post(client: Client, payload: bytes, *, secret: str = SECRET, at: float | None = None,
               headers: dict[str, str] | None = None) -> int:
    response = await client.post(URL, data=payload, headers={**signed_headers(secret, payload, at=at),
                                                              **(headers or {})})
    await response.release()
    return response.status


async def gateway(aiohttp_client: MakeClient, settings: Settings, bus: MemoryPublisher) -> Client:
    return await aiohttp_client(create_app(settings, Overrides(publisher=bus)))


async def test_url_verification_is_answered_with_the_challenge_once_signed(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base), MemoryPublisher())
    handshake = body({"token": "legacy", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
                      "type": "url_verification"})
    response = await client.post(URL, data=handshake, headers=signed_headers(SECRET, handshake))
    assert response.status == 200
    assert await response.json() == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    assert await post(client, handshake, secret="guessed") == 401


async def test_forged_stale_and_unsigned_requests_are_401_and_nothing_is_published(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base), bus)
    payload = body(dm(1, "forged"))
    assert await post(client, payload, secret="guessed-secret") == 401
    assert await post(client, payload, at=time.time() - 301) == 401  # outside the 5-minute window
    assert await post(client, payload, at=time.time() + 301) == 401
    unsigned = await client.post(URL, data=payload, headers={"Content-Type": "application/json"})
    assert unsigned.status == 401
    tampered = signed_headers(SECRET, payload)
    response = await client.post(URL, data=payload + b" ", headers=tampered)
    assert response.status == 401
    bad_timestamp = {**signed_headers(SECRET, payload), "X-Slack-Request-Timestamp": "yesterday"}
    assert (await client.post(URL, data=payload, headers=bad_timestamp)).status == 401
    not_utf8 = b"\xff\xfe not json"
    assert await post(client, not_utf8) == 401
    # The sentinel: a signed request with the previous secret (a rotation) is accepted.
    assert await post(client, body(dm(2, "sentinel")), secret=OLD_SECRET) == 200
    [event] = await published(bus, 1)
    assert event["message"]["text"] == "sentinel"
    metrics = await (await client.get("/metrics")).text()
    assert 'ticketgate_refusals_total{channel="slack",inbox="support",reason="signature"} 7.0' in metrics


async def test_a_message_its_retries_and_the_profile_email(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    slack.users["U000000003"] = {
        "id": "U000000003", "team_id": TEAM, "real_name": "Ana Lima", "is_bot": False,
        "profile": {"email": "ana@customer.example", "real_name": "Ana Lima", "display_name": "ana"},
    }
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base), bus)
    first = dm(3, "Where is my refund?", user="U000000003")
    retry_headers = {"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_timeout"}
    assert await post(client, body(first), headers=retry_headers) == 200
    # Slack retries the same event_id: answered 200, no second event.
    assert await post(client, body(first), headers={"X-Slack-Retry-Num": "3",
                                                    "X-Slack-Retry-Reason": "http_error"}) == 200
    second = dm(4, "Any news?", user="U000000003")
    assert await post(client, body(second)) == 200
    one, two = await published(bus, 2)
    assert one["type"] == "message.received"
    assert one["provenance"]["retry"] == 2
    assert one["provenance"]["retry_reason"] == "http_timeout"
    assert "retry_reason" not in two["provenance"]  # a first delivery has none
    assert one["message"]["extra"]["retry"] == {"num": 2, "reason": "http_timeout"}
    email = {"kind": "email", "value": "ana@customer.example", "verified": False}
    assert email in one["customer"]["identities"]
    assert {"kind": "slack", "value": f"{TEAM}:U000000003", "verified": True} in one["customer"]["identities"]
    assert one["customer"]["display_name"] == "ana"
    assert two["customer"]["id"] == one["customer"]["id"]
    assert slack.calls["users.info"] == 1  # cached
    await asyncio.sleep(0.2)
    assert len(bus.published) == 2


async def test_a_slow_users_info_does_not_hold_the_answer_and_fills_the_cache(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack, monkeypatch: pytest.MonkeyPatch
) -> None:
    slack.users["U000000008"] = {"id": "U000000008", "profile": {"email": "bo@customer.example"}}
    slack.delays["users.info"] = 1.5  # three times profile_timeout
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base), bus)
    mention = dm(8, "first", user="U000000008")
    assert await post(client, body(mention)) == 200
    # Slack was answered while users.info was still thinking; the lookup finishes in the background.
    assert slack.calls["users.info"] == 1
    assert slack.answered["users.info"] == 0
    await slack.wait(lambda: slack.answered["users.info"] == 1)
    # The same message again at once (Slack's app_mention twin, or its immediate retry): still no
    # email, so both copies are the same message and neither is quarantined as a reused key.
    twin = {**mention, "event_id": "Ev0TWIN", "event": {**mention["event"], "type": "app_mention"}}
    assert await post(client, body(twin)) == 200
    monkeypatch.setattr(Profiles, "GIVE_UP_WINDOW", 0.0)
    assert await post(client, body(dm(9, "second", user="U000000008"))) == 200
    first, second = await published(bus, 2)
    assert "idempotency_key_reused" not in await (await client.get("/metrics")).text()
    assert all(i["kind"] == "slack" for i in first["customer"]["identities"])
    email = {"kind": "email", "value": "bo@customer.example", "verified": False}
    assert email in second["customer"]["identities"]
    assert slack.calls["users.info"] == 1


async def test_a_token_without_the_email_scope_is_not_asked_again(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    slack.fail("users.info", "missing_scope")
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base), bus)
    assert await post(client, body(dm(5))) == 200
    assert await post(client, body(dm(6))) == 200
    events = await published(bus, 2)
    assert all(i["kind"] == "slack" for e in events for i in e["customer"]["identities"])
    assert slack.calls["users.info"] == 1


async def test_files_are_fetched_with_the_bot_token_into_the_blob_store(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    slack.files["F0SCREEN01"] = (b"\x89PNG real bytes", "image/png")
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base, profile_emails=False), bus)
    payload = (FIXTURES / "file_share.json").read_bytes()
    assert await post(client, payload) == 200
    [event] = await published(bus, 1)
    media = {m["ref"]: m for m in event["message"]["media"]}
    assert set(media) == {"F0SCREEN01", "F0LOGS0002"}  # the tombstone is listed in extra, not fetched
    path = media["F0SCREEN01"]["url"].removeprefix("http://gateway.test")
    async with asyncio.timeout(10):
        while (served := await client.get(path)).status == 202:
            await served.release()
            await asyncio.sleep(0.02)
    assert served.status == 200
    assert await served.read() == b"\x89PNG real bytes"
    # F0LOGS0002 is unknown to Slack (file_not_found): failed for good, the message is on the bus anyway.
    gone = media["F0LOGS0002"]["url"].removeprefix("http://gateway.test")
    async with asyncio.timeout(10):
        while (served := await client.get(gone)).status == 202:
            await served.release()
            await asyncio.sleep(0.02)
    assert served.status == 410


async def test_edits_deletions_bots_and_other_events(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base, profile_emails=False), bus)
    for name in ("dm_text", "message_changed", "message_changed_unfurl", "bot_message", "own_reply",
                 "reaction_added", "unfollowed_channel", "tokens_revoked", "message_deleted"):
        assert await post(client, (FIXTURES / f"{name}.json").read_bytes()) == 200, name
    received, edited, deleted = await published(bus, 3)
    assert [received["type"], edited["type"], deleted["type"]] == [
        "message.received", "message.edited", "message.deleted"
    ]
    assert edited["message"]["edit_of"] == received["message"]["id"]
    assert edited["thread"]["id"] == received["thread"]["id"]
    assert deleted["message"]["delete_of"] != received["message"]["id"]
    assert deleted["message"]["text"] is None
    await asyncio.sleep(0.2)
    assert len(bus.published) == 3


async def test_three_concurrent_deliveries_of_one_event_are_one_event(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    bus = MemoryPublisher()
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base, profile_emails=False), bus)
    event = {"type": "message", "channel": "C0SUPPORT", "channel_type": "channel", "user": "U0STORM",
             "team": TEAM, "text": "three times", "ts": "1764999999.000001"}
    payload = body(callback(event, event_id="Ev0STORM"))
    statuses = await asyncio.gather(*(post(client, payload) for _ in range(3)))
    assert statuses == [200, 200, 200]
    assert await post(client, body(dm(7, "sentinel"))) == 200
    events = await published(bus, 2)
    await asyncio.sleep(0.2)
    assert [e["message"]["text"] for e in validate_all(bus)] == ["three times", "sentinel"]
    assert events[0]["thread"]["is_new"] is True


def validate_all(bus: MemoryPublisher) -> list[dict[str, Any]]:
    return [validate_event(m.body) for m in bus.published]


async def test_a_body_that_is_not_a_callback_is_400_without_retry(
    aiohttp_client: MakeClient, tmp_path: Path, slack: FakeSlack
) -> None:
    client = await gateway(aiohttp_client, settings_for(tmp_path, slack.base), MemoryPublisher())
    payload = b'{"type": "event_callback", "event": '
    response = await client.post(URL, data=payload, headers=signed_headers(SECRET, payload))
    assert response.status == 400
    assert response.headers["X-Slack-No-Retry"] == "1"
    headers = signed_headers(SECRET, payload)
    unknown = await client.post("/slack/nobody/events", data=payload, headers=headers)
    assert unknown.status == 404
    rate_limited = body({"token": "x", "type": "app_rate_limited", "team_id": TEAM,
                         "minute_rate_limited": 1518467820, "api_app_id": "A0TICKETS"})
    assert await post(client, rate_limited) == 200
    assert orjson.loads(rate_limited)["type"] == "app_rate_limited"
