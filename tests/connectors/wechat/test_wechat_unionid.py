"""Unionids from the user-info API: looked up after the answer, linked (and merged) through the graph."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fake_api import APP_ID, APP_ID_2, APP_SECRET, APP_SECRET_2, FakeWeChatApi
from wechatpy.crypto import WeChatCrypto as OfficialCrypto

from connectors.wechat import WeChatConnector
from connectors.wechat.api import WeChatApi
from connectors.wechat.unionid import UnionIdResolver, marker_key
from core.channel import ChannelState
from core.settings import OutboxSettings, Settings, StoreSettings
from dedupe import graph
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.store.sqlite import SQLiteStore
from tests.support.channels import set_up

NOW = 1_718_000_000
DAY = 86400
TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPS = {"brand_a": (APP_ID, APP_SECRET, "wx-a"), "brand_b": (APP_ID_2, APP_SECRET_2, "wx-b")}


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def text_xml(openid: str, msg_id: str, *, unionid: str | None = None) -> str:
    extra = f"<UnionId><![CDATA[{unionid}]]></UnionId>" if unionid else ""
    return (
        f"<xml><ToUserName><![CDATA[gh_brand]]></ToUserName><FromUserName><![CDATA[{openid}]]></FromUserName>"
        f"<CreateTime>{NOW}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[my order has not arrived yet]]></Content><MsgId>{msg_id}</MsgId>{extra}</xml>"
    )


def encrypted(plaintext: str, app_id: str) -> tuple[dict[str, str], bytes]:
    reply = OfficialCrypto(TOKEN, AES_KEY, app_id).encrypt_message(plaintext, "n0nce", str(NOW))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    body = f"<xml><ToUserName><![CDATA[gh_x]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    query = {"timestamp": str(NOW), "nonce": "n0nce", "encrypt_type": "aes", "msg_signature": signature}
    return query, body.encode()


def config(
    fake: FakeWeChatApi, tmp_path: Path, *, fetch_unionid: bool = True, secret: bool = True
) -> Settings:
    accounts: dict[str, Any] = {}
    for name, (app_id, app_secret, inbox) in APPS.items():
        accounts[name] = {
            "inbox": inbox,
            "app_id": app_id,
            "token": TOKEN,
            "encoding_aes_key": AES_KEY,
            "api_base": fake.base_url,
            "fetch_unionid": fetch_unionid,
        }
        if secret:
            accounts[name]["app_secret"] = app_secret
    return Settings.model_validate(
        {
            "store": {
                "path": str(tmp_path / "tg.db"),
                "blob_dir": str(tmp_path / "blobs"),
                "min_free_disk_mb": 0,
            },
            "tenants": {"acme": {}},
            "inboxes": {"wx-a": {"tenant": "acme"}, "wx-b": {"tenant": "acme"}},
            "channels": {"wechat": {"accounts": accounts}},
        }
    )


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeWeChatApi:
    api = FakeWeChatApi()
    server: TestServer = await aiohttp_server(api.app())
    api.base_url = str(server.make_url("")).rstrip("/")
    return api


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    settings = StoreSettings.model_validate(
        {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )
    instance = SQLiteStore(settings, OutboxSettings())
    await instance.open()
    yield instance
    await instance.close()


async def _no_pause(seconds: float) -> None:
    return None


class Rig:
    """Both Official Accounts on the real pipeline and store; lookups awaited with ``join``."""

    def __init__(
        self,
        client: TestClient[web.Request, web.Application],
        resolver: UnionIdResolver,
        store: SQLiteStore,
        state: ChannelState,
    ) -> None:
        self.client, self.resolver, self.store, self.state = client, resolver, store, state

    async def marker(self, app_id: str, openid: str) -> bytes | None:
        return await self.state.get(marker_key(app_id, openid))

    async def post(self, account: str, plaintext: str) -> int:
        query, body = encrypted(plaintext, APPS[account][0])
        response = await self.client.post(f"/wechat/{account}", params=query, data=body)
        return response.status

    async def events(self, type_: str) -> list[dict[str, Any]]:
        rows = await self.store.outbox_fetch(1000)
        return [orjson.loads(r.body) for r in rows if r.type == type_]


@pytest.fixture
async def clock() -> Clock:
    return Clock()


@pytest.fixture
async def rig(
    fake: FakeWeChatApi, store: SQLiteStore, tmp_path: Path, clock: Clock, aiohttp_client: Any
) -> AsyncIterator[Rig]:
    settings = config(fake, tmp_path)
    connector = WeChatConnector.from_settings(settings, clock=clock)
    assert connector is not None
    resolver = connector.unionid_resolver()
    assert resolver is not None
    pipeline = Pipeline(settings, store, Metrics())
    # The channel's real context on the store, set up on an app that is never started: its state and
    # identity links without the connector's own lookups (this resolver is the one under test).
    ctx = set_up(web.Application(), connector, pipeline.ingest, settings=settings, store=store)
    resolver.bind(ctx.state, ctx.identities)
    app = web.Application()
    app.add_subapp("/wechat", connector.build_subapp(ctx.ingest, unionid=resolver))
    async with aiohttp.ClientSession() as session:
        # One in-call retry, without its pause: the busy-API path is under test, not the client's timing.
        apis = {
            name: WeChatApi(session, endpoint.credentials, retries=1, sleep=_no_pause)
            for name, endpoint in connector.endpoints.items()
            if endpoint.credentials is not None
        }
        resolver.start(apis)
        yield Rig(await aiohttp_client(app), resolver, store, ctx.state)


def user_info_calls(fake: FakeWeChatApi) -> list[dict[str, Any]]:
    return [q for name, q in fake.calls if name == "user_info"]


async def test_the_same_unionid_on_a_second_account_merges_the_customers(
    rig: Rig, fake: FakeWeChatApi
) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    fake.users[(APP_ID_2, "oUserB")] = {"unionid": "uPerson1"}

    assert await rig.post("brand_a", text_xml("oUserA", "1001")) == 200
    await rig.resolver.join()
    assert await rig.post("brand_b", text_xml("oUserB", "2001")) == 200
    await rig.resolver.join()

    assert [q["openid"] for q in user_info_calls(fake)] == ["oUserA", "oUserB"]
    assert all(q["lang"] == "zh_CN" and q["access_token"] for q in user_info_calls(fake))
    first, second = await rig.events("message.received")
    customer_a, customer_b = first["customer"]["id"], second["customer"]["id"]
    assert customer_a != customer_b  # placed before the unionid was known

    (merged,) = await rig.events("customer.merged")
    assert merged["customer"] == {"id": customer_b, "merged": [customer_a]}
    assert merged["merge"]["evidence"]["source"] == "wechat_api"
    summary = await rig.store.transact(graph.customer_summary(customer_b))
    assert summary is not None
    identities = {(i.kind, i.value, i.verified) for i in summary.identities}
    assert ("wechat_unionid", "uPerson1", True) in identities
    assert {f"{APP_ID}:oUserA", f"{APP_ID_2}:oUserB"} <= {v for _, v, _ in identities}

    # The next message to the first account lands on the surviving customer, without a new lookup.
    assert await rig.post("brand_a", text_xml("oUserA", "1002")) == 200
    await rig.resolver.join()
    assert (await rig.events("message.received"))[-1]["customer"]["id"] == customer_b
    assert len(user_info_calls(fake)) == 2


async def test_a_unionid_not_seen_before_is_added_to_the_customer_without_a_merge(
    rig: Rig, fake: FakeWeChatApi
) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    assert await rig.post("brand_a", text_xml("oUserA", "1001")) == 200
    await rig.resolver.join()
    (received,) = await rig.events("message.received")
    summary = await rig.store.transact(graph.customer_summary(received["customer"]["id"]))
    assert summary is not None
    assert ("wechat_unionid", "uPerson1", True) in {(i.kind, i.value, i.verified) for i in summary.identities}
    assert await rig.events("customer.merged") == []
    raw = await rig.marker(APP_ID, "oUserA")
    assert raw is not None
    assert orjson.loads(raw)["unionid"] == "uPerson1"
    # Kept in the channel's namespace of the store.
    assert await rig.store.state_get("wechat/" + marker_key(APP_ID, "oUserA")) == raw


async def test_the_answer_does_not_wait_for_the_lookup(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    fake.user_info_gate = asyncio.Event()
    assert await rig.post("brand_a", text_xml("oUserA", "1001")) == 200
    assert await rig.marker(APP_ID, "oUserA") is None  # not linked yet
    fake.user_info_gate.set()
    await rig.resolver.join()
    assert await rig.marker(APP_ID, "oUserA") is not None


async def test_a_message_with_its_unionid_needs_no_lookup(rig: Rig, fake: FakeWeChatApi) -> None:
    assert await rig.post("brand_a", text_xml("oUserA", "1001", unionid="uPerson1")) == 200
    await rig.resolver.join()
    assert user_info_calls(fake) == []


async def test_a_known_openid_is_not_looked_up_again(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    # A retry storm and a later message: one lookup.
    await asyncio.gather(*(rig.post("brand_a", text_xml("oUserA", "1001")) for _ in range(3)))
    assert await rig.post("brand_a", text_xml("oUserA", "1002")) == 200
    await rig.resolver.join()
    assert await rig.post("brand_a", text_xml("oUserA", "1003")) == 200
    await rig.resolver.join()
    assert len(user_info_calls(fake)) == 1


async def test_no_unionid_is_asked_again_only_after_a_day(
    rig: Rig, fake: FakeWeChatApi, clock: Clock
) -> None:
    fake.users[(APP_ID, "oUserA")] = {}  # the account is not bound to an Open Platform account (yet)
    assert await rig.post("brand_a", text_xml("oUserA", "1001")) == 200
    await rig.resolver.join()
    assert await rig.resolver.resolve("brand_a", "acme", "oUserA") is None
    assert len(user_info_calls(fake)) == 1

    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    clock.now += DAY - 1
    assert await rig.resolver.resolve("brand_a", "acme", "oUserA") is None
    clock.now += 1
    assert await rig.resolver.resolve("brand_a", "acme", "oUserA") == "uPerson1"
    assert len(user_info_calls(fake)) == 2


async def test_an_expired_token_is_refreshed_once(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    fake.users[(APP_ID, "oUserC")] = {"unionid": "uPerson3"}
    assert await rig.resolver.resolve("brand_a", "acme", "oUserA") == "uPerson1"
    fake.expire_tokens()
    assert await rig.resolver.resolve("brand_a", "acme", "oUserC") == "uPerson3"
    assert fake.token_fetches == 2


async def test_a_rate_limit_pauses_lookups_and_never_loses_the_message(
    rig: Rig, fake: FakeWeChatApi, clock: Clock
) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    # 45009 on the call and on its one in-call retry.
    fake.fail_next("user_info", *[{"errcode": 45009, "errmsg": "reach max api daily quota limit"}] * 2)
    assert await rig.post("brand_a", text_xml("oUserA", "1001")) == 200
    await rig.resolver.join()
    assert len(await rig.events("message.received")) == 1
    assert await rig.marker(APP_ID, "oUserA") is None
    assert len(user_info_calls(fake)) == 2

    # Paused: the next message asks nothing; after the pause it does.
    assert await rig.post("brand_a", text_xml("oUserA", "1002")) == 200
    await rig.resolver.join()
    assert len(user_info_calls(fake)) == 2
    clock.now += 60
    assert await rig.post("brand_a", text_xml("oUserA", "1003")) == 200
    await rig.resolver.join()
    assert len(user_info_calls(fake)) == 3
    assert await rig.marker(APP_ID, "oUserA") is not None
    assert len(await rig.events("message.received")) == 3


async def test_a_refused_lookup_is_logged_and_remembered_for_a_day(
    rig: Rig, fake: FakeWeChatApi, caplog: pytest.LogCaptureFixture
) -> None:
    # 48001: the account has no permission for the user-info API (e.g. not verified).
    fake.fail_next("user_info", {"errcode": 48001, "errmsg": "api unauthorized"})
    assert await rig.post("brand_a", text_xml("oUserA", "1001")) == 200
    await rig.resolver.join()
    assert "48001" in caplog.text
    assert await rig.post("brand_a", text_xml("oUserA", "1002")) == 200
    await rig.resolver.join()
    assert len(user_info_calls(fake)) == 1
    assert len(await rig.events("message.received")) == 2


@pytest.mark.parametrize(("fetch_unionid", "secret"), [(False, True), (True, False)])
async def test_no_lookup_without_fetch_unionid_or_app_secret(
    fake: FakeWeChatApi,
    store: SQLiteStore,
    tmp_path: Path,
    aiohttp_client: Any,
    fetch_unionid: bool,
    secret: bool,
) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    settings = config(fake, tmp_path, fetch_unionid=fetch_unionid, secret=secret)
    connector = WeChatConnector.from_settings(settings, clock=lambda: NOW)
    assert connector is not None
    assert connector.unionid_resolver() is None
    app = web.Application()
    ctx = set_up(app, connector, Pipeline(settings, store, Metrics()).ingest, settings=settings, store=store)
    client = await aiohttp_client(app)
    query, body = encrypted(text_xml("oUserA", "1001"), APP_ID)
    assert (await client.post("/wechat/brand_a", params=query, data=body)).status == 200
    await client.close()  # the app's cleanup lets started lookups finish
    assert user_info_calls(fake) == []
    assert await ctx.state.get(marker_key(APP_ID, "oUserA")) is None


async def test_setup_runs_the_lookups_in_the_app_lifecycle(
    fake: FakeWeChatApi, store: SQLiteStore, tmp_path: Path, aiohttp_client: Any
) -> None:
    fake.users[(APP_ID, "oUserA")] = {"unionid": "uPerson1"}
    settings = config(fake, tmp_path)
    connector = WeChatConnector.from_settings(settings, clock=lambda: NOW)
    assert connector is not None
    app = web.Application()
    ctx = set_up(app, connector, Pipeline(settings, store, Metrics()).ingest, settings=settings, store=store)
    client = await aiohttp_client(app)
    query, body = encrypted(text_xml("oUserA", "1001"), APP_ID)
    assert (await client.post("/wechat/brand_a", params=query, data=body)).status == 200
    await client.close()  # the app's cleanup lets started lookups finish
    raw = await ctx.state.get(marker_key(APP_ID, "oUserA"))
    assert raw is not None
    assert orjson.loads(raw)["unionid"] == "uPerson1"
