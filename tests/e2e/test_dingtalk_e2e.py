"""DingTalk on the real gateway process and the real bus: the signed HTTP callback, Stream mode
against a local Stream server with a connection cut mid-callback, and replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.connectors.dingtalk.fake_dingtalk import APP_KEY, APP_SECRET, FakeDingTalk
from tests.connectors.dingtalk.kit import CORP, STAFF, robot, signed_headers
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.e2e.test_slack_replies_e2e import publish, reply, wait_events
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration


def config(base: str, mode: str, control_queue: str | None = None) -> str:
    text = f"""
[channels.dingtalk]
api_base = "{base}"
oapi_base = "{base}"
stream_first_backoff = "100ms"
stream_max_backoff = "500ms"

[channels.dingtalk.inboxes.demo]
mode = "{mode}"
app_key = "{APP_KEY}"
app_secret = "{APP_SECRET}"
fetch_media = false
directory_emails = false
"""
    if control_queue is not None:
        text += f"""
[control]
queue = "{control_queue}"

[replies]
poll_interval = "0.2s"
backoff_base = "0.2s"
backoff_cap = "1s"
"""
    return text


@pytest.fixture
async def dingtalk(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeDingTalk:
    fake = FakeDingTalk()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def post(d: Deployment, body: bytes, *, secret: str = APP_SECRET, at: float | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{d.gateway.url}/dingtalk/demo", data=body, headers=signed_headers(secret, at=at)
        ) as resp,
    ):
        return resp.status


def texts(d: Deployment) -> list[str]:
    return [orjson.loads(r.body)["message"]["text"] for r in d.consumer.distinct()]


async def test_the_http_callback_gives_one_event_redeliveries_and_forgeries_none(
    deploy: MakeDeployment, dingtalk: FakeDingTalk
) -> None:
    d = await deploy(extra=config(dingtalk.base, "http"))
    body = orjson.dumps(robot(1, "打印机卡纸了"))
    assert await asyncio.gather(*(post(d, body) for _ in range(3))) == [200, 200, 200]
    assert await post(d, body, secret="guessed") == 401
    assert await post(d, body, at=time.time() - 7200) == 401
    assert await post(d, orjson.dumps(robot(2, "sentinel"))) == 200
    deliveries = await d.consumer.wait_for(2)
    event = validate_event(deliveries[0].body)
    assert deliveries[0].routing_key == "demo.dingtalk.message.received"
    assert {"kind": "dingtalk_staff_id", "value": f"{CORP}:{STAFF}", "verified": True} in event["customer"][
        "identities"
    ]
    await asyncio.sleep(0.5)
    assert texts(d) == ["打印机卡纸了", "sentinel"]


async def test_a_stream_connection_cut_mid_callback_loses_and_duplicates_nothing_on_the_bus(
    deploy: MakeDeployment, dingtalk: FakeDingTalk
) -> None:
    d = await deploy(extra=config(dingtalk.base, "stream"))
    await dingtalk.wait_for(lambda: dingtalk.connections == 1, within=20)
    first = await dingtalk.callback(robot(11, "before the cut"))
    await dingtalk.wait_for(lambda: first not in dingtalk.unacked, within=20)
    dingtalk.drop_after_next_callback = True
    cut = await dingtalk.callback(robot(12, "cut mid-callback"))
    await dingtalk.wait_for(lambda: dingtalk.connections >= 2 and cut not in dingtalk.unacked, within=20)
    last = await dingtalk.callback(robot(13, "after the cut"))
    await dingtalk.wait_for(lambda: last not in dingtalk.unacked, within=20)
    await d.consumer.wait_for(3)
    await asyncio.sleep(0.5)
    assert texts(d) == ["before the cut", "cut mid-callback", "after the cut"]
    for r in d.consumer.distinct():
        validate_event(r.body)


async def test_a_reply_goes_through_the_session_webhook(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, dingtalk: FakeDingTalk
) -> None:
    queue = amqp_names.queue("control")
    d = await deploy(extra=config(dingtalk.base, "http", control_queue=queue))
    assert await post(d, orjson.dumps(robot(21, "Need a new badge", webhook_base=dingtalk.base))) == 200
    [received] = await wait_events(d, "message.received", 1)
    await publish(
        amqp_url, queue, reply(received["thread"]["id"], "desk-dingtalk-1", "Pick it up at reception.")
    )
    [sent] = await wait_events(d, "reply.sent", 1)
    [posted] = dingtalk.sent
    assert posted["api"] == "session"
    assert posted["text"] == {"content": "Pick it up at reception."}
    assert sent["reply"]["command_id"] == "desk-dingtalk-1"
