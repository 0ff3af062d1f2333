"""Replies on the API channel, end to end: an app's message in -> its event -> the desk's
``reply.requested`` -> the app's callback receives the reply, signed -> ``reply.sent`` on the bus; an
app answering 422 ends the reply with ``reply.failed``."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.api.callback import SIGNATURE_HEADER, verify
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

KEY = "e2e-api-key-0123456789"
SECRET = "e2e-callback-secret-0123456789"


@dataclass
class App:
    """The app's callback endpoint: verifies the signature, keeps the reply, answers as told."""

    status: int = 200
    replies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(request.headers.get(SIGNATURE_HEADER, ""), body, SECRET, now=time.time()):
            return web.Response(status=400, text="bad signature")
        self.replies.append(orjson.loads(body))
        if self.status != 200:
            return web.Response(status=self.status, text="customer account closed")
        return web.json_response({"id": f"app-{len(self.replies)}"})


@pytest.fixture
async def app(aiohttp_server: Any) -> App:
    made = App()
    server_app = web.Application()
    server_app.router.add_post("/replies", made.handle)
    server: TestServer = await aiohttp_server(server_app)
    made.url = str(server.make_url("/replies"))
    return made


def config(callback_url: str, control_queue: str) -> str:
    return f"""
[control]
queue = "{control_queue}"

[inboxes.app-demo]
tenant = "demo"

[channels.api.inboxes.app-demo]
keys = ["{KEY}"]
callback_url = "{callback_url}"
callback_secrets = ["{SECRET}"]
"""


async def events(d: Deployment, event_type: str, count: int, within: float = 30.0) -> list[dict[str, Any]]:
    def matching() -> list[dict[str, Any]]:
        bodies = [orjson.loads(r.body) for r in d.consumer.distinct()]
        return [body for body in bodies if body["type"] == event_type]

    await d.consumer.wait_until(lambda: len(matching()) >= count, within=within)
    found = matching()[:count]
    for event in found:
        validate_event(orjson.dumps(event))
    return found


async def customer_writes(d: Deployment, text: str) -> None:
    body = {"customer": {"external_id": "u-42", "name": "李雷"}, "text": text}
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.gateway.url}/api/v1/messages", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        assert resp.status == 202


async def desk_replies(amqp_url: str, control_queue: str, thread_id: str, text: str) -> None:
    command = {"type": "reply.requested", "command_id": f"desk-{uuid.uuid4()}", "thread_id": thread_id,
               "tenant": "demo", "text": text}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(control_queue, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(command), content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=control_queue,
        )


async def test_the_reply_reaches_the_app_signed_and_reply_sent_has_its_id(
    deploy: MakeDeployment, app: App, amqp_url: str, amqp_names: Janitor
) -> None:
    control = amqp_names.queue("control")
    d = await deploy(extra=config(app.url, control))
    await customer_writes(d, "我的退款到哪一步了？")
    [received] = await events(d, "message.received", 1)
    await desk_replies(amqp_url, control, received["thread"]["id"], "已经退回到您的账户。")

    [sent] = await events(d, "reply.sent", 1)
    [reply] = app.replies
    assert (reply["text"], reply["customer_external_id"]) == ("已经退回到您的账户。", "u-42")
    assert reply["thread_id"] == received["thread"]["id"]
    assert sent["reply"]["provider_message_id"] == "app-1"


async def test_an_app_refusing_the_reply_ends_it(
    deploy: MakeDeployment, app: App, amqp_url: str, amqp_names: Janitor
) -> None:
    app.status = 422
    control = amqp_names.queue("control")
    d = await deploy(extra=config(app.url, control))
    await customer_writes(d, "还在吗？")
    [received] = await events(d, "message.received", 1)
    await desk_replies(amqp_url, control, received["thread"]["id"], "在的。")

    [failed] = await events(d, "reply.failed", 1)
    assert failed["reply"]["reason"] == "rejected"
    assert "customer account closed" in failed["reply"]["detail"]
    assert len(app.replies) == 1  # ended, not retried
