"""The WeChat reply senders (Official Account, WeCom app, 微信客服) against a local server answering like
WeChat, errors included, with the channels' real context on a SQLite store (tokens shared through it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_api import APP_ID, APP_SECRET, CORP_ID, CORP_SECRET, FakeWeChatApi

from connectors.wechat import WeChatConnector, WeChatKfConnector, WeComConnector
from connectors.wechat.sender import MAX_TEXT_BYTES, kf_msgid, split_text
from core.channel import OutboundAttachment, OutboundReply, SendError, SenderSpec
from core.model import Identity, IdentityKind
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.channels import GatewayContext
from gateway.store.blobs import BlobDir
from gateway.store.sqlite import SQLiteStore
from tests.support.channels import set_up

TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OPENID = "oDemoUser0001"
KFID = "wkAJ2GCAAASSm4_FhToWMFea0xAFfd3Q"
EXTERNAL = "wmAJ2GCAAAme1XQRC-NI-q0_ZM9ukoAw"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class Attachments:
    """Puts files into the store's blob directory, as a desk's reply command does before sending."""

    def __init__(self, root: Path) -> None:
        self.dir = BlobDir(root)

    def put(self, data: bytes, name: str, content_type: str) -> OutboundAttachment:
        sha = self.dir.put(data)
        return OutboundAttachment(name=name, content_type=content_type, size=len(data), sha256=sha)


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


def settings(fake: FakeWeChatApi) -> Settings:
    common = {"token": TOKEN, "encoding_aes_key": AES_KEY, "api_base": fake.base_url}
    return Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"wx": {"tenant": "acme"}, "wecom": {"tenant": "acme"}, "kf": {"tenant": "acme"}},
            "channels": {
                "wechat": {"accounts": {"demo": {"inbox": "wx", "app_id": APP_ID, "app_secret": APP_SECRET,
                                                 **common}}},
                "wecom": {"apps": {"desk": {"inbox": "wecom", "corp_id": CORP_ID, "agent_id": 1000002,
                                            "corp_secret": CORP_SECRET, **common}}},
                "wechat_kf": {"apps": {"service": {"inbox": "kf", "corp_id": CORP_ID, "secret": CORP_SECRET,
                                                   **common}}},
            },
        }
    )


class Rig:
    """The three channels set up on their real contexts over one store; ``blobs`` feeds attachments."""

    def __init__(self, fake: FakeWeChatApi, store: SQLiteStore, blob_dir: Path) -> None:
        self.fake, self.store, self.blobs = fake, store, Attachments(blob_dir)
        self.specs: dict[str, SenderSpec] = {}
        self.contexts: list[GatewayContext] = []
        config = settings(fake)
        for cls in (WeChatConnector, WeChatKfConnector, WeComConnector):
            connector = cls.from_settings(config)
            assert connector is not None

            async def ingest(*_: Any) -> Any:
                raise AssertionError("no ingest in sender tests")

            ctx = set_up(
                web.Application(), connector, ingest, settings=config, store=store, senders=self.specs
            )
            self.contexts.append(ctx)

    async def send(self, channel: str, reply: OutboundReply) -> Any:
        return await self.specs[channel].sender.send(reply)

    async def close(self) -> None:
        for ctx in self.contexts:
            for client in ctx._clients:
                await client.close()


@pytest.fixture
async def rig(fake: FakeWeChatApi, store: SQLiteStore, tmp_path: Path) -> AsyncIterator[Rig]:
    made = Rig(fake, store, tmp_path / "blobs")
    yield made
    await made.close()


def oa_reply(text: str | None = "您好，订单已发货。", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "command_id": "cmd-1",
        "tenant": "acme",
        "channel": "wechat",
        "inbox": "wx",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "thread_number": 7,
        "subject": None,
        "recipient": Identity(kind=IdentityKind.WECHAT_OPENID, value=f"{APP_ID}:{OPENID}", verified=True),
        "text": text,
        "answering": {"from_user": OPENID, "account": "demo"},
    }
    values.update(kw)
    return OutboundReply(**values)


def wecom_reply(**kw: Any) -> OutboundReply:
    return oa_reply(channel="wecom", inbox="wecom", recipient=Identity(
        kind=IdentityKind.WECOM_USERID, value=f"{CORP_ID}:zhangsan", verified=True
    ), answering={"from_user": "zhangsan", "account": "desk"}, **kw)


def kf_reply(**kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "channel": "wechat_kf",
        "inbox": "kf",
        "recipient": Identity(kind=IdentityKind.WECOM_EXTERNAL_USERID, value=f"{CORP_ID}:{EXTERNAL}",
                              verified=True),
        "answering": {"open_kfid": KFID, "external_userid": EXTERNAL, "account": "service"},
    }
    values.update(kw)
    return oa_reply(**values)


def sends(fake: FakeWeChatApi, endpoint: str) -> list[dict[str, Any]]:
    return [body for name, body in fake.calls if name == endpoint]


# -- registration --------------------------------------------------------------------------------


async def test_each_channel_registers_its_window_rate_and_idempotency(rig: Rig) -> None:
    oa, wecom, kf = rig.specs["wechat"], rig.specs["wecom"], rig.specs["wechat_kf"]
    assert (oa.window, wecom.window, kf.window) == (48 * 3600, None, 48 * 3600)
    assert (oa.idempotent, wecom.idempotent, kf.idempotent) == (False, False, True)
    assert oa.rate <= 5.8  # 500 000 customer-service calls a day


# -- Official Account ----------------------------------------------------------------------------


async def test_official_account_text_goes_to_the_followers_openid(rig: Rig, fake: FakeWeChatApi) -> None:
    sent = await rig.send("wechat", oa_reply())
    [body] = sends(fake, "custom_send")
    assert body == {"touser": OPENID, "msgtype": "text", "text": {"content": "您好，订单已发货。"}}
    # The customer-service API gives no message id: the reply id stands for it.
    assert sent.provider_message_id == "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98"
    assert [c[1]["force_refresh"] for c in fake.calls if c[0] == "stable_token"] == [False]


async def test_official_account_45015_is_window_closed_and_permanent(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.fail_next("custom_send", {"errcode": 45015, "errmsg": "response out of time limit"})
    with pytest.raises(SendError) as raised:
        await rig.send("wechat", oa_reply())
    assert (raised.value.reason, raised.value.permanent) == ("window_closed", True)
    assert "45015" in raised.value.detail
    assert fake.sent == []


@pytest.mark.parametrize(
    ("errcode", "reason", "permanent"),
    [
        (45047, "window_closed", True),  # 20 messages since the follower's last one
        (43004, "blocked", True),
        (40003, "recipient_unreachable", True),
        (45002, "too_large", True),
        (87014, "rejected", True),
        (48001, "auth", False),  # retried: an operator fixes the permission, the allow-list, the secret
        (40164, "auth", False),
        (45009, "rate_limited", False),
        (-1, "provider_error", False),
        (12345, "provider_error", False),  # unknown: retried, then the gateway's retries end it
    ],
)
async def test_official_account_errors_map_to_reasons(
    rig: Rig, fake: FakeWeChatApi, errcode: int, reason: str, permanent: bool
) -> None:
    fake.fail_next("custom_send", {"errcode": errcode, "errmsg": "scripted"})
    with pytest.raises(SendError) as raised:
        await rig.send("wechat", oa_reply())
    assert (raised.value.reason, raised.value.permanent) == (reason, permanent)
    assert len(sends(fake, "custom_send")) == 1  # one attempt: the gateway owns the retries


async def test_a_refused_token_is_refreshed_once_and_the_send_made_once(
    rig: Rig, fake: FakeWeChatApi
) -> None:
    fake.fail_next("custom_send", {"errcode": 40001, "errmsg": "invalid credential"})
    await rig.send("wechat", oa_reply())
    assert len(fake.sent) == 1
    tokens = [c[1]["force_refresh"] for c in fake.calls if c[0] == "stable_token"]
    # stable_token still hands out the refused token, so the refresh is forced, once.
    assert tokens == [False, False, True]


async def test_a_token_refused_twice_is_auth_and_retried_later(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.fail_next("custom_send", *[{"errcode": 40001, "errmsg": "invalid credential"}] * 2)
    with pytest.raises(SendError) as raised:
        await rig.send("wechat", oa_reply())
    assert (raised.value.reason, raised.value.permanent) == ("auth", False)
    assert fake.sent == []


async def test_two_instances_refreshing_at_once_force_one_refresh(
    fake: FakeWeChatApi, store: SQLiteStore, tmp_path: Path
) -> None:
    first, second = Rig(fake, store, tmp_path), Rig(fake, store, tmp_path)  # two gateways, one store
    try:
        await first.send("wechat", oa_reply())
        await second.send("wechat", oa_reply())
        assert fake.token_fetches == 1  # the second instance took the stored token
        fake.fail_next("custom_send", *[{"errcode": 40001, "errmsg": "invalid credential"}] * 2)
        await asyncio.gather(first.send("wechat", oa_reply()), second.send("wechat", oa_reply()))
    finally:
        await first.close()
        await second.close()
    forced = [c for c in fake.calls if c[0] == "stable_token" and c[1]["force_refresh"]]
    assert len(forced) == 1
    assert fake.token_fetches == 2
    assert len(fake.sent) == 4


async def test_official_account_image_is_uploaded_then_sent(rig: Rig, fake: FakeWeChatApi) -> None:
    image = rig.blobs.put(PNG, "receipt.png", "image/png")
    await rig.send("wechat", oa_reply(attachments=(image,)))
    [(kind, name, content_type, data)] = fake.uploads.values()
    assert (kind, name, content_type, data) == ("image", "receipt.png", "image/png", PNG)
    assert [b["msgtype"] for b in sends(fake, "custom_send")] == ["text", "image"]
    assert sends(fake, "custom_send")[1]["image"] == {"media_id": "MEDIA_1"}


async def test_a_file_the_official_account_cannot_send_fails_before_any_call(
    rig: Rig, fake: FakeWeChatApi
) -> None:
    pdf = rig.blobs.put(b"%PDF-1.4", "invoice.pdf", "application/pdf")
    with pytest.raises(SendError) as raised:
        await rig.send("wechat", oa_reply(attachments=(pdf,)))
    assert (raised.value.reason, raised.value.permanent) == ("unsupported", True)
    assert fake.calls == []


async def test_an_image_past_the_cap_is_too_large_before_any_call(rig: Rig, fake: FakeWeChatApi) -> None:
    big = OutboundAttachment(name="big.png", content_type="image/png", size=11 * 1024 * 1024, sha256="0" * 64)
    with pytest.raises(SendError) as raised:
        await rig.send("wechat", oa_reply(attachments=(big,)))
    assert raised.value.reason == "too_large"
    assert fake.calls == []


async def test_a_retry_sends_only_the_parts_not_yet_accepted(rig: Rig, fake: FakeWeChatApi) -> None:
    image = rig.blobs.put(PNG, "receipt.png", "image/png")
    reply = oa_reply(attachments=(image,))
    fake.fail_next("upload", {"errcode": -1, "errmsg": "system error"})
    with pytest.raises(SendError) as raised:
        await rig.send("wechat", reply)
    assert raised.value.permanent is False
    await rig.send("wechat", reply)  # the gateway's retry
    assert [b["msgtype"] for _, b in fake.sent] == ["text", "image"]  # the text once


async def test_news_takes_its_picture_from_the_first_image(rig: Rig, fake: FakeWeChatApi) -> None:
    image = rig.blobs.put(PNG, "cover.png", "image/png")
    news = {"title": "退款进度", "url": "https://shop.example.com/orders/4711"}
    await rig.send("wechat", oa_reply(text="您的退款已处理", attachments=(image,), options={"news": news}))
    [body] = sends(fake, "custom_send")
    [article] = body["news"]["articles"]
    assert article == {
        "title": "退款进度",
        "description": "您的退款已处理",
        "url": "https://shop.example.com/orders/4711",
        "picurl": "http://mmbiz.qpic.cn/mmbiz/IMG_1/0",
    }


async def test_long_text_is_split_at_wechats_bound(rig: Rig, fake: FakeWeChatApi) -> None:
    text = "订单已发货。" * 200  # 3600 bytes
    await rig.send("wechat", oa_reply(text=text))
    pieces = [b["text"]["content"] for b in sends(fake, "custom_send")]
    assert len(pieces) == 2
    assert all(len(p.encode()) <= MAX_TEXT_BYTES for p in pieces)
    assert "".join(pieces) == text


def test_split_text_prefers_line_ends_and_never_cuts_a_character() -> None:
    text = ("第一段。" * 100 + "\n") * 3
    pieces = split_text(text, limit=1300)
    assert all(len(p.encode()) <= 1300 for p in pieces)
    assert all(p.endswith("。") for p in pieces)
    assert split_text("short") == ["short"]


# -- WeCom app -----------------------------------------------------------------------------------


async def test_wecom_sends_an_app_message_with_the_agentid(rig: Rig, fake: FakeWeChatApi) -> None:
    sent = await rig.send("wecom", wecom_reply())
    [body] = sends(fake, "message_send")
    assert body["touser"] == "zhangsan"
    assert body["agentid"] == 1000002
    assert body["msgtype"] == "text"
    assert sent.provider_message_id == "wecom-msg-1"
    assert [c[0] for c in fake.calls if "token" in c[0]] == ["gettoken"]


async def test_wecom_file_attachment_is_sent_as_a_file(rig: Rig, fake: FakeWeChatApi) -> None:
    pdf = rig.blobs.put(b"%PDF-1.4", "invoice.pdf", "application/pdf")
    await rig.send("wecom", wecom_reply(text=None, attachments=(pdf,)))
    [body] = sends(fake, "message_send")
    assert body["msgtype"] == "file"
    assert body["file"] == {"media_id": "MEDIA_1"}
    assert next(iter(fake.uploads.values()))[0] == "file"


async def test_wecom_unknown_member_is_unreachable(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.unknown_users.add("zhangsan")
    with pytest.raises(SendError) as raised:
        await rig.send("wecom", wecom_reply())
    assert (raised.value.reason, raised.value.permanent) == ("recipient_unreachable", True)


async def test_wecom_untrusted_ip_is_auth_and_retried(rig: Rig, fake: FakeWeChatApi) -> None:
    fake.fail_next("message_send", {"errcode": 60020, "errmsg": "not allow to access from your ip"})
    with pytest.raises(SendError) as raised:
        await rig.send("wecom", wecom_reply())
    assert (raised.value.reason, raised.value.permanent) == ("auth", False)
    assert raised.value.retry_after == 300.0


async def test_wecom_cannot_write_to_an_external_contact(rig: Rig, fake: FakeWeChatApi) -> None:
    reply = wecom_reply()
    external = Identity(kind=IdentityKind.WECOM_EXTERNAL_USERID, value=f"{CORP_ID}:{EXTERNAL}", verified=True)
    with pytest.raises(SendError) as raised:
        await rig.send("wecom", OutboundReply(**{**_fields(reply), "recipient": external}))
    assert raised.value.reason == "unsupported"
    assert fake.calls == []


def _fields(reply: OutboundReply) -> dict[str, Any]:
    return {name: getattr(reply, name) for name in reply.__slots__}  # type: ignore[attr-defined]


# -- 微信客服 ---------------------------------------------------------------------------------------


async def test_kf_sends_with_open_kfid_and_a_msgid_from_the_reply(rig: Rig, fake: FakeWeChatApi) -> None:
    reply = kf_reply()
    sent = await rig.send("wechat_kf", reply)
    [body] = sends(fake, "kf_send")
    assert (body["touser"], body["open_kfid"]) == (EXTERNAL, KFID)
    assert body["msgid"] == kf_msgid(reply.reply_id)
    assert len(body["msgid"]) <= 32  # WeChat's bound; a longer reply id is digested
    assert sent.provider_message_id == body["msgid"]


async def test_kf_repeated_send_is_one_message(rig: Rig, fake: FakeWeChatApi) -> None:
    reply = kf_reply()
    first = await rig.send("wechat_kf", reply)
    second = await rig.send("wechat_kf", reply)  # a retry after a crash before our commit
    assert first.provider_message_id == second.provider_message_id
    assert len(sends(fake, "kf_send")) == 2
    assert len(fake.sent) == 1


@pytest.mark.parametrize(
    ("errcode", "reason"), [(95001, "window_closed"), (95018, "rejected"), (40096, "recipient_unreachable")]
)
async def test_kf_errors(rig: Rig, fake: FakeWeChatApi, errcode: int, reason: str) -> None:
    fake.fail_next("kf_send", {"errcode": errcode, "errmsg": "scripted"})
    with pytest.raises(SendError) as raised:
        await rig.send("wechat_kf", kf_reply())
    assert (raised.value.reason, raised.value.permanent) == (reason, True)


async def test_kf_without_open_kfid_is_unreachable(rig: Rig, fake: FakeWeChatApi) -> None:
    with pytest.raises(SendError) as raised:
        await rig.send("wechat_kf", kf_reply(answering={"external_userid": EXTERNAL}))
    assert raised.value.reason == "recipient_unreachable"
    assert sends(fake, "kf_send") == []


def test_kf_msgid_is_stable_short_and_distinct_per_part() -> None:
    assert kf_msgid("short-id") == "short-id"
    long = "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98"
    ids = {kf_msgid(long, n) for n in range(3)}
    assert len(ids) == 3
    assert all(len(i) == 32 for i in ids)
    assert kf_msgid(long) == kf_msgid(long)


async def test_an_html_only_reply_goes_as_its_text(rig: Rig, fake: FakeWeChatApi) -> None:
    await rig.send("wechat", oa_reply(text=None, html="<p>您好，<b>已退款</b>。</p><p>谢谢！</p>"))
    [body] = sends(fake, "custom_send")
    assert "已退款" in body["text"]["content"]
    assert "<" not in body["text"]["content"]


async def test_an_account_without_its_secret_registers_no_sender(
    fake: FakeWeChatApi, store: SQLiteStore
) -> None:
    config = Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"wx": {"tenant": "acme"}},
        "channels": {"wechat": {"accounts": {"demo": {
            "inbox": "wx", "app_id": APP_ID, "token": TOKEN, "encoding_aes_key": AES_KEY,
        }}}},
    })
    connector = WeChatConnector.from_settings(config)
    assert connector is not None
    specs: dict[str, SenderSpec] = {}

    async def ingest(*_: Any) -> Any:
        raise AssertionError("no ingest")

    set_up(web.Application(), connector, ingest, settings=config, store=store, senders=specs)
    assert specs == {}


async def test_news_sends_its_other_attachments_after_the_card(rig: Rig, fake: FakeWeChatApi) -> None:
    cover = rig.blobs.put(PNG, "cover.png", "image/png")
    photo = rig.blobs.put(PNG + b"2", "photo.png", "image/png")
    news = {"title": "退款进度", "url": "https://shop.example.com/orders/4711"}
    await rig.send("wechat", oa_reply(attachments=(cover, photo), options={"news": news}))
    assert [b["msgtype"] for b in sends(fake, "custom_send")] == ["news", "image"]
