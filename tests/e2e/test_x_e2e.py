"""X on the real gateway process and the real bus: the CRC, signed DMs, retries, echoes, forgeries."""

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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "x"
SECRET = "e2e-x-consumer-secret"
ACCOUNT, CUSTOMER = "1432107654321098752", "1587654321098765432"
X = f"""
[inboxes.x-demo]
tenant = "demo"

[channels.x]
api_base = "http://127.0.0.1:9"

[channels.x.apps.e2e]
consumer_secret = "{SECRET}"

[channels.x.apps.e2e.accounts."{ACCOUNT}"]
inbox = "x-demo"
fetch_media = false
"""


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def dm(event_id: str, text: str) -> bytes:
    body: dict[str, Any] = orjson.loads((FIXTURES / "dm_text.json").read_bytes())
    event = body["direct_message_events"][0]
    event["id"] = event_id
    event["message_create"]["message_data"]["text"] = text
    return orjson.dumps(body)


async def post(
    session: aiohttp.ClientSession, d: Deployment, body: bytes, signature: str | None = None
) -> int:
    headers = {"Content-Type": "application/json", "x-twitter-webhooks-signature": signature or sign(body)}
    async with session.post(f"{d.gateway.url}/x/e2e", data=body, headers=headers) as resp:
        return resp.status


def external_ids(d: Deployment) -> list[str]:
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_the_crc_and_a_signed_dm_give_one_schema_valid_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=X)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{d.gateway.url}/x/e2e", params={"crc_token": "e2e-token"}) as resp:
            assert resp.status == 200
            assert (await resp.json())["response_token"] == sign(b"e2e-token")
        assert await post(session, d, (FIXTURES / "dm_outgoing_echo.json").read_bytes()) == 200
        assert await post(session, d, dm("1864000000000200001", "Where is my refund?")) == 200
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.x.message.received"
    assert event["message"]["text"] == "Where is my refund?"
    assert event["message"]["inbox"] == "x-demo"
    assert {"kind": "x", "value": CUSTOMER, "verified": True} in event["customer"]["identities"]
    assert event["customer"]["display_name"] == "Mia Kowalski"


async def test_the_same_dm_three_times_at_once_is_one_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=X)
    storm = dm("1864000000000200002", "delivered three times")
    async with aiohttp.ClientSession() as session:
        assert await asyncio.gather(*(post(session, d, storm) for _ in range(3))) == [200, 200, 200]
        assert await post(session, d, dm("1864000000000200003", "sentinel")) == 200
    await d.consumer.wait_until(lambda: "1864000000000200003" in external_ids(d), within=15)
    assert sorted(external_ids(d)) == ["1864000000000200002", "1864000000000200003"]


async def test_a_forged_delivery_is_401_and_publishes_nothing(deploy: MakeDeployment) -> None:
    d = await deploy(extra=X)
    forged = dm("1864000000000200004", "forged")
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, forged, signature=sign(forged, "guessed-secret")) == 401
        assert await post(session, d, b"\x00not json", signature="sha256=AAAA") == 401
        assert await post(session, d, dm("1864000000000200005", "sentinel")) == 200
    await d.consumer.wait_until(lambda: "1864000000000200005" in external_ids(d), within=15)
    assert external_ids(d) == ["1864000000000200005"]
    assert "e2e: wrong x-twitter-webhooks-signature" in d.gateway.log()
