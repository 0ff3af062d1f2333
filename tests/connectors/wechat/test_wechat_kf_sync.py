"""WeChat Customer Service: callbacks announce, sync_msg pulls from a durable cursor (WeChat-like server)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_api import CORP_ID, CORP_SECRET, FakeWeChatApi
from wechatpy.enterprise.crypto import WeChatCrypto as WeComCrypto

from connectors.wechat.kf import KfSyncer, WeChatKfConnector, cursor_key
from core.model import IngestResult, RawEnvelope
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.keys import STORE
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.store.sqlite import SQLiteStore
from normalizers.base import Normalizer
from tests.support.channels import set_up

NOW = 1_718_000_000
TOKEN, AES_KEY = "kftoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
KFID = "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q"


def item(n: int, msgtype: str = "text", **payload: Any) -> dict[str, Any]:
    body = payload or {"content": f"message {n}"}
    return {
        "msgid": f"msg-{n}",
        "open_kfid": KFID,
        "external_userid": "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw",
        "send_time": NOW + n,
        "origin": 3,
        "msgtype": msgtype,
        msgtype: body,
    }


MESSAGES = [
    item(1),
    item(2, "image", media_id="IMG_MEDIA"),
    item(3, "voice", media_id="VOICE_MEDIA"),
    item(4, "location", latitude=23.1, longitude=113.3, name="广州塔", address="广州市海珠区"),
    {
        **item(5, "event", event_type="enter_session", scene="123", scene_param="abc", welcome_code="W"),
        "origin": 4,
    },
]


@pytest.fixture
async def fake(aiohttp_server: Any) -> FakeWeChatApi:
    api = FakeWeChatApi(kf_messages=list(MESSAGES))
    server: TestServer = await aiohttp_server(api.app())
    api.base_url = str(server.make_url("")).rstrip("/")
    return api


def config(fake: FakeWeChatApi, tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "store": {
                "path": str(tmp_path / "tg.db"),
                "blob_dir": str(tmp_path / "blobs"),
                "min_free_disk_mb": 0,
            },
            "tenants": {"acme": {}},
            "inboxes": {"kf": {"tenant": "acme"}},
            "channels": {
                "wechat_kf": {
                    "sync_limit": 2,
                    "apps": {
                        "service": {
                            "inbox": "kf",
                            "corp_id": CORP_ID,
                            "secret": CORP_SECRET,
                            "token": TOKEN,
                            "encoding_aes_key": AES_KEY,
                            "api_base": fake.base_url,
                        }
                    },
                }
            },
        }
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    settings = StoreSettings.model_validate(
        {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )
    instance = SQLiteStore(settings, OutboxSettings())
    await instance.open()
    yield instance
    await instance.close()


class Rig:
    def __init__(
        self,
        connector: WeChatKfConnector,
        settings: Settings,
        store: SQLiteStore,
        session: aiohttp.ClientSession,
    ) -> None:
        self.connector, self.settings, self.store, self.session = connector, settings, store, session
        self.pipeline = Pipeline(settings, store, Metrics())
        # The channel's real context on the store (its state and media queue), set up on an app that
        # is never started: the tests drive their own syncers, without the connector's poller.
        self.ctx = set_up(web.Application(), connector, self.pipeline.ingest, settings=settings, store=store)

    def syncer(self, ingest: Any = None) -> KfSyncer:
        fetcher = self.connector.media_fetcher()
        fetcher.bind(self.ctx.media, self.ctx.metrics)
        syncer = self.connector.syncer(ingest or self.pipeline.ingest, fetcher)
        syncer.bind(self.ctx.state)
        syncer.start(self.connector.apis(self.session))
        return syncer

    async def cursor(self) -> bytes | None:
        return await self.ctx.state.get(cursor_key("service", KFID))

    async def published_msgids(self) -> list[str]:
        rows = await self.store.outbox_fetch(1000)
        return [orjson.loads(r.body)["message"]["external_id"] for r in rows if r.type == "message.received"]


@pytest.fixture
async def rig(fake: FakeWeChatApi, store: SQLiteStore, tmp_path: Path) -> AsyncIterator[Rig]:
    settings = config(fake, tmp_path)
    connector = WeChatKfConnector.from_settings(settings, clock=lambda: NOW)
    assert connector is not None
    async with aiohttp.ClientSession() as session:
        yield Rig(connector, settings, store, session)


async def test_sync_pages_through_the_cursor_and_keeps_it(rig: Rig, fake: FakeWeChatApi) -> None:
    syncer = rig.syncer()
    assert await syncer.sync("service", KFID, token="CALLBACK_TOKEN") == 5
    assert await rig.published_msgids() == ["msg-1", "msg-2", "msg-3", "msg-4", "msg-5"]
    pulls = [body for name, body in fake.calls if name == "sync_msg"]
    assert [p.get("cursor") for p in pulls] == [None, "2", "4"]
    assert all(p["token"] == "CALLBACK_TOKEN" and p["open_kfid"] == KFID and p["limit"] == 2 for p in pulls)
    assert await rig.cursor() == b"5"
    # Kept in the channel's namespace of the store.
    assert await rig.store.state_get("wechat_kf/" + cursor_key("service", KFID)) == b"5"
    # The image and the voice are queued for fetching.
    assert await rig.store.media_get("wechat_kf/kf/IMG_MEDIA") is not None
    assert await rig.store.media_get("wechat_kf/kf/VOICE_MEDIA") is not None

    # Nothing new: one pull from the saved cursor, nothing ingested.
    fake.kf_messages.append(item(6))
    assert await syncer.sync("service", KFID) == 1
    assert await rig.published_msgids() == ["msg-1", "msg-2", "msg-3", "msg-4", "msg-5", "msg-6"]


class CrashOnSecondPage:
    """The pipeline, until the process 'dies' while committing the second page."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.pages = 0

    async def __call__(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        self.pages += 1
        if self.pages == 2:
            raise ConnectionResetError("killed")
        return await self.pipeline.ingest(envelope, normalize)


async def test_a_restart_in_the_middle_misses_and_repeats_nothing(rig: Rig) -> None:
    first = rig.syncer(CrashOnSecondPage(rig.pipeline))
    with pytest.raises(ConnectionResetError):
        await first.sync("service", KFID)
    assert await rig.cursor() == b"2"
    assert await rig.published_msgids() == ["msg-1", "msg-2"]

    # A new process: a new syncer on the same store resumes from the durable cursor.
    assert await rig.syncer().sync("service", KFID) == 3
    assert await rig.published_msgids() == ["msg-1", "msg-2", "msg-3", "msg-4", "msg-5"]


async def test_a_crash_between_commit_and_cursor_repulls_a_page_without_a_second_event(rig: Rig) -> None:
    real_cas = rig.store.state_cas
    failures = [ConnectionResetError("killed before the cursor was saved")]

    async def cas_once_failing(key: str, expected: bytes | None, value: bytes) -> bool:
        if key.endswith(":cursor") and failures:
            raise failures.pop()
        return await real_cas(key, expected, value)

    rig.store.state_cas = cas_once_failing  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):
        await rig.syncer().sync("service", KFID)
    assert await rig.published_msgids() == ["msg-1", "msg-2"]
    assert await rig.cursor() is None

    assert await rig.syncer().sync("service", KFID) == 5  # page one again: duplicates by msgid
    assert await rig.published_msgids() == ["msg-1", "msg-2", "msg-3", "msg-4", "msg-5"]


async def test_expired_token_and_rate_limit_during_sync(rig: Rig, fake: FakeWeChatApi) -> None:
    syncer = rig.syncer()
    api = syncer._apis["service"]
    pauses: list[float] = []

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    api._sleep = pause
    await api.token()
    fake.expire_tokens()
    fake.fail_next("sync_msg", {"errcode": 45009, "errmsg": "api freq out of limit"})
    assert await syncer.sync("service", KFID) == 5
    assert fake.token_fetches == 2
    assert pauses == [1.0]


def kf_callback(
    open_kfid: str = KFID, token: str = "ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR"
) -> tuple[dict[str, str], bytes]:
    xml = (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><CreateTime>{NOW}</CreateTime>"
        "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
        f"<Token><![CDATA[{token}]]></Token><OpenKfId><![CDATA[{open_kfid}]]></OpenKfId></xml>"
    )
    reply = WeComCrypto(TOKEN, AES_KEY, CORP_ID).encrypt_message(xml, "n", str(NOW))
    encrypt = re.search(r"<Encrypt><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    signature = re.search(r"<MsgSignature><!\[CDATA\[(.*?)\]\]>", reply).group(1)  # type: ignore[union-attr]
    body = (
        f"<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName><Encrypt><![CDATA[{encrypt}]]></Encrypt></xml>"
    )
    return {"msg_signature": signature, "timestamp": str(NOW), "nonce": "n"}, body.encode()


async def test_callback_is_verified_answered_and_starts_a_sync(
    rig: Rig, fake: FakeWeChatApi, aiohttp_client: Any
) -> None:
    syncer = rig.syncer()
    app = web.Application()
    app[STORE] = rig.store
    app.add_subapp("/wechat_kf", rig.connector.build_subapp(rig.pipeline.ingest, syncer))
    client = await aiohttp_client(app)

    query, body = kf_callback()
    bad = await client.post("/wechat_kf/service", params={**query, "msg_signature": "0" * 40}, data=body)
    assert bad.status == 401
    assert fake.calls == []

    response = await client.post("/wechat_kf/service", params=query, data=body)
    assert response.status == 200
    assert await response.text() == ""
    await syncer.idle()
    assert await rig.published_msgids() == ["msg-1", "msg-2", "msg-3", "msg-4", "msg-5"]
    pulls = [b for name, b in fake.calls if name == "sync_msg"]
    assert pulls[0]["token"] == "ENCApHxnGDNAVNY4AaSJKj4Tb5mwsEMzxhFmHVGcra996NR"
    # Remembered durably: a restart syncs this account without waiting for a callback.
    assert await rig.syncer().known("service") == [KFID]


async def test_missing_secret_refuses_to_start(fake: FakeWeChatApi, tmp_path: Path) -> None:
    raw = config(fake, tmp_path).model_dump()
    del raw["channels"]["wechat_kf"]["apps"]["service"]["secret"]
    raw["channels"]["wechat_kf"]["apps"]["service"]["token"] = TOKEN
    raw["channels"]["wechat_kf"]["apps"]["service"]["encoding_aes_key"] = AES_KEY
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is required \(messages cannot be pulled without it\)") as raised:
        WeChatKfConnector.from_settings(Settings.model_validate(raw))
    assert raised.value.key == "channels.wechat_kf.apps.service.secret"


async def test_msg_send_fail_reports_our_reply_failed(rig: Rig, fake: FakeWeChatApi) -> None:
    reports: list[tuple[str, str, Any, Any]] = []

    async def report(msgid: str, status: str, *, reason: Any = None, detail: Any = None) -> bool:
        reports.append((msgid, status, reason, detail))
        return True

    fake.kf_messages[:] = [
        item(1),
        {**item(2, "event", event_type="msg_send_fail", fail_msgid="5f1c0d2e9a8b7c6d5e4f3a2b1c0d9e8f",
                fail_type=4), "origin": 4},
    ]
    syncer = rig.syncer()
    syncer.bind(rig.ctx.state, report)
    assert await syncer.sync("service", KFID) == 2
    # The event is published as any other, and the reply it names has failed: session expired.
    assert await rig.published_msgids() == ["msg-1", "msg-2"]
    assert reports == [
        ("5f1c0d2e9a8b7c6d5e4f3a2b1c0d9e8f", "failed", "window_closed", "msg_send_fail fail_type 4")
    ]
