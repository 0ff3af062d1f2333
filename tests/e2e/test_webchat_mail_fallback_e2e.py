"""The web chat's mail fallback on the real gateway process, RabbitMQ and a local smarthost
(aiosmtpd): a signed-in visitor chats over the WebSocket; a reply the open widget acknowledges
gets no mail; the visitor leaves, the next reply is held, and after the configured delay it goes
out by mail to their verified email, with ``reply.sent`` on channel ``email`` on the bus."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import aiohttp
import pytest

from tests.connectors.webchat.kit import ChatSocket
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.e2e.harness import free_port
from tests.e2e.test_webchat_e2e import publish_reply
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.integration

IDENTITY_SECRET = "e2e-chat-hmac-secret"
EMAIL = "ada@example.com"


def config(smtp_port: int, sink_port: int, control: str) -> str:
    return f"""
[channels.webchat]
session_secret = "e2e-chat-session-secret"

[channels.webchat.inboxes.demo]
identity_secret = "{IDENTITY_SECRET}"
demo_page = true

[channels.email.smtp]
host = "127.0.0.1"
port = {smtp_port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["support@demo.localhost"]

[channels.email.smarthost]
host = "127.0.0.1"
port = {sink_port}
security = "none"

[control]
queue = "{control}"

[replies]
poll_interval = "0.2s"

[[replies.fallback]]
channel = "webchat"
after = "3s"
"""


def signature(user_id: str, email: str) -> str:
    """As the site's backend signs a signed-in user (docs/channels/webchat.md)."""
    return hmac.new(IDENTITY_SECRET.encode(), f"{user_id}\n{email}".encode(), hashlib.sha256).hexdigest()


def events_of(d: Deployment, kind: str) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in d.consumer.distinct() if r.type == kind]


async def test_a_reply_the_visitor_never_received_goes_by_mail_after_the_delay(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor
) -> None:
    sink = await SmtpSink().start()
    try:
        control = amqp_names.queue("control")
        d = await deploy(extra=config(free_port(), sink.port, control))
        url = d.gateway.url
        identity = {"user_id": "u-42", "email": EMAIL, "signature": signature("u-42", EMAIL)}
        async with aiohttp.ClientSession() as http:
            visitor = ChatSocket(await http.ws_connect(f"{url}/chat/demo/ws", headers={"Origin": url}))
            await visitor.hello(identity=identity)
            ack = await visitor.say("client-fallback-1", "Is my refund approved?")
            assert ack["type"] == "ack", ack
            await d.consumer.wait_until(lambda: bool(events_of(d, "message.received")), within=30)
            [received] = events_of(d, "message.received")
            assert {"kind": "email", "value": EMAIL, "verified": True} in received["customer"]["identities"]
            thread_id = received["thread"]["id"]

            # The open widget receives the first reply and says so: no mail for it.
            await publish_reply(amqp_url, control, thread_id, "desk-fb-1", "Yes, approved today.")
            frame = await visitor.until("reply", timeout=30)
            await visitor.send({"type": "received", "ids": [frame["id"]]})
            await d.consumer.wait_until(lambda: bool(events_of(d, "reply.delivered")), within=30)

            # The visitor leaves; the next reply is held for them, then mailed after the delay.
            await visitor.close()
            await publish_reply(amqp_url, control, thread_id, "desk-fb-2", "The money is on its way.")
            [mail] = await sink.wait_for(1, timeout=60)
        assert mail.rcpt_tos == [EMAIL]
        assert "The money is on its way." in mail.message.get_content()
        await d.consumer.wait_until(lambda: len(events_of(d, "reply.sent")) >= 3, within=30)
        sent = events_of(d, "reply.sent")
        held = next(e for e in sent if e["reply"]["command_id"] == "desk-fb-2")
        assert held["reply"]["channel"] == "webchat"
        [mailed] = [e for e in sent if e["reply"]["channel"] == "email"]
        assert mailed["reply"]["fallback_of"] == held["reply"]["id"]
        assert mailed["reply"]["id"] != held["reply"]["id"]
        assert mailed["thread"]["id"] == thread_id
        assert f"<{mailed['reply']['provider_message_id']}>" == mail.message["Message-ID"]
        assert len(sink.mails) == 1  # the delivered reply was never mailed
    finally:
        await sink.close()
