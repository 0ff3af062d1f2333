"""Slack on the real gateway process and the real bus: signed callbacks, Slack's retries of one
event_id at once, forged and stale requests, an edit and a deletion."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.connectors.slack.kit import TEAM, callback, signed_headers
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

SECRET = "e2e-slack-signing-secret"
SLACK = f"""
[inboxes.slack-demo]
tenant = "demo"

[channels.slack]
# Nothing answers here: no Web API call may be needed to take a message.
api_base = "http://127.0.0.1:9/api"

[channels.slack.inboxes.slack-demo]
signing_secret = "{SECRET}"
bot_token = "xoxb-e2e-slack-bot-token"
channels = ["C0SUPPORT"]
fetch_files = false
profile_emails = false
"""


def message(n: int, text: str, **event: Any) -> bytes:
    ts = f"1764930{n:03d}.000{n:03d}"
    body = {"type": "message", "channel": "C0SUPPORT", "channel_type": "channel", "user": "U0E2E",
            "team": TEAM, "text": text, "ts": ts, "event_ts": ts, **event}
    return orjson.dumps(callback(body, event_id=f"Ev0E2E{n:04d}"))


async def post(session: aiohttp.ClientSession, d: Deployment, body: bytes, *, secret: str = SECRET,
               at: float | None = None, headers: dict[str, str] | None = None) -> int:
    url = f"{d.gateway.url}/slack/slack-demo/events"
    sent = {**signed_headers(secret, body, at=at), **(headers or {})}
    async with session.post(url, data=body, headers=sent) as response:
        return response.status


def external_ids(d: Deployment) -> list[str]:
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_a_signed_message_is_one_schema_valid_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=SLACK)
    async with aiohttp.ClientSession() as session:
        headers = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
        assert await post(session, d, message(1, "The export is empty"), headers=headers) == 200
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.slack.message.received"
    assert event["message"]["text"] == "The export is empty"
    assert event["message"]["external_id"] == "C0SUPPORT:1764930001.000001"
    assert {"kind": "slack", "value": f"{TEAM}:U0E2E", "verified": True} in event["customer"]["identities"]
    assert event["provenance"] == {
        **event["provenance"], "signature_verified": True, "retry": 1, "retry_reason": "http_timeout"
    }
    assert event["message"]["extra"]["retry"] == {"num": 1, "reason": "http_timeout"}


async def test_one_event_id_delivered_three_times_at_once_is_one_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=SLACK)
    storm = message(2, "the same event, three deliveries")
    async with aiohttp.ClientSession() as session:
        retries = [{}, {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"},
                   {"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_timeout"}]
        statuses = await asyncio.gather(*(post(session, d, storm, headers=h) for h in retries))
        assert statuses == [200, 200, 200]
        # A sentinel after the storm: once it is on the bus, anything the storm made is too.
        assert await post(session, d, message(3, "sentinel")) == 200
    await d.consumer.wait_until(lambda: "C0SUPPORT:1764930003.000003" in external_ids(d), within=15)
    assert sorted(external_ids(d)) == ["C0SUPPORT:1764930002.000002", "C0SUPPORT:1764930003.000003"]


async def test_forged_and_stale_requests_are_401_and_publish_nothing(deploy: MakeDeployment) -> None:
    d = await deploy(extra=SLACK)
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, message(4, "forged"), secret="guessed-secret") == 401
        assert await post(session, d, message(5, "stale"), at=time.time() - 600) == 401
        # Not even parsed: garbage with a wrong signature is refused the same way.
        assert await post(session, d, b"\x00not json", secret="guessed-secret") == 401
        assert await post(session, d, message(6, "sentinel")) == 200
    await d.consumer.wait_until(lambda: "C0SUPPORT:1764930006.000006" in external_ids(d), within=15)
    assert external_ids(d) == ["C0SUPPORT:1764930006.000006"]
    assert "slack slack-demo: wrong signature" in d.gateway.log()
    assert "slack slack-demo: stale request" in d.gateway.log()


async def test_an_edit_and_a_deletion_are_their_own_events(deploy: MakeDeployment) -> None:
    d = await deploy(extra=SLACK)
    original: dict[str, Any] = orjson.loads(message(7, "helo"))
    first = original["event"]
    where = {"channel": "C0SUPPORT", "channel_type": "channel", "hidden": True}
    edited = {"type": "message", "subtype": "message_changed", **where, "ts": "1764930100.000100",
              "event_ts": "1764930100.000100",
              "message": {**first, "text": "hello", "edited": {"user": "U0E2E", "ts": "1764930100.000000"}},
              "previous_message": first}
    deleted = {"type": "message", "subtype": "message_deleted", **where, "deleted_ts": first["ts"],
               "ts": "1764930200.000200", "event_ts": "1764930200.000200",
               "previous_message": {**first, "text": "hello"}}
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, orjson.dumps(original)) == 200
        assert await post(session, d, orjson.dumps(callback(edited, event_id="Ev0E2EEDIT"))) == 200
        assert await post(session, d, orjson.dumps(callback(deleted, event_id="Ev0E2EDEL"))) == 200
    received, edit, deletion = (validate_event(r.body) for r in await d.consumer.wait_for(3))
    assert [received["type"], edit["type"], deletion["type"]] == [
        "message.received", "message.edited", "message.deleted"
    ]
    assert edit["message"]["edit_of"] == received["message"]["id"] == deletion["message"]["delete_of"]
    assert received["thread"]["id"] == edit["thread"]["id"] == deletion["thread"]["id"]
