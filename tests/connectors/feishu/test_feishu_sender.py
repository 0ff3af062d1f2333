"""The Feishu reply sender (im.v1.message create / reply) against a local server answering like
Feishu's Open API, errors and token expiry included."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.feishu import FeishuConnector
from core.channel import OutboundAttachment, OutboundReply, SendError, SenderSpec
from core.model import Identity, IdentityKind
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.channels import GatewayContext
from gateway.store.blobs import BlobDir
from gateway.store.sqlite import SQLiteStore
from tests.connectors.feishu.fake_feishu import APP_SECRET, FakeFeishu
from tests.connectors.feishu.kit import APP_ID, EMPLOYEE
from tests.support.channels import set_up


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeFeishu:
    fake = FakeFeishu()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


@contextlib.asynccontextmanager
async def sender_at(api_base: str, store: SQLiteStore | None = None) -> AsyncIterator[SenderSpec]:
    settings = Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"it-desk": {"tenant": "acme"}},
            "channels": {
                "feishu": {
                    "api_timeout": 2,
                    "inboxes": {
                        "it-desk": {
                            "api_base": api_base,
                            "app_id": APP_ID,
                            "app_secret": APP_SECRET,
                            "verification_token": "t",
                            "encrypt_key": "k",
                            "fetch_media": False,
                            "directory_emails": False,
                        }
                    },
                }
            },
        }
    )
    connector = FeishuConnector.from_settings(settings)
    assert connector is not None

    async def ingest(*_: Any) -> Any:
        raise AssertionError("no ingest in sender tests")

    specs: dict[str, SenderSpec] = {}
    ctx: GatewayContext = set_up(
        web.Application(), connector, ingest, settings=settings, store=store, senders=specs
    )
    try:
        yield specs["feishu"]
    finally:
        for client in ctx._clients:
            await client.close()


@pytest.fixture
async def spec(feishu: FakeFeishu) -> AsyncIterator[SenderSpec]:
    async with sender_at(feishu.base) as made:
        yield made


def reply(text: str | None = "Your VPN profile was reset.", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "command_id": "cmd-1",
        "tenant": "acme",
        "channel": "feishu",
        "inbox": "it-desk",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "thread_number": 7,
        "subject": None,
        "recipient": Identity(kind=IdentityKind.FEISHU_OPEN_ID, value=f"{APP_ID}:{EMPLOYEE}", verified=True),
        "text": text,
        "answering": {
            "chat_id": "oc_5ad11d72b830411d72b836c20",
            "chat_type": "p2p",
            "message_id": "om_dc13264520392913993dd051dba20001",
        },
    }
    values.update(kw)
    return OutboundReply(**values)


async def test_a_private_chat_is_answered_in_the_chat_with_the_reply_id_as_uuid(
    spec: SenderSpec, feishu: FakeFeishu
) -> None:
    sent = await spec.sender.send(reply())
    [posted] = feishu.sent
    assert posted["path"] == "/open-apis/im/v1/messages"
    assert posted["query"] == {"receive_id_type": "chat_id"}
    assert posted["receive_id"] == "oc_5ad11d72b830411d72b836c20"
    assert posted["content"] == '{"text":"Your VPN profile was reset."}'
    assert posted["uuid"] == "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98"
    assert sent.provider_message_id.startswith("om_sent")
    assert spec.idempotent is True
    # A retry after a lost answer: Feishu dedupes the uuid, nothing is sent twice.
    again = await spec.sender.send(reply())
    assert again.provider_message_id == sent.provider_message_id
    assert len(feishu.sent) == 1


async def test_a_group_message_is_answered_in_its_thread(spec: SenderSpec, feishu: FakeFeishu) -> None:
    answering = {"chat_id": "oc_group", "chat_type": "group", "message_id": "om_group0001"}
    await spec.sender.send(reply(answering=answering))
    [posted] = feishu.sent
    assert posted["path"] == "/open-apis/im/v1/messages/om_group0001/reply"
    assert posted["reply_in_thread"] is True


async def test_without_a_chat_the_reply_goes_to_the_open_id(spec: SenderSpec, feishu: FakeFeishu) -> None:
    await spec.sender.send(reply(answering={}))
    [posted] = feishu.sent
    assert posted["query"] == {"receive_id_type": "open_id"}
    assert posted["receive_id"] == EMPLOYEE


async def test_an_expired_token_is_replaced_once(spec: SenderSpec, feishu: FakeFeishu) -> None:
    await spec.sender.send(reply())
    feishu.revoked.add("t-fake-1")
    await spec.sender.send(reply(reply_id="rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a99"))
    assert feishu.tokens_issued == 2
    assert len(feishu.sent) == 2


@pytest.mark.parametrize(
    ("answer", "reason", "permanent", "retry_after"),
    [
        (
            (
                429,
                {"code": 99991400, "msg": "request trigger frequency limit"},
                {"x-ogw-ratelimit-reset": "3"},
            ),
            "rate_limited",
            False,
            3.0,
        ),
        ((400, {"code": 230002, "msg": "Bot is not in the chat."}, {}), "recipient_unreachable", True, None),
        ((400, {"code": 230025, "msg": "message content too long"}, {}), "too_large", True, None),
        ((400, {"code": 230001, "msg": "invalid message content"}, {}), "recipient_unreachable", True, None),
        ((400, {"code": 9499, "msg": "Bad Request"}, {}), "rejected", True, None),
        ((500, {"code": 1000, "msg": "internal error"}, {}), "provider_error", False, None),
    ],
)
async def test_feishu_errors_are_sorted_for_the_dispatcher(
    spec: SenderSpec,
    feishu: FakeFeishu,
    answer: tuple[int, dict[str, Any], dict[str, str]],
    reason: str,
    permanent: bool,
    retry_after: float | None,
) -> None:
    feishu.script("create", answer)
    with pytest.raises(SendError) as caught:
        await spec.sender.send(reply())
    assert caught.value.reason == reason
    assert caught.value.permanent is permanent
    assert caught.value.retry_after == retry_after


async def test_a_refused_app_secret_is_auth_and_retried(feishu: FakeFeishu) -> None:
    feishu.script("token", (200, {"code": 10014, "msg": "app secret invalid"}, {}))
    async with sender_at(feishu.base) as spec:
        with pytest.raises(SendError) as caught:
            await spec.sender.send(reply())
    assert caught.value.reason == "auth"
    assert caught.value.permanent is False


async def test_an_unreachable_api_is_retried(feishu: FakeFeishu) -> None:
    async with sender_at("http://127.0.0.1:9") as spec:
        with pytest.raises(SendError) as caught:
            await spec.sender.send(reply())
    assert caught.value.permanent is False


async def test_attachments_are_uploaded_and_sent_after_the_text_each_with_its_own_uuid(
    feishu: FakeFeishu, tmp_path: Path
) -> None:
    settings = StoreSettings.model_validate(
        {"path": tmp_path / "feishu.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )
    store = SQLiteStore(settings, OutboxSettings())
    await store.open()
    try:
        png, pdf = b"\x89PNG screenshot", b"%PDF-1.7 guide"
        blobs = BlobDir(tmp_path / "blobs")
        attachments = (
            OutboundAttachment(
                name="steps.png", content_type="image/png", size=len(png), sha256=blobs.put(png)
            ),
            OutboundAttachment(
                name="vpn.pdf", content_type="application/pdf", size=len(pdf), sha256=blobs.put(pdf)
            ),
        )
        async with sender_at(feishu.base, store) as spec:
            sent = await spec.sender.send(reply(attachments=attachments))
            again = await spec.sender.send(reply(attachments=attachments))  # a retry: nothing sent twice
    finally:
        await store.close()
    text, image, file = feishu.sent
    assert [m["msg_type"] for m in (text, image, file)] == ["text", "image", "file"]
    assert len({m["uuid"] for m in (text, image, file)}) == 3
    assert orjson.loads(image["content"])["image_key"] in feishu.uploads
    name, data, fields = feishu.uploads[orjson.loads(file["content"])["file_key"]]
    assert (name, data, fields["file_type"]) == ("vpn.pdf", pdf, "stream")
    assert sent.detail["message_ids"] == again.detail["message_ids"]
    assert len(feishu.sent) == 3
