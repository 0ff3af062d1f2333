"""The Mini Program's customer-service sender against a local server answering like WeChat's API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fake_api import APP_ID, APP_SECRET, FakeWeChatApi

from connectors.wechat import MiniProgramConnector
from core.channel import OutboundReply, SendError, SenderSpec
from core.model import Identity, IdentityKind
from core.settings import Settings
from gateway.store.sqlite import SQLiteStore
from tests.connectors.wechat.test_wechat_senders import PNG, Attachments, fake, store  # noqa: F401
from tests.support.channels import set_up

TOKEN, AES_KEY = "devtoken", "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
OPENID = "oMiniUser0001"


@pytest.fixture
async def spec(fake: FakeWeChatApi, store: SQLiteStore) -> AsyncIterator[SenderSpec]:  # noqa: F811
    config = Settings.model_validate({
        "tenants": {"acme": {}}, "inboxes": {"mini": {"tenant": "acme"}},
        "channels": {"miniprogram": {"apps": {"shop": {
            "inbox": "mini", "app_id": APP_ID, "app_secret": APP_SECRET, "token": TOKEN,
            "encoding_aes_key": AES_KEY, "api_base": fake.base_url}}}},
    })
    connector = MiniProgramConnector.from_settings(config)
    assert connector is not None
    specs: dict[str, SenderSpec] = {}

    async def ingest(*_: Any) -> Any:
        raise AssertionError("no ingest in sender tests")

    ctx = set_up(web.Application(), connector, ingest, settings=config, store=store, senders=specs)
    yield specs["miniprogram"]
    for client in ctx._clients:
        await client.close()


def reply(text: str | None = "您的退款已处理。", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a99", "command_id": "cmd-1", "tenant": "acme",
        "channel": "miniprogram", "inbox": "mini", "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a99",
        "thread_number": 3, "subject": None,
        "recipient": Identity(kind=IdentityKind.WECHAT_OPENID, value=f"{APP_ID}:{OPENID}", verified=True),
        "text": text, "answering": {"from_user": OPENID, "account": "shop"},
    }
    values.update(kw)
    return OutboundReply(**values)


def sends(fake: FakeWeChatApi) -> list[dict[str, Any]]:  # noqa: F811
    return [body for name, body in fake.calls if name == "custom_send"]


async def test_it_registers_the_48_hour_window(spec: SenderSpec) -> None:
    assert spec.window == 48 * 3600
    assert spec.rate <= 5.8


async def test_text_goes_to_the_users_openid(spec: SenderSpec, fake: FakeWeChatApi) -> None:  # noqa: F811
    sent = await spec.sender.send(reply())
    assert sends(fake) == [{"touser": OPENID, "msgtype": "text", "text": {"content": "您的退款已处理。"}}]
    assert sent.provider_message_id == "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a99"


async def test_an_image_is_uploaded_then_sent(
    spec: SenderSpec, fake: FakeWeChatApi, tmp_path: Path  # noqa: F811
) -> None:
    image = Attachments(tmp_path / "blobs").put(PNG, "label.png", "image/png")
    await spec.sender.send(reply(text=None, attachments=(image,)))
    [body] = sends(fake)
    assert body["msgtype"] == "image"
    assert fake.uploads[body["image"]["media_id"]][0] == "image"


async def test_a_link_card_then_the_text(spec: SenderSpec, fake: FakeWeChatApi) -> None:  # noqa: F811
    card = {"title": "退货说明", "description": "七天无理由", "url": "https://shop.example/returns",
            "thumb_url": "https://shop.example/t.png"}
    await spec.sender.send(reply(options={"link": card}))
    first, second = sends(fake)
    assert first == {"touser": OPENID, "msgtype": "link", "link": card}
    assert second["msgtype"] == "text"


@pytest.mark.parametrize(
    ("errcode", "reason", "permanent"),
    [(45015, "window_closed", True), (45047, "window_closed", True), (43004, "blocked", True),
     (40003, "recipient_unreachable", True), (45009, "rate_limited", False), (-1, "provider_error", False)],
)
async def test_wechat_errors_map_to_reasons(
    spec: SenderSpec, fake: FakeWeChatApi, errcode: int, reason: str, permanent: bool  # noqa: F811
) -> None:
    fake.fail_next("custom_send", {"errcode": errcode, "errmsg": "scripted"})
    with pytest.raises(SendError) as raised:
        await spec.sender.send(reply())
    assert (raised.value.reason, raised.value.permanent) == (reason, permanent)


async def test_voice_and_files_fail_before_any_call(
    spec: SenderSpec, fake: FakeWeChatApi, tmp_path: Path  # noqa: F811
) -> None:
    voice = Attachments(tmp_path / "blobs").put(b"#!AMR\n", "v.amr", "audio/amr")
    with pytest.raises(SendError) as raised:
        await spec.sender.send(reply(attachments=(voice,)))
    assert raised.value.reason == "unsupported"
    assert sends(fake) == []
