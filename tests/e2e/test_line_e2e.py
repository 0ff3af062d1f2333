"""LINE on the real gateway process and the real bus: signed deliveries, redeliveries, forgeries."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "line"
SECRET = "e2e-line-channel-secret"
CUSTOMER = "U4af4980629a5b6c7d8e9f0a1b2c3d4e5"
LINE = f"""
[inboxes.line-demo]
tenant = "demo"

[channels.line]
# Nothing answers here: media fetches fail, which must not hold any message back.
api_base = "http://127.0.0.1:9"
data_api_base = "http://127.0.0.1:9"

[channels.line.inboxes.line-demo]
channel_secret = "{SECRET}"
fetch_media = false
"""


def delivery(message_id: str, text: str, *, event_id: str | None = None) -> bytes:
    body: dict[str, Any] = orjson.loads((FIXTURES / "text.json").read_bytes())
    event = body["events"][0]
    event["message"].update(id=message_id, text=text)
    event["webhookEventId"] = event_id or f"01JE2E{message_id[-20:]:0>20}"
    return orjson.dumps(body)


def sign(body: bytes, secret: str = SECRET) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


async def post(
    session: aiohttp.ClientSession, d: Deployment, body: bytes, signature: str | None = None
) -> int:
    headers = {"Content-Type": "application/json", "X-Line-Signature": signature or sign(body)}
    async with session.post(f"{d.gateway.url}/line/line-demo", data=body, headers=headers) as resp:
        return resp.status


def external_ids(d: Deployment) -> list[str]:
    """External ids of the distinct events (an at-least-once repeat of one event counts once)."""
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_signed_deliveries_give_every_event_schema_valid_edits_and_unsends_included(
    deploy: MakeDeployment,
) -> None:
    d = await deploy(extra=LINE)
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, (FIXTURES / "batch_mixed.json").read_bytes()) == 200
        assert await post(session, d, (FIXTURES / "follow.json").read_bytes()) == 200
        assert await post(session, d, (FIXTURES / "text.json").read_bytes()) == 200
        assert await post(session, d, (FIXTURES / "edited.json").read_bytes()) == 200
        assert await post(session, d, (FIXTURES / "unsend.json").read_bytes()) == 200
    deliveries = await d.consumer.wait_for(6)
    events = [validate_event(r.body) for r in deliveries]
    keys = [r.routing_key for r in deliveries]
    changes = ["demo.line.message.edited", "demo.line.message.deleted"]
    assert keys == ["demo.line.message.received"] * 4 + changes
    texts = [e["message"]["text"] for e in events]
    assert texts[:2] == ["first", "second, another customer"]
    follow = events[2]
    assert follow["message"]["kind"] == "event"
    assert follow["message"]["extra"]["event"] == "follow"
    received, edit = events[3], events[4]
    assert {"kind": "line", "value": CUSTOMER, "verified": True} in received["customer"]["identities"]
    assert received["provenance"]["signature_verified"] is True
    assert edit["message"]["edit_of"] == received["message"]["id"]
    deleted = events[5]
    assert deleted["message"]["delete_of"] == received["message"]["id"]
    assert deleted["thread"]["id"] == received["thread"]["id"]


async def test_the_same_webhook_event_three_times_at_once_is_one_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=LINE)
    storm = delivery("534829601100000001", "the same event, delivered three times")
    body: dict[str, Any] = orjson.loads(storm)
    body["events"][0]["deliveryContext"]["isRedelivery"] = True
    redelivered = orjson.dumps(body)
    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(post(session, d, storm), post(session, d, storm),
                                        post(session, d, redelivered))
        assert statuses == [200, 200, 200]
        # A sentinel after the storm: once it is on the bus, anything the storm made is too.
        assert await post(session, d, delivery("534829601100000002", "sentinel")) == 200
    await d.consumer.wait_until(lambda: "534829601100000002" in external_ids(d), within=15)
    assert sorted(external_ids(d)) == ["534829601100000001", "534829601100000002"]


async def test_a_forged_delivery_is_401_and_publishes_nothing(deploy: MakeDeployment) -> None:
    d = await deploy(extra=LINE)
    forged = delivery("534829601100000003", "forged")
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, forged, signature=sign(forged, "guessed-secret")) == 401
        # Not even parsed: garbage with a wrong signature is refused the same way.
        assert await post(session, d, b"\x00not json", signature=sign(b"x")) == 401
        assert await post(session, d, delivery("534829601100000004", "sentinel")) == 200
    await d.consumer.wait_until(lambda: "534829601100000004" in external_ids(d), within=15)
    assert external_ids(d) == ["534829601100000004"]
    assert "line-demo: wrong X-Line-Signature" in d.gateway.log()
