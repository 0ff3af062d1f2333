"""Telegram on the real gateway process and the real bus: signed webhook updates, retries, forgeries."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "telegram"
SECRET = "e2e-telegram-secret"
TELEGRAM = f"""
[inboxes.telegram-demo]
tenant = "demo"

[channels.telegram]
# Nothing answers here: media fetches fail, which must not hold any message back.
api_base = "http://127.0.0.1:9"

[channels.telegram.inboxes.telegram-demo]
bot_token = "123456:e2e-telegram-bot-token"
secret_token = "{SECRET}"
fetch_media = false
"""


def update(message_id: int, text: str) -> bytes:
    body: dict[str, Any] = orjson.loads((FIXTURES / "private_text.json").read_bytes())
    body["update_id"] = 900_000 + message_id
    body["message"].update(message_id=message_id, text=text)
    return orjson.dumps(body)


async def post(
    session: aiohttp.ClientSession, d: Deployment, body: bytes, secret: str | None = SECRET
) -> int:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    async with session.post(f"{d.gateway.url}/telegram/telegram-demo", data=body, headers=headers) as resp:
        return resp.status


def external_ids(d: Deployment) -> list[str]:
    """External ids of the distinct events (an at-least-once repeat of one event counts once)."""
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_a_signed_update_is_one_schema_valid_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=TELEGRAM)
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, update(7001, "Where is my parcel?")) == 200
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.telegram.message.received"
    assert event["message"]["text"] == "Where is my parcel?"
    assert event["message"]["external_id"] == "5123456789:7001"
    assert {"kind": "telegram", "value": "5123456789", "verified": True} in event["customer"]["identities"]
    assert event["provenance"]["signature_verified"] is True


async def test_an_edit_is_a_schema_valid_message_edited_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=TELEGRAM)
    original: dict[str, Any] = orjson.loads(update(7101, "helo"))
    edited = {"update_id": original["update_id"] + 1,
              "edited_message": {**original["message"], "text": "hello", "edit_date": 1764922000}}
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, orjson.dumps(original)) == 200
        assert await post(session, d, orjson.dumps(edited)) == 200
    first, second = await d.consumer.wait_for(2)
    received, edit = validate_event(first.body), validate_event(second.body)
    assert second.routing_key == "demo.telegram.message.edited"
    assert edit["message"]["edit_of"] == received["message"]["id"]
    assert edit["message"]["text"] == "hello"


async def test_the_same_update_three_times_at_once_is_one_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=TELEGRAM)
    storm = update(7002, "the same update, delivered three times")
    async with aiohttp.ClientSession() as session:
        assert await asyncio.gather(*(post(session, d, storm) for _ in range(3))) == [200, 200, 200]
        # A sentinel after the storm: once it is on the bus, anything the storm made is too.
        assert await post(session, d, update(7003, "sentinel")) == 200
    await d.consumer.wait_until(lambda: "5123456789:7003" in external_ids(d), within=15)
    assert sorted(external_ids(d)) == ["5123456789:7002", "5123456789:7003"]


async def test_a_forged_update_is_401_and_publishes_nothing(deploy: MakeDeployment) -> None:
    d = await deploy(extra=TELEGRAM)
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, update(7004, "forged"), secret="guessed-secret") == 401
        assert await post(session, d, update(7005, "unsigned"), secret=None) == 401
        # Not even parsed: garbage with a wrong token is refused the same way.
        assert await post(session, d, b"\x00not json", secret="guessed-secret") == 401
        assert await post(session, d, update(7006, "sentinel")) == 200
    await d.consumer.wait_until(lambda: "5123456789:7006" in external_ids(d), within=15)
    assert external_ids(d) == ["5123456789:7006"]
    assert "telegram-demo: wrong secret token" in d.gateway.log()
