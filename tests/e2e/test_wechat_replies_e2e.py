"""Replies on WeChat, end to end: a message in -> its event on the real RabbitMQ -> the desk publishes
``reply.requested`` on the control queue -> the local WeChat server receives the send -> ``reply.sent``
(or ``reply.failed``) on the bus. The gateway is the real process; the WeChat server answers like
WeChat (tests/connectors/wechat/fake_api.py), errors included."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bench.wechat_send import build_callback, text_xml
from tests.connectors.wechat.fake_api import APP_ID, APP_SECRET, CORP_ID, CORP_SECRET, FakeWeChatApi
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
KFID = "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q"
EXTERNAL = "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"


def config(api_base: str, control_queue: str, lease: str = "120s") -> str:
    return f"""
[control]
queue = "{control_queue}"

[replies]
lease = "{lease}"

[inboxes.wechat-demo]
tenant = "demo"

[inboxes.kf-demo]
tenant = "demo"

[inboxes.wecom-demo]
tenant = "demo"

[channels.wecom.apps.desk]
inbox = "wecom-demo"
corp_id = "{CORP_ID}"
agent_id = 1000002
corp_secret = "{CORP_SECRET}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
api_base = "{api_base}"

[channels.wechat.accounts.demo]
inbox = "wechat-demo"
app_id = "{APP_ID}"
app_secret = "{APP_SECRET}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
api_base = "{api_base}"

[channels.wechat_kf]
poll_interval = "1h"

[channels.wechat_kf.apps.service]
inbox = "kf-demo"
corp_id = "{CORP_ID}"
secret = "{CORP_SECRET}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
api_base = "{api_base}"
open_kfids = ["{KFID}"]
"""


@pytest.fixture
async def wechat(aiohttp_server: Any) -> FakeWeChatApi:
    fake = FakeWeChatApi()
    server: TestServer = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


async def start(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_names: Janitor, lease: str = "120s"
) -> tuple[Deployment, str]:
    control_queue = amqp_names.queue("control")
    d = await deploy(extra=config(wechat.base_url, control_queue, lease))
    return d, control_queue


async def follower_writes(d: Deployment, text: str, *, openid: str, msg_id: int) -> None:
    query, body = build_callback(text_xml(text, openid=openid, msg_id=msg_id))
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.gateway.url}/wechat/demo?{query}", data=body
    ) as resp:
        assert (resp.status, await resp.text()) == (200, "success")


async def events(d: Deployment, event_type: str, count: int, within: float = 30.0) -> list[dict[str, Any]]:
    """The first ``count`` distinct events of ``event_type``, schema-checked."""

    def matching() -> list[dict[str, Any]]:
        bodies = [orjson.loads(r.body) for r in d.consumer.distinct()]
        return [body for body in bodies if body["type"] == event_type]

    await d.consumer.wait_until(lambda: len(matching()) >= count, within=within)
    found = matching()[:count]
    for event in found:
        validate_event(orjson.dumps(event))
    return found


async def desk_replies(amqp_url: str, control_queue: str, thread_id: str, text: str) -> str:
    """What a desk does: a persistent JSON reply.requested to the control queue; its command id."""
    command_id = f"desk-{uuid.uuid4()}"
    command = {"type": "reply.requested", "command_id": command_id, "thread_id": thread_id, "tenant": "demo",
               "text": text, "agent_name": "王芳"}
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(control_queue, durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(orjson.dumps(command), content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=control_queue,
        )
    return command_id


async def test_official_account_reply_goes_out_and_reply_sent_follows(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_url: str, amqp_names: Janitor
) -> None:
    d, control = await start(deploy, wechat, amqp_names)
    await follower_writes(d, "我的订单在哪里？", openid="oE2EReply1", msg_id=7001)
    [received] = await events(d, "message.received", 1)
    answer = "已经发货了，单号 SF1234567890。"
    command_id = await desk_replies(amqp_url, control, received["thread"]["id"], answer)

    [sent] = await events(d, "reply.sent", 1)
    assert sent["reply"]["command_id"] == command_id
    [(endpoint, body)] = wechat.sent
    assert endpoint == "custom_send"
    assert body == {"touser": "oE2EReply1", "msgtype": "text", "text": {"content": answer}}


async def test_a_refused_token_is_refreshed_once_and_the_reply_sent_once(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_url: str, amqp_names: Janitor
) -> None:
    d, control = await start(deploy, wechat, amqp_names)
    await follower_writes(d, "还在吗？", openid="oE2EReply2", msg_id=7002)
    [received] = await events(d, "message.received", 1)
    wechat.fail_next("custom_send", {"errcode": 40001, "errmsg": "invalid credential"})
    await desk_replies(amqp_url, control, received["thread"]["id"], "在的，请讲。")
    await events(d, "reply.sent", 1)
    assert len(wechat.sent) == 1
    assert [b["force_refresh"] for b in wechat.stable_calls()] == [False, False, True]


async def test_a_reply_outside_the_48_hour_window_fails_without_a_call(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_url: str, amqp_names: Janitor, tmp_path: Path
) -> None:
    d, control = await start(deploy, wechat, amqp_names)
    await follower_writes(d, "你好", openid="oE2EReply3", msg_id=7003)
    [received] = await events(d, "message.received", 1)
    # 49 hours pass: the follower's message is moved back in the store (the gateway is stopped).
    await d.gateway.stop()
    with sqlite3.connect(tmp_path / "data" / "ticketgate.db") as db:
        db.execute("UPDATE reply_routes SET received_at = received_at - ?", (49 * 3600 * 1_000_000,))
    await d.gateway.start()
    await desk_replies(amqp_url, control, received["thread"]["id"], "抱歉回复晚了。")

    [failed] = await events(d, "reply.failed", 1)
    assert failed["reply"]["reason"] == "window_closed"
    assert [c for c in wechat.calls if c[0] in ("custom_send", "stable_token")] == []


async def test_a_wechat_kf_reply_goes_out_with_its_msgid(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_url: str, amqp_names: Janitor
) -> None:
    wechat.kf_messages.append({
        "msgid": "kf-in-1", "open_kfid": KFID, "external_userid": EXTERNAL, "send_time": 1764900000,
        "origin": 3, "msgtype": "text", "text": {"content": "客服你好，退货怎么办理？"},
    })
    d, control = await start(deploy, wechat, amqp_names)  # the configured account is synced at start
    [received] = await events(d, "message.received", 1)
    assert received["message"]["channel"] == "wechat_kf"
    await desk_replies(amqp_url, control, received["thread"]["id"], "请在订单页点击“申请退货”。")

    [sent] = await events(d, "reply.sent", 1)
    [(endpoint, body)] = wechat.sent
    assert endpoint == "kf_send"
    assert (body["touser"], body["open_kfid"]) == (EXTERNAL, KFID)
    assert sent["reply"]["provider_message_id"] == body["msgid"]


async def test_a_wecom_member_gets_the_reply_as_an_app_message(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_url: str, amqp_names: Janitor
) -> None:
    d, control = await start(deploy, wechat, amqp_names)
    plaintext = text_xml("报销单号 4711 还没批", openid="zhangsan", msg_id=7101, agent_id=1000002)
    query, body = build_callback(plaintext, app_id=CORP_ID)
    async with aiohttp.ClientSession() as session, session.post(
        f"{d.gateway.url}/wecom/desk?{query}", data=body
    ) as resp:
        assert resp.status == 200
    [received] = await events(d, "message.received", 1)
    await desk_replies(amqp_url, control, received["thread"]["id"], "已催财务，今天内处理。")

    [sent] = await events(d, "reply.sent", 1)
    [(endpoint, sent_body)] = wechat.sent
    assert endpoint == "message_send"
    assert (sent_body["touser"], sent_body["agentid"]) == ("zhangsan", 1000002)
    assert sent["reply"]["provider_message_id"] == "wecom-msg-1"


async def test_a_kf_reply_resent_after_a_crash_is_one_message(
    deploy: MakeDeployment, wechat: FakeWeChatApi, amqp_url: str, amqp_names: Janitor
) -> None:
    wechat.kf_messages.append({
        "msgid": "kf-in-2", "open_kfid": KFID, "external_userid": EXTERNAL, "send_time": 1764900000,
        "origin": 3, "msgtype": "text", "text": {"content": "发票开了吗？"},
    })
    d, control = await start(deploy, wechat, amqp_names, lease="6s")
    [received] = await events(d, "message.received", 1)
    # WeChat takes the message, and the gateway dies before it hears so (and before its commit).
    wechat.kf_answer_gate = asyncio.Event()
    await desk_replies(amqp_url, control, received["thread"]["id"], "已开，请查收邮箱。")
    await asyncio.wait_for(wechat.send_received.wait(), 30)
    d.gateway.signal(signal.SIGKILL)
    assert await d.gateway.wait() == -signal.SIGKILL
    wechat.kf_answer_gate.set()
    wechat.kf_answer_gate = None

    await d.gateway.start()  # the reply is due again once its lease ran out: sent again
    [sent] = await events(d, "reply.sent", 1, within=60)
    attempts = [body for name, body in wechat.calls if name == "kf_send"]
    assert len(attempts) == 2
    assert attempts[0]["msgid"] == attempts[1]["msgid"] == sent["reply"]["provider_message_id"]
    assert len(wechat.sent) == 1  # one message for the customer
