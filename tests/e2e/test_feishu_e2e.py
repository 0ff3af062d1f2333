"""Feishu on the real gateway process and the real bus: signed, encrypted events, concurrent
redeliveries, forgeries and stale timestamps, the employee's directory email meeting their mail,
and a reply through the local Feishu API."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.connectors.feishu.fake_feishu import APP_SECRET, FakeFeishu
from tests.connectors.feishu.kit import APP_ID, EMPLOYEE, event, sealed, signed_headers
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.e2e.harness import free_port
from tests.e2e.test_slack_replies_e2e import publish, reply, wait_events
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

TOKEN, KEY = "e2e-feishu-token", "e2e-feishu-encrypt-key"
WORK_EMAIL = "wang.fang@corp.example"


def config(api_base: str, *, smtp_port: int | None = None, control_queue: str | None = None) -> str:
    text = f"""
[channels.feishu.inboxes.demo]
api_base = "{api_base}"
app_id = "{APP_ID}"
app_secret = "{APP_SECRET}"
verification_token = "{TOKEN}"
encrypt_key = "{KEY}"
fetch_media = false
"""
    if smtp_port is not None:
        text += f"""
[channels.email.smtp]
host = "127.0.0.1"
port = {smtp_port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["support@demo.localhost"]
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
async def feishu(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeFeishu:
    fake = FakeFeishu()
    fake.users[EMPLOYEE] = {"open_id": EMPLOYEE, "name": "Wang Fang", "enterprise_email": WORK_EMAIL}
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def post(
    session: aiohttp.ClientSession, d: Deployment, body: bytes, *, key: str = KEY, at: float | None = None
) -> int:
    async with session.post(
        f"{d.gateway.url}/feishu/demo", data=body, headers=signed_headers(key, body, at=at)
    ) as resp:
        return resp.status


def external_ids(d: Deployment) -> list[str]:
    return [orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.distinct()]


async def test_a_signed_encrypted_event_is_one_event_redeliveries_and_forgeries_none(
    deploy: MakeDeployment, feishu: FakeFeishu
) -> None:
    d = await deploy(extra=config(feishu.base))
    first = event(1, "我的电脑连不上 VPN", token=TOKEN)
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, sealed(first, KEY)) == 200
        [delivery] = await d.consumer.wait_for(1)
        received = validate_event(delivery.body)
        assert delivery.routing_key == "demo.feishu.message.received"
        assert received["message"]["text"] == "我的电脑连不上 VPN"
        assert received["message"]["external_id"] == first["event"]["message"]["message_id"]

        # Three concurrent redeliveries of another message (Feishu's retries: each its own envelope).
        second = event(2, "still down", token=TOKEN)
        copies = []
        for n in range(3):
            copy: dict[str, Any] = orjson.loads(orjson.dumps(second))
            copy["header"]["event_id"] = f"redelivery-{n}"
            copies.append(sealed(copy, KEY))
        assert await asyncio.gather(*(post(session, d, c) for c in copies)) == [200, 200, 200]

        # A forged signature and a stale timestamp: 401, nothing decrypted, nothing published.
        forged = sealed(event(3, "forged", token=TOKEN), KEY)
        assert await post(session, d, forged, key="guessed-key") == 401
        assert await post(session, d, forged, at=time.time() - 3600) == 401
        assert await post(session, d, sealed(event(4, "sentinel", token=TOKEN), KEY)) == 200
    await d.consumer.wait_until(lambda: len(d.consumer.distinct()) >= 3, within=20)
    await asyncio.sleep(0.5)
    assert external_ids(d) == [f"om_{n:032d}" for n in (1, 2, 4)]
    for r in d.consumer.distinct():
        validate_event(r.body)


def mail(message_id: str) -> bytes:
    return (
        f"From: Wang Fang <{WORK_EMAIL}>\r\nTo: support@demo.localhost\r\nSubject: VPN again\r\n"
        f"Message-ID: <{message_id}>\r\nDate: Sat, 05 Dec 2026 09:00:00 +0800\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nThe VPN is still down after the reset.\r\n"
    ).encode()


async def test_an_employee_on_feishu_and_by_mail_from_the_work_address_is_one_customer_one_thread(
    deploy: MakeDeployment, feishu: FakeFeishu
) -> None:
    port = free_port()
    d = await deploy(extra=config(feishu.base, smtp_port=port))
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, sealed(event(11, "VPN is down", token=TOKEN), KEY)) == 200
    await d.consumer.wait_for(1)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(WORK_EMAIL, ["support@demo.localhost"], mail("vpn-again@corp.example"))

    await asyncio.to_thread(send)
    deliveries = await d.consumer.wait_for(2)
    first, second = (validate_event(r.body) for r in deliveries[:2])
    assert second["message"]["channel"] == "email"
    assert second["customer"]["id"] == first["customer"]["id"]
    assert second["thread"]["id"] == first["thread"]["id"]
    identities = {(i["kind"], i["value"]) for i in second["customer"]["identities"]}
    assert ("feishu_open_id", f"{APP_ID}:{EMPLOYEE}") in identities
    assert ("email", WORK_EMAIL) in identities


async def test_a_reply_goes_back_into_the_feishu_chat(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, feishu: FakeFeishu
) -> None:
    queue = amqp_names.queue("control")
    d = await deploy(extra=config(feishu.base, control_queue=queue))
    limited = {"code": 99991400, "msg": "frequency limit"}
    feishu.script("create", (429, limited, {"x-ogw-ratelimit-reset": "1"}))
    async with aiohttp.ClientSession() as session:
        assert await post(session, d, sealed(event(21, "Printer jammed", token=TOKEN), KEY)) == 200
    [received] = await wait_events(d, "message.received", 1)
    command = reply(received["thread"]["id"], "desk-feishu-1", "A technician is on the way.")
    await publish(amqp_url, queue, command)
    [sent] = await wait_events(d, "reply.sent", 1)
    [posted] = feishu.sent
    assert posted["receive_id"] == "oc_5ad11d72b830411d72b836c20"
    assert orjson.loads(posted["content"]) == {"text": "A technician is on the way."}
    assert feishu.calls["create"] == 2  # the rate limit first, then sent
    assert sent["reply"]["command_id"] == "desk-feishu-1"
    assert sent["reply"]["provider_message_id"] == "om_sent000001"


async def test_the_long_connection_cut_mid_event_loses_and_duplicates_nothing_on_the_bus(
    deploy: MakeDeployment, feishu: FakeFeishu
) -> None:
    d = await deploy(
        extra=f"""
[channels.feishu]
ws_first_backoff = "100ms"
ws_max_backoff = "500ms"

[channels.feishu.inboxes.demo]
mode = "ws"
api_base = "{feishu.base}"
app_id = "{APP_ID}"
app_secret = "{APP_SECRET}"
fetch_media = false
directory_emails = false
"""
    )
    await feishu.wait_for(lambda: feishu.connections == 1, within=20)
    first = await feishu.push_event(event(51, "before the cut", token=TOKEN))
    await feishu.wait_for(lambda: first not in feishu.unanswered, within=20)
    feishu.drop_after_next_event = True
    cut = await feishu.push_event(event(52, "cut mid-event", token=TOKEN), parts=2)
    await feishu.wait_for(lambda: feishu.connections >= 2 and cut not in feishu.unanswered, within=20)
    last = await feishu.push_event(event(53, "after the cut", token=TOKEN))
    await feishu.wait_for(lambda: last not in feishu.unanswered, within=20)
    await d.consumer.wait_for(3)
    await asyncio.sleep(0.5)
    assert [orjson.loads(r.body)["message"]["text"] for r in d.consumer.distinct()] == [
        "before the cut",
        "cut mid-event",
        "after the cut",
    ]
    for r in d.consumer.distinct():
        validate_event(r.body)
