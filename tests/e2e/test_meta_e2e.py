"""WhatsApp, Messenger and Instagram on the real gateway process and the real bus, through one
signed endpoint per Meta app: signed deliveries, redeliveries at once, forgeries, batches."""

from __future__ import annotations

import asyncio
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

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SECRET = "e2e-meta-app-secret"
META = f"""
[inboxes.wa-support]
tenant = "demo"

[channels.meta.apps.shop]
app_secret = "{SECRET}"
verify_token = "e2e-meta-verify"

[channels.whatsapp]
# Nothing answers here: media fetches fail, which must not hold any message back.
api_base = "http://127.0.0.1:9"
[channels.whatsapp.inboxes.wa-support]
app = "shop"
access_token = "e2e-whatsapp-token"

[channels.messenger]
api_base = "http://127.0.0.1:9"
[channels.messenger.inboxes.demo]
app = "shop"
access_token = "e2e-page-token"

[channels.instagram]
api_base = "http://127.0.0.1:9"
[channels.instagram.inboxes.demo]
app = "shop"
access_token = "e2e-instagram-token"
"""


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def whatsapp(n: int, text: str) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads((FIXTURES / "whatsapp" / "text.json").read_bytes())
    message = body["entry"][0]["changes"][0]["value"]["messages"][0]
    message.update(id=f"wamid.E2E{n:06d}", text={"body": text})
    return body


async def post(
    session: aiohttp.ClientSession, d: Deployment, body: bytes, signature: str | None = "sign"
) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = sign(body) if signature == "sign" else signature
    async with session.post(f"{d.gateway.url}/meta/shop", data=body, headers=headers) as resp:
        return resp.status


def external_ids(d: Deployment) -> list[str]:
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_a_signed_whatsapp_delivery_is_one_schema_valid_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=META)
    async with aiohttp.ClientSession() as session:
        params = {"hub.mode": "subscribe", "hub.verify_token": "e2e-meta-verify", "hub.challenge": "8841"}
        async with session.get(f"{d.gateway.url}/meta/shop", params=params) as resp:
            assert (resp.status, await resp.text()) == (200, "8841")
        assert await post(session, d, orjson.dumps(whatsapp(1, "Wo bleibt mein Paket?"))) == 200
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.whatsapp.message.received"
    assert event["message"]["text"] == "Wo bleibt mein Paket?"
    assert event["message"]["inbox"] == "wa-support"
    assert event["message"]["external_id"] == "wamid.E2E000001"
    identities = event["customer"]["identities"]
    assert {"kind": "whatsapp", "value": "4915112345678", "verified": True} in identities
    assert {"kind": "phone", "value": "+4915112345678", "verified": True} in identities
    assert event["provenance"]["signature_verified"] is True


async def test_the_same_wamid_three_times_at_once_is_one_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=META)
    storm = orjson.dumps(whatsapp(2, "the same message, delivered three times"))
    async with aiohttp.ClientSession() as session:
        assert await asyncio.gather(*(post(session, d, storm) for _ in range(3))) == [200, 200, 200]
        # A sentinel after the storm: once it is on the bus, anything the storm made is too.
        assert await post(session, d, orjson.dumps(whatsapp(3, "sentinel"))) == 200
    await d.consumer.wait_until(lambda: "wamid.E2E000003" in external_ids(d), within=15)
    assert sorted(external_ids(d)) == ["wamid.E2E000002", "wamid.E2E000003"]


async def test_a_forged_signature_is_401_and_nothing_is_parsed(deploy: MakeDeployment) -> None:
    d = await deploy(extra=META)
    body = orjson.dumps(whatsapp(4, "forged"))
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, body, signature=sign(body, "guessed-secret")) == 401
        assert await post(session, d, body, signature=None) == 401
        # Not even parsed: garbage with a wrong signature is refused the same way.
        assert await post(session, d, b"\x00not json", signature=sign(b"\x00not json", "guessed")) == 401
        assert await post(session, d, orjson.dumps(whatsapp(5, "sentinel"))) == 200
    await d.consumer.wait_until(lambda: "wamid.E2E000005" in external_ids(d), within=15)
    assert external_ids(d) == ["wamid.E2E000005"]
    assert "shop: wrong X-Hub-Signature-256" in d.gateway.log()


async def test_a_batch_of_several_entries_gives_every_message(deploy: MakeDeployment) -> None:
    d = await deploy(extra=META)
    batch = orjson.loads((FIXTURES / "whatsapp" / "batch_two_entries.json").read_bytes())
    page = (FIXTURES / "messenger" / "text.json").read_bytes()
    instagram = (FIXTURES / "instagram" / "text.json").read_bytes()
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, orjson.dumps(batch)) == 200
        assert await post(session, d, page) == 200
        assert await post(session, d, instagram) == 200
    received = await d.consumer.wait_for(5, within=15)
    events = [validate_event(r.body) for r in received]
    assert sorted(e["message"]["channel"] for e in events) == ["instagram", "messenger"] + ["whatsapp"] * 3
    assert {r.routing_key for r in received} >= {
        "demo.messenger.message.received",
        "demo.instagram.message.received",
    }


async def test_the_whatsapp_customer_and_the_phone_call_are_one_customer(deploy: MakeDeployment) -> None:
    d = await deploy(extra=META)
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, orjson.dumps(whatsapp(6, "Ich rufe gleich an."))) == 200
        call = {
            "kind": "call_record",
            "customer": {"phone": "+4915112345678"},
            "text": "Called about the late parcel; promised a callback.",
            "call": {"direction": "inbound", "duration_seconds": 95, "from_number": "+4915112345678"},
        }
        headers = {"Authorization": "Bearer e2e-test-key-0001"}
        async with session.post(f"{d.gateway.url}/api/v1/messages", json=call, headers=headers) as resp:
            assert resp.status == 202, await resp.text()
    received = await d.consumer.wait_for(2, within=15)
    events = [validate_event(r.body) for r in received]
    assert [e["message"]["channel"] for e in events] == ["whatsapp", "api"]
    assert len({e["customer"]["id"] for e in events}) == 1
