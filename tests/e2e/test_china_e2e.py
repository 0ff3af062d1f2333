"""Mini Program, Douyin and Weibo on the real gateway process and the real RabbitMQ: one signed push
is one schema-valid event, three concurrent redeliveries are one, forgeries and hostile bodies are
refused and publish nothing; a Mini Program image lands in the blob store; a Mini Program user and
the same person on the Official Account (one unionid) are one customer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bench.wechat_send import as_json_callback, build_callback, text_xml
from connectors.douyin.account import signature as douyin_signature
from connectors.weibo.account import signature as weibo_signature
from tests.connectors.wechat.fake_api import (
    APP_ID,
    APP_ID_2,
    APP_SECRET,
    APP_SECRET_2,
    FakeMedia,
    FakeWeChatApi,
)
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.support.corpora import CORPORA as CORPORA_DIR
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

MakeServer = Callable[..., Awaitable[TestServer]]
TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
DOUYIN_SECRET, WEIBO_SECRET = "dev-douyin-secret", "dev-weibo-secret"
DESK_KEY = "e2e-desk-key-000001"
NOW = int(time.time())
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def config(wechat_base: str = "http://127.0.0.1:9", *, with_secret: bool = False) -> str:
    secret = f'app_secret = "{APP_SECRET_2}"\napi_base = "{wechat_base}"' if with_secret else ""
    return f"""
[channels.identity]
keys = ["{DESK_KEY}"]

[channels.miniprogram.apps.demo]
inbox = "demo"
app_id = "{APP_ID_2}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
data_format = "json"
{secret}

[channels.douyin.apps.demo]
inbox = "demo"
client_key = "awdev0123456789"
client_secret = "{DOUYIN_SECRET}"

[channels.weibo.accounts.demo]
inbox = "demo"
app_secret = "{WEIBO_SECRET}"
"""


def mini_json(msg_id: int, text: str = "退款什么时候到账？", **fields: Any) -> str:
    return orjson.dumps(
        {
            "ToUserName": "gh_mini",
            "FromUserName": "oMiniE2E1",
            "CreateTime": NOW,
            "MsgType": "text",
            "Content": text,
            "MsgId": msg_id,
            **fields,
        }
    ).decode()


def mini_push(plaintext: str, *, as_json: bool = True) -> tuple[str, bytes]:
    query, body = build_callback(plaintext, app_id=APP_ID_2)
    return query, as_json_callback(body) if as_json else body


def douyin_push(n: int) -> tuple[dict[str, str], bytes]:
    # The same n is the same push (Douyin's retry repeats the body byte for byte).
    body = orjson.dumps(
        {
            "event": "im_receive_msg",
            "client_key": "awdev0123456789",
            "from_user_id": "_000e2eCustomer01",
            "to_user_id": "_000e2eBrand",
            "log_id": f"log{n}",
            "content": {
                "conversation_short_id": "@conv==",
                "server_message_id": f"@e2e{n}==",
                "conversation_type": 1,
                "message_type": "text",
                "text": f"耳机没有声音 {n}",
                "create_time": NOW * 1000 + n,
            },
        }
    )
    headers = {
        "Content-Type": "application/json",
        "Msg-Id": f"73110000{n}",
        "X-Douyin-Signature": douyin_signature(DOUYIN_SECRET, body),
    }
    return headers, body


def weibo_query(secret: str = WEIBO_SECRET) -> str:
    ts, nonce = str(int(time.time() * 1000)), "57155157"
    return f"signature={weibo_signature(secret, ts, nonce)}&timestamp={ts}&nonce={nonce}"


def weibo_push(n: int) -> bytes:
    return orjson.dumps(
        {
            "type": "text",
            "receiver_id": 1902538057,
            "sender_id": 2489518277,
            "created_at": f"Fri Dec 05 16:00:{n:02d} +0800 2025",
            "text": f"快递没动 {n}",
            "data": {},
        }
    )


Send = Callable[[aiohttp.ClientSession, Deployment, int], Awaitable[int]]


async def send_mini(session: aiohttp.ClientSession, d: Deployment, n: int) -> int:
    query, body = mini_push(mini_json(24700000000000000 + n))
    async with session.post(f"{d.gateway.url}/miniprogram/demo?{query}", data=body) as resp:
        assert await resp.text() == ("success" if resp.status == 200 else await resp.text())
        return resp.status


async def send_douyin(session: aiohttp.ClientSession, d: Deployment, n: int) -> int:
    headers, body = douyin_push(n)
    async with session.post(f"{d.gateway.url}/douyin/demo", data=body, headers=headers) as resp:
        return resp.status


async def send_weibo(session: aiohttp.ClientSession, d: Deployment, n: int) -> int:
    async with session.post(f"{d.gateway.url}/weibo/demo?{weibo_query()}", data=weibo_push(n)) as resp:
        return resp.status


SENDERS: dict[str, Send] = {"miniprogram": send_mini, "douyin": send_douyin, "weibo": send_weibo}


@pytest.mark.parametrize("channel", list(SENDERS))
async def test_a_push_is_one_event_and_three_concurrent_redeliveries_are_one(
    deploy: MakeDeployment, channel: str
) -> None:
    d = await deploy(extra=config())
    send = SENDERS[channel]
    async with aiohttp.ClientSession() as session:
        assert await send(session, d, 1) == 200
        [first] = await d.consumer.wait_for(1)
        event = validate_event(first.body)
        assert first.routing_key == f"demo.{channel}.message.received"
        assert event["provenance"]["signature_verified"] is True
        statuses = await asyncio.gather(*(send(session, d, 2) for _ in range(3)))
        assert statuses == [200, 200, 200]
        await d.consumer.wait_for(2)
        await asyncio.sleep(1.0)  # anything extra would have arrived by now
    received = [validate_event(r.body) for r in d.consumer.distinct()]
    assert len(received) == 2
    kinds = {"miniprogram": "wechat_openid", "douyin": "douyin_open_id", "weibo": "weibo"}
    assert all(e["customer"]["identities"][0]["kind"] == kinds[channel] for e in received)
    assert received[0]["customer"]["id"] == received[1]["customer"]["id"]


async def test_forgeries_and_hostile_bodies_are_refused_and_publish_nothing(deploy: MakeDeployment) -> None:
    d = await deploy(extra=config())
    url = d.gateway.url
    async with aiohttp.ClientSession() as session:
        # Forged: unsigned / wrongly signed, bodies that would not even parse.
        query, _ = mini_push(mini_json(1))
        forged_query = query.replace("msg_signature=", "msg_signature=0")
        async with session.post(f"{url}/miniprogram/demo?{forged_query}", data=b'{"Encrypt": "AAAA", [') as r:
            assert r.status == 401
        async with session.post(
            f"{url}/douyin/demo", data=b'{"event": [', headers={"X-Douyin-Signature": "0" * 40}
        ) as r:
            assert r.status == 401
        async with session.post(f"{url}/weibo/demo?{weibo_query('wrong')}", data=b'{"type": [') as r:
            assert r.status == 401
        # Hostile, signed: XML entities inside an encrypted XML push, and every corpus attack file.
        bomb = (
            '<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            "<xml><MsgType>text</MsgType><Content>&b;</Content></xml>"
        )
        query, body = mini_push(bomb, as_json=False)
        async with session.post(f"{url}/miniprogram/demo?{query}", data=body) as r:
            assert r.status == 400
        defused = CORPORA_DIR / "defusedxml"
        for path in sorted(defused.glob("*.xml")) if defused.is_dir() else []:
            query, body = mini_push(path.read_text(encoding="utf-8", errors="replace"), as_json=False)
            async with session.post(f"{url}/miniprogram/demo?{query}", data=body) as r:
                assert 400 <= r.status < 500, path.name
        # Deeply nested and huge JSON: in a Mini Program push, to Douyin, to Weibo.
        deep = '{"a":' * 5000 + "1" + "}" * 5000
        query, body = mini_push(deep)
        async with session.post(f"{url}/miniprogram/demo?{query}", data=body) as r:
            assert r.status in (400, 413)
        for raw in (
            b'{"event":"im_receive_msg","content":' + b"[" * 20000 + b"]" * 20000 + b"}",
            b'{"event":"im_receive_msg","content":{"text":"' + b"x" * (512 * 1024) + b'"}}',
        ):
            headers = {"X-Douyin-Signature": douyin_signature(DOUYIN_SECRET, raw)}
            async with session.post(f"{url}/douyin/demo", data=raw, headers=headers) as r:
                assert r.status in (400, 413)
            async with session.post(f"{url}/weibo/demo?{weibo_query()}", data=raw) as r:
                assert r.status in (400, 413)
        # Still healthy: a good push after all that is one event.
        assert await send_weibo(session, d, 9) == 200
    [only] = await d.consumer.wait_for(1)
    await asyncio.sleep(1.0)
    assert len(d.consumer.distinct()) == 1
    assert only.routing_key == "demo.weibo.message.received"


async def test_a_mini_program_image_is_fetched_into_the_blob_store(
    deploy: MakeDeployment, aiohttp_server: MakeServer
) -> None:
    fake = FakeWeChatApi(token_apps={APP_ID_2: APP_SECRET_2})
    fake.media["mini-media-1"] = FakeMedia(data=PNG, content_type="image/png", filename="receipt.png")
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    d = await deploy(extra=config(fake.base_url, with_secret=True))
    image = mini_json(
        24700000000000077, MsgType="image", PicUrl="https://mmbiz.qpic.cn/x", MediaId="mini-media-1"
    )
    query, body = mini_push(image)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{d.gateway.url}/miniprogram/demo?{query}", data=body) as resp:
            assert (resp.status, await resp.text()) == (200, "success")
        [delivery] = await d.consumer.wait_for(1)
        event = validate_event(delivery.body)
        [media] = event["message"]["media"]
        assert media["ref"] == "mini-media-1"
        deadline = time.monotonic() + 15
        while True:
            async with session.get(media["url"]) as resp:
                if resp.status == 200:
                    assert await resp.read() == PNG
                    break
                assert resp.status == 202
            assert time.monotonic() < deadline, "the image was not fetched"
            await asyncio.sleep(0.2)


async def test_a_mini_program_user_and_the_same_person_on_the_official_account_are_one_customer(
    deploy: MakeDeployment, aiohttp_server: MakeServer
) -> None:
    unionid = "oUnionE2E0000000000000000001"
    fake = FakeWeChatApi(token_apps={APP_ID: APP_SECRET, APP_ID_2: APP_SECRET_2})
    fake.users[(APP_ID, "oOfficialE2E1")] = {"unionid": unionid}
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    official = f"""
[channels.wechat.accounts.oa]
inbox = "demo"
app_id = "{APP_ID}"
token = "{TOKEN}"
encoding_aes_key = "{AES_KEY}"
app_secret = "{APP_SECRET}"
api_base = "{fake.base_url}"
fetch_unionid = true
"""
    d = await deploy(extra=config(fake.base_url, with_secret=True) + official)
    async with aiohttp.ClientSession() as session:
        # The follower writes to the Official Account; its unionid is looked up after the answer.
        query, body = build_callback(text_xml("公众号这边也问一下", openid="oOfficialE2E1", msg_id=5001))
        async with session.post(f"{d.gateway.url}/wechat/oa?{query}", data=body) as resp:
            assert (resp.status, await resp.text()) == (200, "success")
        [first] = await d.consumer.wait_for(1)
        customer = validate_event(first.body)["customer"]["id"]
        headers = {"Authorization": f"Bearer {DESK_KEY}"}
        deadline = time.monotonic() + 15
        while True:
            async with session.get(f"{d.gateway.url}/api/v1/customers/{customer}", headers=headers) as resp:
                kinds = {i["kind"] for i in (await resp.json())["identities"]}
            if "wechat_unionid" in kinds:
                break
            assert time.monotonic() < deadline, "the unionid was not linked"
            await asyncio.sleep(0.2)
        # The same person in the Mini Program's chat: the push carries the unionid.
        query, body = mini_push(mini_json(24700000000000500, "小程序里再问一次", UnionId=unionid))
        async with session.post(f"{d.gateway.url}/miniprogram/demo?{query}", data=body) as resp:
            assert resp.status == 200
        await d.consumer.wait_until(
            lambda: any(r.routing_key == "demo.miniprogram.message.received" for r in d.consumer.distinct()),
            within=15,
        )
    mini = next(
        validate_event(r.body)
        for r in d.consumer.distinct()
        if r.routing_key == "demo.miniprogram.message.received"
    )
    assert mini["customer"]["id"] == customer
    identities = {(i["kind"], i["value"]) for i in mini["customer"]["identities"]}
    assert ("wechat_openid", f"{APP_ID_2}:oMiniE2E1") in identities
    assert ("wechat_openid", f"{APP_ID}:oOfficialE2E1") in identities
    assert ("wechat_unionid", unionid) in identities
