"""WeChat on the real gateway process and the real bus: real encrypted callbacks (wechatpy's crypto)."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest

from bench.wechat_send import build_callback, text_xml
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.corpora import CORPORA as CORPORA_DIR
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

DEFUSED = CORPORA_DIR / "defusedxml"
APP_ID, TOKEN, AES_KEY = "wx0123456789abcdef", "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
WECHAT = f"""
[inboxes.wechat-demo]
tenant = "demo"

[channels.wechat.accounts.demo]
inbox = "wechat-demo"
app_id = "{APP_ID}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
mode = "safe"
"""


async def post(session: aiohttp.ClientSession, d: Deployment, plaintext: str) -> tuple[int, str]:
    query, body = build_callback(plaintext)
    async with session.post(f"{d.gateway.url}/wechat/demo?{query}", data=body) as resp:
        return resp.status, await resp.text()


def external_ids(d: Deployment) -> list[str]:
    """External ids of the distinct events (an at-least-once repeat of one event counts once)."""
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_text_callback_is_one_schema_valid_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=WECHAT)
    async with aiohttp.ClientSession() as session:
        status, answer = await post(session, d, text_xml("我的订单在哪里", openid="oE2E1", msg_id=1001))
    assert (status, answer) == (200, "success")
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.wechat.message.received"
    assert event["message"]["text"] == "我的订单在哪里"
    assert event["message"]["external_id"] == "1001"
    assert {"kind": "wechat_openid", "value": f"{APP_ID}:oE2E1", "verified": True} in event["customer"][
        "identities"
    ]
    assert event["provenance"]["signature_verified"] is True


async def test_a_concurrent_retry_storm_makes_one_event(deploy: MakeDeployment) -> None:
    d = await deploy(extra=WECHAT)
    storm = text_xml("重复的消息", openid="oE2E2", msg_id=2002)
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(*(post(session, d, storm) for _ in range(3)))
        assert answers == [(200, "success")] * 3
        # A sentinel after the storm: once it is on the bus, anything the storm made is too.
        assert await post(session, d, text_xml("sentinel", openid="oE2E2", msg_id=2003)) == (200, "success")
    await d.consumer.wait_until(lambda: "2003" in external_ids(d), within=15)
    assert sorted(external_ids(d)) == ["2002", "2003"]


async def test_a_callback_acknowledged_before_sigkill_is_published_after_restart(
    deploy: MakeDeployment,
) -> None:
    d = await deploy(extra=WECHAT)
    # Stop the relay from publishing first: nothing reaches the bus before the kill.
    await d.gateway.stop()
    d.gateway.env = {"TICKETGATE__BROKER__URL": "amqp://guest:guest@127.0.0.1:1/"}
    await d.gateway.start()
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, text_xml("killed right after", openid="oE2E3", msg_id=3003)) == (
            200,
            "success",
        )
    d.gateway.signal(signal.SIGKILL)
    assert await d.gateway.wait() == -signal.SIGKILL
    assert d.consumer.received == []
    d.gateway.env = {}
    await d.gateway.start()
    [delivery] = await d.consumer.wait_for(1, within=30)
    assert validate_event(delivery.body)["message"]["external_id"] == "3003"


ATTACKS = sorted(DEFUSED.glob("*.xml")) if DEFUSED.is_dir() else []


@pytest.mark.skipif(not ATTACKS, reason="defusedxml corpus not present")
async def test_xml_attack_files_get_4xx_and_publish_nothing(deploy: MakeDeployment) -> None:
    d = await deploy(extra=WECHAT)
    async with aiohttp.ClientSession() as session:
        for attack in ATTACKS:
            # Correctly signed and encrypted: the attack is what the gateway finds inside.
            status, _ = await post(session, d, attack.read_text(encoding="utf-8"))
            assert 400 <= status < 500, attack.name
            # And as the raw (outer) body, where it is refused before anything is parsed.
            query, _ = build_callback("<xml/>")
            async with session.post(f"{d.gateway.url}/wechat/demo?{query}", data=attack.read_bytes()) as resp:
                assert 400 <= resp.status < 500, attack.name
        assert await post(session, d, text_xml("sentinel", openid="oE2E4", msg_id=4004)) == (200, "success")
    await d.consumer.wait_until(lambda: "4004" in external_ids(d), within=15)
    assert external_ids(d) == ["4004"]
