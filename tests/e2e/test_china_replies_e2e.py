"""Replies on Mini Program, Douyin and Weibo through the running gateway's dispatcher: a customer's
message in, a desk's ``reply.requested`` on the control queue, the send at a local server that
answers like the platform (errors included), the outcome on the bus; window rules included."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bench.wechat_send import as_json_callback, build_callback
from connectors.douyin.account import signature as douyin_signature
from connectors.weibo.account import signature as weibo_signature
from tests.connectors.douyin.fake_api import FakeDouyin
from tests.connectors.wechat.fake_api import APP_ID_2, APP_SECRET_2, FakeWeChatApi
from tests.connectors.weibo.fake_api import FakeWeibo
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

MakeServer = Callable[..., Awaitable[TestServer]]
TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DOUYIN_SECRET, DOUYIN_TOKEN, BRAND = "dev-douyin-secret", "act.e2e-douyin", "_000e2eBrand"
WEIBO_SECRET, WEIBO_TOKEN = "dev-weibo-secret", "2.00e2e-weibo"
WINDOW = 3.0  # Douyin's and Weibo's reply window here, so the test can outlive it


def config(queue: str, wechat: str, douyin: str, weibo: str) -> str:
    return f"""
[control]
queue = "{queue}"

[replies]
poll_interval = "0.2s"
backoff_base = "0.2s"
backoff_cap = "1s"

[channels.miniprogram.apps.demo]
inbox = "demo"
app_id = "{APP_ID_2}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
app_secret = "{APP_SECRET_2}"
api_base = "{wechat}"

[channels.douyin]
api_base = "{douyin}"
reply_window = "{WINDOW}s"

[channels.douyin.apps.demo]
inbox = "demo"
client_key = "awe2e"
client_secret = "{DOUYIN_SECRET}"
access_token = "{DOUYIN_TOKEN}"
account_open_id = "{BRAND}"

[channels.weibo]
api_base = "{weibo}"
reply_window = "{WINDOW}s"

[channels.weibo.accounts.demo]
inbox = "demo"
app_secret = "{WEIBO_SECRET}"
access_token = "{WEIBO_TOKEN}"
"""


class Rig:
    def __init__(
        self,
        d: Deployment,
        queue: str,
        amqp_url: str,
        wechat: FakeWeChatApi,
        douyin: FakeDouyin,
        weibo: FakeWeibo,
    ) -> None:
        self.d, self.queue, self.amqp_url = d, queue, amqp_url
        self.wechat, self.douyin, self.weibo = wechat, douyin, weibo
        self.commands = 0

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [validate_event(r.body) for r in self.d.consumer.distinct() if r.type == kind]

    async def wait(self, kind: str, count: int, within: float = 30.0) -> list[dict[str, Any]]:
        await self.d.consumer.wait_until(lambda: len(self.events(kind)) >= count, within=within)
        return self.events(kind)

    async def thread_of(self, channel: str, count: int = 1) -> str:
        """The thread of the ``count``-th message received on ``channel``."""
        await self.d.consumer.wait_until(lambda: len(self._received(channel)) >= count, within=15)
        return str(self._received(channel)[count - 1]["thread"]["id"])

    def _received(self, channel: str) -> list[dict[str, Any]]:
        return [e for e in self.events("message.received") if e["message"]["channel"] == channel]

    async def reply(self, thread_id: str, text: str) -> None:
        self.commands += 1
        command = {
            "type": "reply.requested",
            "command_id": f"china-{self.commands}",
            "thread_id": thread_id,
            "tenant": "demo",
            "text": text,
            "agent_name": "Ada",
        }
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(self.queue, durable=True)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(command),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=self.queue,
            )


@pytest.fixture
async def rig(deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor, aiohttp_server: MakeServer) -> Rig:
    wechat = FakeWeChatApi(token_apps={APP_ID_2: APP_SECRET_2})
    douyin, weibo = FakeDouyin(token=DOUYIN_TOKEN, account=BRAND), FakeWeibo(token=WEIBO_TOKEN)
    servers = [await aiohttp_server(fake.app()) for fake in (wechat, douyin, weibo)]
    urls = [str(s.make_url("")).rstrip("/") for s in servers]
    wechat.base_url = urls[0]
    queue = amqp_names.queue("control")
    d = await deploy(extra=config(queue, *urls))
    return Rig(d, queue, amqp_url, wechat, douyin, weibo)


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers or {}) as resp,
    ):
        return resp.status


async def test_a_mini_program_user_is_answered_and_wechats_45015_closes_the_window(rig: Rig) -> None:
    plaintext = orjson.dumps(
        {
            "ToUserName": "gh_mini",
            "FromUserName": "oMiniReply1",
            "CreateTime": int(time.time()),
            "MsgType": "text",
            "Content": "发票怎么开？",
            "MsgId": 24700000000009001,
        }
    ).decode()
    query, body = build_callback(plaintext, app_id=APP_ID_2)
    assert await post(f"{rig.d.gateway.url}/miniprogram/demo?{query}", as_json_callback(body)) == 200
    thread = await rig.thread_of("miniprogram")

    await rig.reply(thread, "请在订单页点击开票。")
    [sent] = await rig.wait("reply.sent", 1)
    assert [b for name, b in rig.wechat.sent if name == "custom_send"] == [
        {"touser": "oMiniReply1", "msgtype": "text", "text": {"content": "请在订单页点击开票。"}}
    ]
    assert sent["reply"]["provider_message_id"].startswith("rpl_")

    # WeChat says the 48 hours are over: a permanent window_closed, not retried.
    rig.wechat.fail_next("custom_send", {"errcode": 45015, "errmsg": "response out of time limit"})
    await rig.reply(thread, "还在吗？")
    [failed] = await rig.wait("reply.failed", 1)
    assert failed["reply"]["reason"] == "window_closed"


async def test_douyin_private_message_and_comment_replies_and_the_window(rig: Rig) -> None:
    url = f"{rig.d.gateway.url}/douyin/demo"

    async def push(event: dict[str, Any], msg_id: str) -> int:
        body = orjson.dumps(event)
        return await post(
            url,
            body,
            {
                "X-Douyin-Signature": douyin_signature(DOUYIN_SECRET, body),
                "Msg-Id": msg_id,
                "Content-Type": "application/json",
            },
        )

    im = {
        "event": "im_receive_msg",
        "client_key": "awe2e",
        "from_user_id": "_000e2eFan1",
        "to_user_id": BRAND,
        "content": {
            "conversation_short_id": "@conv1==",
            "server_message_id": "@m1==",
            "conversation_type": 1,
            "message_type": "text",
            "text": "耳机没有声音",
            "create_time": int(time.time() * 1000),
        },
    }
    comment = {
        "event": "item_comment_reply",
        "client_key": "awe2e",
        "from_user_id": "_000e2eFan2",
        "to_user_id": BRAND,
        "content": orjson.dumps(
            {
                "comment_id": "@c1==",
                "comment_user_id": "_000e2eFan2",
                "content": "还有货吗？",
                "create_time": int(time.time()),
                "reply_to_item_id": "@item1==",
            }
        ).decode(),
    }
    assert await push(im, "m-1") == 200
    assert await push(comment, "m-2") == 200
    im_thread = await rig.thread_of("douyin", 1)
    comment_thread = await rig.thread_of("douyin", 2)

    await rig.reply(im_thread, "已为您补发。")
    [sent] = await rig.wait("reply.sent", 1)
    assert rig.douyin.sent[0]["api"] == "im"
    assert rig.douyin.sent[0]["conversation_id"] == "@conv1=="
    assert sent["reply"]["provider_message_id"] == "@sent1=="

    await asyncio.sleep(WINDOW + 0.5)  # past the private-message window
    await rig.reply(im_thread, "还有别的问题吗？")
    [failed] = await rig.wait("reply.failed", 1)
    assert failed["reply"]["reason"] == "window_closed"
    # A comment has no window: its reply still goes, through the comment-reply API.
    await rig.reply(comment_thread, "有货，欢迎下单。")
    await rig.wait("reply.sent", 2)
    assert [s["api"] for s in rig.douyin.sent] == ["im", "comment"]
    assert rig.douyin.sent[1]["comment_id"] == "@c1=="


async def test_weibo_fans_are_answered_a_mention_once_and_not_after_the_window(rig: Rig) -> None:
    def query() -> str:
        ts, nonce = str(int(time.time() * 1000)), "57155157"
        return f"signature={weibo_signature(WEIBO_SECRET, ts, nonce)}&timestamp={ts}&nonce={nonce}"

    mention = {
        "type": "mention",
        "receiver_id": 1902538057,
        "sender_id": 2489518278,
        "created_at": "Fri Dec 05 16:00:05 +0800 2025",
        "text": "@示例品牌 客服电话打不通",
        "data": {"subtype": "status", "key": "4981234567890123"},
    }
    assert await post(f"{rig.d.gateway.url}/weibo/demo?{query()}", orjson.dumps(mention)) == 200
    thread = await rig.thread_of("weibo")

    await rig.reply(thread, "您好，请私信我们订单号。")
    await rig.wait("reply.sent", 1)
    assert rig.weibo.sent == [
        {
            "type": "text",
            "receiver_id": "2489518278",
            "data": {"text": "您好，请私信我们订单号。"},
            "save_sender_box": "1",
        }
    ]
    # Weibo allows one reply to a mention.
    await rig.reply(thread, "还在吗？")
    [failed] = await rig.wait("reply.failed", 1)
    assert failed["reply"]["reason"] == "window_closed"
    text = {
        "type": "text",
        "receiver_id": 1902538057,
        "sender_id": 2489518279,
        "created_at": "Fri Dec 05 16:01:00 +0800 2025",
        "text": "在吗",
        "data": {},
    }
    assert await post(f"{rig.d.gateway.url}/weibo/demo?{query()}", orjson.dumps(text)) == 200
    fan_thread = await rig.thread_of("weibo", 2)
    await asyncio.sleep(WINDOW + 0.5)  # the fan's 48 hours (here: seconds) are over
    await rig.reply(fan_thread, "抱歉回复晚了")
    await rig.wait("reply.failed", 2)
    assert len(rig.weibo.sent) == 1  # no call was made for either refusal
