"""Media of callbacks: queued before the answer, fetched later from a WeChat-like API, served to desks."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from fake_api import APP_ID, APP_SECRET, CORP_ID, CORP_SECRET, FakeMedia, FakeWeChatApi
from wechatpy.crypto import WeChatCrypto as OfficialCrypto
from wechatpy.enterprise.crypto import WeChatCrypto as WeComCrypto

from connectors.wechat import WeChatConnector, WeComConnector
from connectors.wechat.api import WeChatApi
from connectors.wechat.media import MediaPolicy, WeChatMedia, downloader
from core.channel import Connector
from core.model import IngestResult, Outcome, Placement, RawEnvelope
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.channels import GatewayContext
from gateway.keys import SETTINGS, STORE
from gateway.media import setup_media
from gateway.store.sqlite import SQLiteStore
from normalizers.base import Normalizer
from tests.support.channels import set_up

NOW = 1_718_000_000
TOKEN, AES_KEY, AGENT_ID = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", 1000002


def image_xml(media_id: str, msg_id: str = "24600000000000009") -> str:
    return (
        "<xml><ToUserName><![CDATA[gh_0a1b2c3d4e5f]]></ToUserName><FromUserName><![CDATA[oUser1]]></FromUserName>"
        f"<CreateTime>{NOW}</CreateTime><MsgType><![CDATA[image]]></MsgType>"
        f"<PicUrl><![CDATA[http://mmbiz.qpic.cn/x]]></PicUrl><MediaId><![CDATA[{media_id}]]></MediaId>"
        f"<MsgId>{msg_id}</MsgId></xml>"
    )


def encrypted(plaintext: str) -> tuple[dict[str, str], bytes]:
    reply = OfficialCrypto(TOKEN, AES_KEY, APP_ID).encrypt_message(plaintext, "n0nce", str(NOW))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    body = f"<xml><ToUserName><![CDATA[gh_x]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    return {
        "timestamp": str(NOW),
        "nonce": "n0nce",
        "encrypt_type": "aes",
        "msg_signature": signature,
    }, body.encode()


class StoredIngest:
    """Answers "stored" after running the normalizer, like the pipeline does for a new message."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        self.calls += 1
        list(normalize(envelope))
        placement = Placement(message_id="m", thread_id="t", customer_id="c", sequence=1, is_new_thread=True)
        return IngestResult(outcome=Outcome.ACCEPTED, placements=(placement,))


class Now:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


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


def config(fake: FakeWeChatApi, *, secret: str | None = APP_SECRET) -> Settings:
    account: dict[str, Any] = {
        "inbox": "wx-demo",
        "app_id": APP_ID,
        "token": TOKEN,
        "encoding_aes_key": AES_KEY,
        "api_base": fake.base_url,
    }
    if secret is not None:
        account["app_secret"] = secret
    return Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"wx-demo": {"tenant": "acme"}, "wecom-demo": {"tenant": "acme"}},
            "channels": {
                "wechat": {"accounts": {"demo": account}},
                "wecom": {
                    "apps": {
                        "helpdesk": {
                            "inbox": "wecom-demo",
                            "corp_id": CORP_ID,
                            "agent_id": AGENT_ID,
                            "token": TOKEN,
                            "encoding_aes_key": AES_KEY,
                            "corp_secret": CORP_SECRET,
                            "api_base": fake.base_url,
                        }
                    }
                },
            },
        }
    )


def context(
    connector: Connector, ingest: StoredIngest, settings: Settings, store: SQLiteStore
) -> GatewayContext:
    """The channel's real context on the store, set up on an app that is never started: its media
    queue and metrics without the connector's own background fetcher (the tests drive theirs)."""
    return set_up(web.Application(), connector, ingest, settings=settings, store=store)


def gateway_app(store: SQLiteStore, settings: Settings) -> web.Application:
    """An app that serves ``/media/{channel}/{inbox}/{ref}`` like the gateway does."""
    app = web.Application()
    app[STORE] = store
    app[SETTINGS] = settings
    setup_media(app)
    return app


class Rig:
    """The Official Account sub-app and the gateway's /media on a real store, with the fetcher driven
    by hand."""

    def __init__(
        self,
        client: TestClient[web.Request, web.Application],
        media: WeChatMedia,
        apis: dict[str, WeChatApi],
        ingest: StoredIngest,
        now: Now,
    ) -> None:
        self.client, self.media, self.apis, self.ingest, self.now = client, media, apis, ingest, now


@pytest.fixture
async def rig(fake: FakeWeChatApi, store: SQLiteStore, aiohttp_client: Any) -> AsyncIterator[Rig]:
    settings = config(fake)
    connector = WeChatConnector.from_settings(settings, clock=lambda: NOW)
    assert connector is not None
    now = Now()
    policy = MediaPolicy(concurrency=2, first_backoff=10)
    media = WeChatMedia("wechat", frozenset({"demo"}), policy, now=now)
    ingest = StoredIngest()
    ctx = context(connector, ingest, settings, store)
    media.bind(ctx.media, ctx.metrics)
    app = gateway_app(store, settings)
    app.add_subapp("/wechat", connector.build_subapp(ctx.ingest, media=media))
    async with aiohttp.ClientSession() as session:
        apis = connector.apis(session)
        # Not media.running(): that would fetch in a task of its own; here run_once drives it.
        media.fetcher.start(downloader(apis, max_bytes=policy.max_bytes))
        client = await aiohttp_client(app)
        yield Rig(client, media, apis, ingest, now)


async def post(rig: Rig, plaintext: str) -> int:
    query, body = encrypted(plaintext)
    response = await rig.client.post("/wechat/demo", params=query, data=body)
    return response.status


async def test_image_is_queued_before_the_answer_and_served_once_fetched(
    rig: Rig, fake: FakeWeChatApi, store: SQLiteStore
) -> None:
    fake.media["MEDIA_1"] = FakeMedia(b"\xff\xd8\xffJPEG", "image/jpeg", filename="MEDIA_1.jpg")
    assert await post(rig, image_xml("MEDIA_1")) == 200
    # Answered; nothing fetched yet, but the fetch is durably queued.
    assert not fake.media_served.is_set()
    pending = await rig.client.get("/media/wechat/wx-demo/MEDIA_1")
    assert pending.status == 202
    assert int(pending.headers["Retry-After"]) >= 1

    assert await rig.media.run_once() == 1
    served = await rig.client.get("/media/wechat/wx-demo/MEDIA_1")
    assert served.status == 200
    assert await served.read() == b"\xff\xd8\xffJPEG"
    assert served.headers["Content-Type"] == "image/jpeg"
    assert "MEDIA_1.jpg" in served.headers["Content-Disposition"]
    assert await rig.media.run_once() == 0  # done: not fetched again


async def test_a_retried_callback_queues_nothing_new(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.media["MEDIA_1"] = FakeMedia(b"img", "image/png")
    for _ in range(3):
        assert await post(rig, image_xml("MEDIA_1")) == 200
    assert rig.ingest.calls == 3
    assert await rig.media.run_once() == 1
    assert [c[0] for c in fake.calls].count("media") == 1


async def test_busy_api_is_retried_later_and_unknown_media_fails_for_good(
    rig: Rig, fake: FakeWeChatApi, store: SQLiteStore
) -> None:
    fake.media["MEDIA_1"] = FakeMedia(b"img", "image/png")
    # -1 for every in-call attempt (1 + 3 retries): the fetch is rescheduled.
    fake.fail_next("media", *[{"errcode": -1, "errmsg": "system error"}] * 4)
    rig.apis["demo"]._sleep = _no_pause  # the in-call pauses are not under test here
    assert await post(rig, image_xml("MEDIA_1", "1")) == 200
    assert await rig.media.run_once() == 1
    assert await post(rig, image_xml("GONE", "2")) == 200
    assert await rig.media.run_once() == 1

    gone = await rig.client.get("/media/wechat/wx-demo/GONE")
    assert gone.status == 410
    assert "40007" in (await gone.json())["error"]
    record = await store.media_get("wechat/wx-demo/MEDIA_1")
    assert record is not None
    assert (record.state, record.attempts) == ("pending", 1)
    assert record.next_attempt_at == rig.now.now + timedelta(seconds=10)

    assert await rig.media.run_once() == 0  # not due yet
    rig.now.now += timedelta(seconds=10)
    assert await rig.media.run_once() == 1
    assert (await rig.client.get("/media/wechat/wx-demo/MEDIA_1")).status == 200


async def _no_pause(seconds: float) -> None:
    return None


async def test_fetching_gives_up_after_retry_for(rig: Rig, fake: FakeWeChatApi, store: SQLiteStore) -> None:
    rig.media.fetcher.policy = MediaPolicy(retry_for=15, first_backoff=10)
    rig.apis["demo"]._sleep = _no_pause
    fake.fail_next("media", *[{"errcode": -1, "errmsg": "system error"}] * 8)
    assert await post(rig, image_xml("MEDIA_1")) == 200
    assert await rig.media.run_once() == 1  # next try after 10 s: within 15 s
    rig.now.now += timedelta(seconds=10)
    assert await rig.media.run_once() == 1  # next would be 20 s after: past 15 s
    record = await store.media_get("wechat/wx-demo/MEDIA_1")
    assert record is not None
    assert record.state == "failed"


async def test_without_a_secret_nothing_is_fetched_or_mounted(fake: FakeWeChatApi) -> None:
    settings = config(fake, secret=None)
    connector = WeChatConnector.from_settings(settings, clock=lambda: NOW)
    assert connector is not None
    assert connector.media_fetcher() is None
    app = web.Application()
    set_up(app, connector, StoredIngest(), settings=settings)  # no store needed: nothing to queue
    assert not any(r.canonical.startswith("/media") for r in app.router.resources())
    assert len(app.cleanup_ctx) == 0  # no fetcher (nor API client) runs with the app


async def test_setup_mounts_media_and_runs_the_fetcher_in_the_app_lifecycle(
    fake: FakeWeChatApi, store: SQLiteStore, aiohttp_client: Any
) -> None:
    settings = config(fake)
    app = gateway_app(store, settings)  # the gateway serves /media/{channel}/... for every channel
    for cls in (WeChatConnector, WeComConnector):
        connector = cls.from_settings(settings, clock=lambda: NOW)
        assert connector is not None
        set_up(app, connector, StoredIngest(), settings=settings, store=store)
    client = await aiohttp_client(app)
    assert (await client.get("/media/wechat/wx-demo/NOPE")).status == 404
    assert (await client.get("/media/wecom/wecom-demo/NOPE")).status == 404


async def test_wecom_image_is_fetched_with_the_corp_token(
    fake: FakeWeChatApi, store: SQLiteStore, aiohttp_client: Any
) -> None:
    fake.media["WECOM_MEDIA"] = FakeMedia(b"png", "image/png")
    settings = config(fake)
    connector = WeComConnector.from_settings(settings, clock=lambda: NOW)
    assert connector is not None
    media = connector.media_fetcher()
    assert media is not None
    ctx = context(connector, StoredIngest(), settings, store)
    media.bind(ctx.media, ctx.metrics)
    app = web.Application()
    app.add_subapp("/wecom", connector.build_subapp(ctx.ingest, media=media))
    client = await aiohttp_client(app)
    xml = (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><FromUserName><![CDATA[zhangsan]]></FromUserName>"
        f"<CreateTime>{NOW}</CreateTime><MsgType><![CDATA[image]]></MsgType>"
        "<PicUrl><![CDATA[http://x]]></PicUrl><MediaId><![CDATA[WECOM_MEDIA]]></MediaId>"
        f"<MsgId>7000000000000000009</MsgId><AgentID>{AGENT_ID}</AgentID></xml>"
    )
    reply = WeComCrypto(TOKEN, AES_KEY, CORP_ID).encrypt_message(xml, "n", str(NOW))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    body = (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    )
    response = await client.post(
        "/wecom/helpdesk", params={"msg_signature": signature, "timestamp": str(NOW), "nonce": "n"}, data=body
    )
    assert response.status == 200
    async with aiohttp.ClientSession() as session:
        media.fetcher.start(downloader(connector.apis(session), max_bytes=media.policy.max_bytes))
        assert await media.run_once() == 1
    record = await store.media_get("wecom/wecom-demo/WECOM_MEDIA")
    assert record is not None
    assert record.state == "done"
    assert await store.read_blob(record.sha256 or "") == b"png"
    assert ("gettoken", {"corpid": CORP_ID, "corpsecret": CORP_SECRET}) in fake.calls
