"""Mini Program customer-service pushes (小程序客服消息): JSON and XML, safe and plain mode, the
handshake, the types, forgeries and hostile bodies. Encryption and signatures are wechatpy's own."""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from wechatpy.crypto import PrpCrypto
from wechatpy.utils import WeChatSigner

from connectors.wechat import MiniProgramConnector
from core.model import IdentityKind
from core.settings import Settings
from gateway.metrics import Metrics
from normalizers.wechat_miniprogram import parse_callback_json
from tests.connectors.wechat.test_wechat_callbacks import DEFUSED, FakeIngest
from tests.support.channels import set_up

TOKEN, AES_KEY, APP_ID = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", "wx0123456789abcdef"
NOW = 1_764_900_000
Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def json_message(**fields: Any) -> str:
    base = {"ToUserName": "gh_mini", "FromUserName": "oMini1", "CreateTime": NOW}
    return orjson.dumps({**base, **fields}).decode()


TEXT = json_message(MsgType="text", Content="订单什么时候发货？", MsgId=24700000000000001)
XML_TEXT = (
    "<xml><ToUserName><![CDATA[gh_mini]]></ToUserName><FromUserName><![CDATA[oMini1]]></FromUserName>"
    f"<CreateTime>{NOW}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
    "<Content><![CDATA[hello]]></Content><MsgId>24700000000000002</MsgId></xml>"
)


def settings(**app: Any) -> Settings:
    config = {"inbox": "mini", "app_id": APP_ID, "token": TOKEN, "encoding_aes_key": AES_KEY, **app}
    return Settings.model_validate({
        "tenants": {"acme": {}}, "inboxes": {"mini": {"tenant": "acme"}},
        "channels": {"miniprogram": {"max_body_bytes": 64 * 1024, "apps": {"demo": config}}},
    })


@pytest.fixture
def make_client(aiohttp_client: Any) -> MakeClient:
    async def make(
        ingest: FakeIngest, config: Settings | None = None, metrics: Metrics | None = None
    ) -> Client:
        config = config or settings()
        app = web.Application()
        connector = MiniProgramConnector.from_settings(config, clock=lambda: NOW)
        assert connector is not None
        set_up(app, connector, ingest, settings=config, metrics=metrics)
        client: Client = await aiohttp_client(app)
        return client

    return make


def sign(*parts: str) -> str:
    signer = WeChatSigner()
    signer.add_data(*parts)
    return str(signer.signature)


def safe_post(plaintext: str, *, as_json: bool = True, token: str = TOKEN) -> tuple[dict[str, str], bytes]:
    value = PrpCrypto(base64.b64decode(AES_KEY + "=")).encrypt(plaintext, APP_ID)
    encrypt = value.decode() if isinstance(value, bytes) else str(value)
    query = {"msg_signature": sign(token, str(NOW), "n0nce", encrypt), "timestamp": str(NOW),
             "nonce": "n0nce", "signature": sign(token, str(NOW), "n0nce"), "encrypt_type": "aes",
             "openid": "oMini1"}
    if as_json:
        body = orjson.dumps({"ToUserName": "gh_mini", "Encrypt": encrypt})
    else:
        body = (f"<xml><ToUserName><![CDATA[gh_mini]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>").encode()
    return query, body


def plain_query() -> dict[str, str]:
    return {"signature": sign(TOKEN, str(NOW), "n0nce"), "timestamp": str(NOW), "nonce": "n0nce"}


async def test_the_handshake_echoes_echostr_when_signed(make_client: MakeClient) -> None:
    client = await make_client(FakeIngest())
    answer = await client.get("/miniprogram/demo", params={**plain_query(), "echostr": "1234567890"})
    assert (answer.status, await answer.text()) == (200, "1234567890")
    forged = await client.get("/miniprogram/demo", params={**plain_query(), "signature": "0" * 40,
                                                           "echostr": "1234567890"})
    assert forged.status == 401


@pytest.mark.parametrize("as_json", [True, False], ids=["json", "xml"])
async def test_a_safe_mode_push_in_either_format_is_stored_then_answered_success(
    make_client: MakeClient, as_json: bool
) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = safe_post(TEXT if as_json else XML_TEXT, as_json=as_json)
    answer = await client.post("/miniprogram/demo", params=query, data=body)
    assert (answer.status, await answer.text()) == (200, "success")
    [envelope] = ingest.envelopes
    assert envelope.body == body
    assert envelope.signature_verified
    assert envelope.meta["format"] == ("json" if as_json else "xml")
    assert ingest.keys  # one message normalized


async def test_json_fields_become_the_official_accounts_message(make_client: MakeClient) -> None:
    from normalizers.wechat_miniprogram import normalize

    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = safe_post(TEXT)
    await client.post("/miniprogram/demo", params=query, data=body)
    [message] = normalize(ingest.envelopes[0])
    assert message.channel == "miniprogram"
    assert message.external_id == "24700000000000001"  # the 64-bit MsgId, exactly
    assert message.text == "订单什么时候发货？"
    identities = [(i.kind, i.value) for i in message.identities]
    assert identities == [(IdentityKind.WECHAT_OPENID, f"{APP_ID}:oMini1")]
    assert message.extra["account"] == "demo"
    assert message.extra["format"] == "json"


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"MsgType": "image", "PicUrl": "https://mmbiz.qpic.cn/x", "MediaId": "media-1", "MsgId": 3},
         lambda m: [(r.kind, r.ref) for r in m.media] == [("image", "media-1")]),
        ({"MsgType": "miniprogrampage", "MsgId": 4, "Title": "冬季外套", "AppId": APP_ID,
          "PagePath": "pages/item?id=9", "ThumbUrl": "https://x/t.jpg", "ThumbMediaId": "thumb-1"},
         lambda m: m.extra["page_path"] == "pages/item?id=9" and m.text == "冬季外套\npages/item?id=9"),
        ({"MsgType": "event", "Event": "user_enter_tempsession", "SessionFrom": "order-42"},
         lambda m: m.kind == "event" and m.extra["session_from"] == "order-42"
         and m.dedupe_key == f"event:oMini1:{NOW}:user_enter_tempsession:"),
        ({"MsgType": "text", "Content": "hi", "MsgId": 5, "UnionId": "uUnion1"},
         lambda m: (IdentityKind.WECHAT_UNIONID, "uUnion1") in [(i.kind, i.value) for i in m.identities]),
    ],
    ids=["image", "miniprogrampage", "user_enter_tempsession", "unionid"],
)
async def test_each_documented_type(make_client: MakeClient, fields: dict[str, Any], check: Any) -> None:
    from normalizers.wechat_miniprogram import normalize

    ingest = FakeIngest()
    client = await make_client(ingest)
    query, body = safe_post(json_message(**fields))
    assert (await client.post("/miniprogram/demo", params=query, data=body)).status == 200
    [message] = normalize(ingest.envelopes[0])
    assert check(message)


async def test_plain_mode_needs_the_opt_in_and_its_signature(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    refused = await make_client(ingest)
    assert (await refused.post("/miniprogram/demo", params=plain_query(), data=TEXT.encode())).status == 403
    client = await make_client(ingest, settings(mode="plaintext", allow_plaintext=True))
    for body in (TEXT, XML_TEXT):
        answer = await client.post("/miniprogram/demo", params=plain_query(), data=body.encode())
        assert (answer.status, await answer.text()) == (200, "success")
    forged = await client.post("/miniprogram/demo", params={**plain_query(), "signature": "1" * 40},
                               data=TEXT.encode())
    assert forged.status == 401
    assert len(ingest.envelopes) == 2


async def test_a_forged_push_is_refused_before_its_body_is_parsed(make_client: MakeClient) -> None:
    ingest, metrics = FakeIngest(), Metrics()
    client = await make_client(ingest, metrics=metrics)
    query, body = safe_post(TEXT)
    tampered = body[:-1] + b', "MsgType": [}'  # unparseable after the Encrypt member
    forged = {**query, "msg_signature": "0" * 40}
    answer = await client.post("/miniprogram/demo", params=forged, data=tampered)
    assert answer.status == 401  # not 400: nothing was parsed
    assert ingest.envelopes == []


async def test_xml_entities_are_refused_without_expansion(make_client: MakeClient) -> None:
    if not DEFUSED.is_dir():
        pytest.skip("corpus not present")
    ingest = FakeIngest()
    client = await make_client(ingest, settings(mode="plaintext", allow_plaintext=True))
    for name in ("xmlbomb.xml", "quadratic.xml", "external.xml", "dtd.xml"):
        started = time.monotonic()
        hostile = (DEFUSED / name).read_bytes()
        answer = await client.post("/miniprogram/demo", params=plain_query(), data=hostile)
        assert answer.status in (400, 413), name
        assert time.monotonic() - started < 5
    # The same inside an encrypted push.
    bomb = '<!DOCTYPE xml [<!ENTITY a "aaaaaaaaaa">]><xml><MsgType>text</MsgType><Content>&a;</Content></xml>'
    query, body = safe_post(bomb, as_json=False)
    safe = await make_client(ingest)
    assert (await safe.post("/miniprogram/demo", params=query, data=body)).status == 400
    assert ingest.envelopes == []


async def test_deep_or_huge_json_is_refused_without_harm(make_client: MakeClient) -> None:
    ingest = FakeIngest()
    client = await make_client(ingest, settings(mode="plaintext", allow_plaintext=True))
    deep = ('{"a":' * 5000 + "1" + "}" * 5000).encode()
    assert (await client.post("/miniprogram/demo", params=plain_query(), data=deep)).status == 400
    ten_deep: Any = 1
    for _ in range(10):
        ten_deep = {"k": ten_deep}
    nested = json_message(MsgType="text", Content="x", MsgId=1, Extra=ten_deep)
    assert (await client.post("/miniprogram/demo", params=plain_query(), data=nested.encode())).status == 400
    huge = json_message(MsgType="text", Content="x" * (128 * 1024), MsgId=1).encode()
    assert (await client.post("/miniprogram/demo", params=plain_query(), data=huge)).status == 413
    assert ingest.envelopes == []


def test_json_numbers_and_nulls_become_strings() -> None:
    fields = parse_callback_json(b'{"MsgId": 18446744073709551615, "CreateTime": 1, "X": null, "B": true}')
    assert fields == {"MsgId": "18446744073709551615", "CreateTime": "1", "X": "", "B": "1"}


async def test_an_encrypt_value_with_escaped_slashes_is_the_same_value(make_client: MakeClient) -> None:
    # JSON may write "/" as "\/"; the signature covers the unescaped value.
    ingest = FakeIngest()
    client = await make_client(ingest)
    for _ in range(20):  # until the random ciphertext holds a "/"
        query, body = safe_post(TEXT)
        if b"/" in body:
            break
    escaped = body.replace(b"/", b"\\/")
    answer = await client.post("/miniprogram/demo", params=query, data=escaped)
    assert (answer.status, await answer.text()) == (200, "success")
    assert len(ingest.envelopes) == 1
