"""Replies on LINE and X through the running gateway: a customer's message in, a desk's
``reply.requested`` on the control queue, the send at a local server that answers like LINE's
Messaging API or X's DM API (errors included), the outcome (and X's read receipt) on the bus."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.connectors.line.fake_api import FakeLine, rate_limited
from tests.connectors.x.fake_api import FakeX, forbidden
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LINE_SECRET, LINE_TOKEN = "e2e-line-reply-secret", "e2e-line-reply-token"
X_SECRET, X_KEY, X_TOKEN = "e2e-x-reply-secret", "e2e-x-consumer-key", "1432107654321098752-e2e-token"
ACCOUNT = "1432107654321098752"
MakeServer = Callable[..., Awaitable[TestServer]]


def config(queue: str, line_base: str, x_base: str) -> str:
    return f"""
[inboxes.line-demo]
tenant = "demo"

[inboxes.x-demo]
tenant = "demo"

[control]
queue = "{queue}"

[replies]
poll_interval = "0.2s"
backoff_base = "0.2s"
backoff_cap = "1s"

[channels.line]
api_base = "{line_base}"
data_api_base = "{line_base}"

[channels.line.inboxes.line-demo]
channel_secret = "{LINE_SECRET}"
channel_access_token = "{LINE_TOKEN}"
fetch_media = false

[channels.x]
api_base = "{x_base}"

[channels.x.apps.e2e]
consumer_key = "{X_KEY}"
consumer_secret = "{X_SECRET}"

[channels.x.apps.e2e.accounts."{ACCOUNT}"]
inbox = "x-demo"
access_token = "{X_TOKEN}"
access_token_secret = "e2e-x-token-secret"
fetch_media = false
"""


def line_signature(body: bytes) -> str:
    return base64.b64encode(hmac.new(LINE_SECRET.encode(), body, hashlib.sha256).digest()).decode()


def x_signature(body: bytes) -> str:
    return "sha256=" + base64.b64encode(hmac.new(X_SECRET.encode(), body, hashlib.sha256).digest()).decode()


async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.post(
        url, data=body, headers={"Content-Type": "application/json", **headers}
    ) as resp:
        return resp.status


async def publish(amqp_url: str, queue: str, command: dict[str, Any]) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(command), content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue,
        )


def events_of(d: Deployment, kind: str) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in d.consumer.distinct() if r.type == kind]


async def wait_events(d: Deployment, kind: str, count: int, within: float = 30.0) -> list[dict[str, Any]]:
    await d.consumer.wait_until(lambda: len(events_of(d, kind)) >= count, within=within)
    return events_of(d, kind)


def reply_command(thread_id: str, command_id: str, text: str) -> dict[str, Any]:
    return {"type": "reply.requested", "command_id": command_id, "thread_id": thread_id, "tenant": "demo",
            "text": text, "agent_name": "Ada"}


async def start(
    deploy: MakeDeployment, amqp_names: Janitor, aiohttp_server: MakeServer
) -> tuple[Deployment, str, FakeLine, FakeX]:
    line, x = FakeLine(token=LINE_TOKEN), FakeX(consumer_key=X_KEY, token=X_TOKEN)
    line_server, x_server = await aiohttp_server(line.app()), await aiohttp_server(x.app())
    queue = amqp_names.queue("control")
    d = await deploy(extra=config(queue, str(line_server.make_url("")), str(x_server.make_url(""))))
    return d, queue, line, x


async def test_a_line_message_is_answered_by_reply_token_then_by_push_through_a_rate_limit(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, aiohttp_server: MakeServer
) -> None:
    d, queue, line, _ = await start(deploy, amqp_names, aiohttp_server)
    body: dict[str, Any] = orjson.loads((FIXTURES / "line" / "text.json").read_bytes())
    event = body["events"][0]
    event["timestamp"] = int(time.time() * 1000)  # fresh: its reply token is still good
    line.valid_reply_tokens.add(event["replyToken"])
    raw = orjson.dumps(body)
    signed = {"X-Line-Signature": line_signature(raw)}
    assert await post(f"{d.gateway.url}/line/line-demo", raw, signed) == 200
    [received] = await wait_events(d, "message.received", 1)
    thread_id = received["thread"]["id"]

    await publish(amqp_url, queue, reply_command(thread_id, "line-1", "We are on it."))
    [sent] = await wait_events(d, "reply.sent", 1)
    assert line.sent[0]["call"] == "reply"
    assert line.sent[0]["replyToken"] == event["replyToken"]
    assert line.sent[0]["messages"] == [{"type": "text", "text": "We are on it."}]
    assert sent["reply"]["provider_message_id"] == "470000000001"

    # The token is spent: the next reply is a push, and LINE's 429 is waited out, not a failure.
    line.send_errors.append(rate_limited("1"))
    await publish(amqp_url, queue, reply_command(thread_id, "line-2", "Your parcel left today."))
    _, second = await wait_events(d, "reply.sent", 2)
    pushes = [s for s in line.sent if s["call"] == "push"]
    assert [p["to"] for p in pushes] == [event["source"]["userId"]]
    assert second["reply"]["attempts"] >= 2
    assert len(line.accepted) == 1  # one retry key: LINE would drop a repeat


async def test_an_x_dm_is_answered_by_dm_its_read_receipt_is_reported_and_a_refusal_fails(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, aiohttp_server: MakeServer
) -> None:
    d, queue, _, x = await start(deploy, amqp_names, aiohttp_server)
    raw = (FIXTURES / "x" / "dm_text.json").read_bytes()
    url = f"{d.gateway.url}/x/e2e"
    assert await post(url, raw, {"x-twitter-webhooks-signature": x_signature(raw)}) == 200
    [received] = await wait_events(d, "message.received", 1)
    thread_id = received["thread"]["id"]

    await publish(amqp_url, queue, reply_command(thread_id, "x-1", "We have re-sent it."))
    [sent] = await wait_events(d, "reply.sent", 1)
    assert x.sent == [{"participant": "1587654321098765432", "text": "We have re-sent it."}]
    provider_id = sent["reply"]["provider_message_id"]

    receipt = {"for_user_id": ACCOUNT, "direct_message_mark_read_events": [{
        "created_timestamp": str(int(time.time() * 1000)), "sender_id": "1587654321098765432",
        "target": {"recipient_id": ACCOUNT}, "last_read_event_id": provider_id}]}
    raw = orjson.dumps(receipt)
    assert await post(url, raw, {"x-twitter-webhooks-signature": x_signature(raw)}) == 200
    [read] = await wait_events(d, "reply.read", 1)
    assert read["reply"]["provider_message_id"] == provider_id

    x.send_errors.append(forbidden())
    await publish(amqp_url, queue, reply_command(thread_id, "x-2", "Are you there?"))
    [failed] = await wait_events(d, "reply.failed", 1)
    assert failed["reply"]["reason"] == "recipient_unreachable"
