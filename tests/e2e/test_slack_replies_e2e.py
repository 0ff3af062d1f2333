"""Slack replies on the running gateway and the real bus: a signed Slack message in, a desk's
``reply.requested`` on the control queue, chat.postMessage into the customer's Slack thread on a
local server answering like Slack, and the outcome on the bus (a rate limit first, then sent; a
channel Slack says is gone ends as reply.failed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiohttp
import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.connectors.slack.fake_slack import BOT_TOKEN, FakeSlack
from tests.connectors.slack.kit import TEAM, callback, signed_headers
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.rabbitmq import Janitor
from tests.support.schema import SCHEMA_DIR, validate_event

pytestmark = pytest.mark.integration

SECRET = "e2e-slack-reply-signing-secret"


def config(api_base: str, control_queue: str) -> str:
    return f"""
[inboxes.slack-demo]
tenant = "demo"

[channels.slack]
api_base = "{api_base}/api"

[channels.slack.inboxes.slack-demo]
signing_secret = "{SECRET}"
bot_token = "{BOT_TOKEN}"
channels = ["C0SUPPORT"]
fetch_files = false
profile_emails = false

[control]
queue = "{control_queue}"

[replies]
poll_interval = "0.2s"
backoff_base = "0.2s"
backoff_cap = "1s"
"""


@pytest.fixture
async def slack(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeSlack:
    fake = FakeSlack()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def customer_writes(d: Deployment, n: int, text: str, **event: Any) -> None:
    ts = f"1764940{n:03d}.000{n:03d}"
    body = orjson.dumps(callback(
        {"type": "message", "channel": "C0SUPPORT", "channel_type": "channel", "user": f"U0CUST{n}",
         "team": TEAM, "text": text, "ts": ts, "event_ts": ts, **event},
        event_id=f"Ev0REPLY{n:04d}",
    ))
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.gateway.url}/slack/slack-demo/events", data=body, headers=signed_headers(SECRET, body)
    ) as response:
        assert response.status == 200


async def publish(amqp_url: str, queue: str, command: dict[str, Any]) -> None:
    schema = orjson.loads((SCHEMA_DIR / "reply.requested.json").read_bytes())
    jsonschema.Draft202012Validator(schema).validate(command)
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


def reply(thread_id: str, command_id: str, text: str) -> dict[str, Any]:
    return {"type": "reply.requested", "command_id": command_id, "thread_id": thread_id, "tenant": "demo",
            "text": text, "agent_name": "Ada"}


async def test_a_reply_goes_into_the_customers_slack_thread_after_a_rate_limit(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, slack: FakeSlack
) -> None:
    queue = amqp_names.queue("control")
    d = await deploy(extra=config(slack.base, queue))
    await customer_writes(d, 1, "The invoice PDF is blank")
    [received] = await wait_events(d, "message.received", 1)
    slack.fail("chat.postMessage", "ratelimited", status=429, headers={"Retry-After": "1"})
    await publish(amqp_url, queue, reply(received["thread"]["id"], "desk-slack-1", "We are regenerating it."))
    [sent] = await wait_events(d, "reply.sent", 1)
    [posted] = slack.posted
    assert posted["channel"] == "C0SUPPORT"
    assert posted["thread_ts"] == "1764940001.000001"  # under the customer's message
    assert posted["text"] == "We are regenerating it."
    assert slack.calls["chat.postMessage"] == 2
    assert sent["reply"]["command_id"] == "desk-slack-1"
    assert sent["reply"]["provider_message_id"].startswith("C0SUPPORT:")

    # Our own message coming back as an event (Slack sends it: the app is in the channel) is ignored,
    # and the customer's answer in the Slack thread joins the ticket thread.
    own = {"bot_id": "B0TICKETS", "user": "U0BOT", "thread_ts": "1764940001.000001"}
    await customer_writes(d, 2, "We are regenerating it.", **own)
    await customer_writes(d, 3, "Thanks, got it", thread_ts="1764940001.000001", user="U0CUST1")
    _, answer = await wait_events(d, "message.received", 2)
    assert answer["thread"]["id"] == received["thread"]["id"]
    assert [e["message"]["text"] for e in events_of(d, "message.received")] == [
        "The invoice PDF is blank", "Thanks, got it"
    ]


async def test_a_channel_slack_says_is_gone_fails_the_reply(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, slack: FakeSlack
) -> None:
    queue = amqp_names.queue("control")
    d = await deploy(extra=config(slack.base, queue))
    await customer_writes(d, 4, "Hello?")
    [received] = await wait_events(d, "message.received", 1)
    slack.fail("chat.postMessage", "channel_not_found")
    await publish(amqp_url, queue, reply(received["thread"]["id"], "desk-slack-2", "Hi!"))
    [failed] = await wait_events(d, "reply.failed", 1)
    assert failed["reply"]["reason"] == "recipient_unreachable"
    assert slack.calls["chat.postMessage"] == 1
