"""The Weibo fan-service channel: the handshake, signed pushes, forgeries, stale timestamps, hostile
bodies; replies against a local server answering like Weibo's reply API, the mention rule included."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.weibo import DESCRIPTOR, WeiboConnector
from connectors.weibo.account import signature
from core.channel import OutboundReply, SendError, SenderSpec
from core.errors import ConfigError
from core.model import Identity, IdentityKind
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.metrics import Metrics
from gateway.store.sqlite import SQLiteStore
from tests.connectors.wechat.test_wechat_callbacks import FakeIngest
from tests.connectors.weibo.fake_api import FakeWeibo, weibo_error
from tests.support.channels import set_up

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "weibo"
SECRET, OLD_SECRET, TOKEN = "dev-weibo-secret", "old-weibo-secret", "2.00dev-weibo-token"
Client = TestClient[web.Request, web.Application]


def settings(api_base: str = "http://127.0.0.1:9", **account: Any) -> Settings:
    config = {
        "inbox": "wb",
        "app_secret": SECRET,
        "previous_app_secret": OLD_SECRET,
        "access_token": TOKEN,
        **account,
    }
    return Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"wb": {"tenant": "acme"}},
            "channels": {
                "weibo": {"api_base": api_base, "max_body_bytes": 32 * 1024, "accounts": {"brand": config}}
            },
        }
    )


def signed(secret: str = SECRET, timestamp: str | None = None, nonce: str = "57155157") -> dict[str, str]:
    timestamp = timestamp or str(int(time.time() * 1000))
    return {"signature": signature(secret, timestamp, nonce), "timestamp": timestamp, "nonce": nonce}


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeWeibo, str]:
    api = FakeWeibo(token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """The channel's state (the mention rule) lives in the store."""
    config = StoreSettings.model_validate(
        {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )
    instance = SQLiteStore(config, OutboxSettings())
    await instance.open()
    yield instance
    await instance.close()


class Rig:
    def __init__(self, client: Client, ingest: FakeIngest, metrics: Metrics, spec: SenderSpec) -> None:
        self.client, self.ingest, self.metrics, self.spec = client, ingest, metrics, spec


@pytest.fixture
async def rig(
    aiohttp_client: Callable[..., Awaitable[Client]],
    fake: tuple[FakeWeibo, str],
    store: SQLiteStore,
) -> AsyncIterator[Rig]:
    config = settings(fake[1])
    connector = WeiboConnector.from_settings(config)
    assert connector is not None
    ingest, metrics, specs = FakeIngest(), Metrics(), {}
    app = web.Application()
    ctx = set_up(app, connector, ingest, settings=config, metrics=metrics, senders=specs, store=store)
    client = await aiohttp_client(app)
    yield Rig(client, ingest, metrics, specs["weibo"])
    for http in ctx._clients:
        await http.close()


def test_the_descriptor_and_a_missing_secret() -> None:
    assert IdentityKind.WEIBO in DESCRIPTOR.identity_kinds
    with pytest.raises(ConfigError, match="app_secret"):
        WeiboConnector.from_settings(settings(app_secret=None))


def test_the_signature_is_weibos_documented_vector() -> None:
    # Messages_api_start: appsecret=xyz123xyz, timestamp=1397022061823, nonce=57155157.
    assert signature("xyz123xyz", "1397022061823", "57155157") == "90e4c22c90a58f26526c2dd5b6c56c8822edeaa1"


async def test_the_handshake_echoes_echostr_only_when_signed_and_fresh(rig: Rig) -> None:
    ok = await rig.client.get("/weibo/brand", params={**signed(), "echostr": "abc123"})
    assert (ok.status, await ok.text()) == (200, "abc123")
    forged = await rig.client.get("/weibo/brand", params={**signed("wrong"), "echostr": "abc123"})
    assert forged.status == 401
    stale = await rig.client.get("/weibo/brand", params={**signed(timestamp="1397022061823"), "echostr": "a"})
    assert stale.status == 403


async def test_a_signed_push_is_stored_then_answered(rig: Rig) -> None:
    body = (FIXTURES / "text.json").read_bytes()
    answer = await rig.client.post("/weibo/brand", params=signed(), data=body)
    assert (answer.status, await answer.text()) == (200, "")
    [envelope] = rig.ingest.envelopes
    assert envelope.body == body
    assert envelope.meta == {"account": "brand"}
    rotated = await rig.client.post("/weibo/brand", params=signed(OLD_SECRET), data=body)
    assert rotated.status == 200


async def test_forged_pushes_are_refused_before_the_body_is_read(rig: Rig) -> None:
    broken = b'{"type": "text", "sender_id": '
    assert (await rig.client.post("/weibo/brand", params=signed("wrong"), data=broken)).status == 401
    assert (await rig.client.post("/weibo/brand", data=broken)).status == 401
    assert rig.ingest.envelopes == []
    assert b'reason="signature"} 2.0' in rig.metrics.exposition()


async def test_hostile_bodies_are_refused_without_harm(rig: Rig) -> None:
    deep = b'{"type":"text","data":' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert (await rig.client.post("/weibo/brand", params=signed(), data=deep)).status == 400
    huge = b'{"type":"text","text":"' + b"x" * (64 * 1024) + b'"}'
    assert (await rig.client.post("/weibo/brand", params=signed(), data=huge)).status == 413
    assert rig.ingest.envelopes == []


def reply(answering: dict[str, Any], text: str = "您好，已为您催促快递。", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a22",
        "command_id": "cmd",
        "tenant": "acme",
        "channel": "weibo",
        "inbox": "wb",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a22",
        "thread_number": 1,
        "subject": None,
        "text": text,
        "answering": answering,
        "recipient": Identity(kind=IdentityKind.WEIBO, value="2489518277"),
        "last_inbound_at": datetime.now(UTC),
    }
    values.update(kw)
    return OutboundReply(**values)


TEXT = {"account": "brand", "type": "text", "sender_id": "2489518277", "created_at": "x", "data": {}}
MENTION = {
    "account": "brand",
    "type": "mention",
    "sender_id": "2489518278",
    "created_at": "Fri Dec 05 16:00:05 +0800 2025",
    "data": {"subtype": "status", "key": "4981"},
}


async def test_a_reply_goes_to_the_fan_form_encoded(rig: Rig, fake: tuple[FakeWeibo, str]) -> None:
    assert rig.spec.window == 48 * 3600
    sent = await rig.spec.sender.send(reply(TEXT))
    assert fake[0].sent == [
        {
            "type": "text",
            "receiver_id": "2489518277",
            "data": {"text": "您好，已为您催促快递。"},
            "save_sender_box": "1",
        }
    ]
    assert sent.provider_message_id == "4981000000000001"


async def test_a_mention_is_answered_once(rig: Rig, fake: tuple[FakeWeibo, str]) -> None:
    await rig.spec.sender.send(reply(MENTION))
    with pytest.raises(SendError) as raised:
        await rig.spec.sender.send(reply(MENTION, reply_id="rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a23"))
    assert (raised.value.reason, raised.value.permanent) == ("window_closed", True)
    assert len(fake[0].sent) == 1


async def test_a_refused_mention_reply_may_be_tried_again(rig: Rig, fake: tuple[FakeWeibo, str]) -> None:
    fake[0].errors.append(weibo_error(10001, "system error", 500))
    with pytest.raises(SendError):
        await rig.spec.sender.send(reply(MENTION))
    await rig.spec.sender.send(reply(MENTION))
    assert len(fake[0].sent) == 1


@pytest.mark.parametrize(
    ("answer", "reason", "permanent"),
    [
        (weibo_error(21327, "expired_token", 401), "auth", True),
        (weibo_error(10014, "Insufficient app permissions!", 403), "auth", True),
        (weibo_error(10023, "User requests out of rate limit!", 403), "rate_limited", False),
        (weibo_error(10009, "Too many pending tasks, system is busy!", 500), "provider_error", False),
        (weibo_error(20003, "User does not exists!"), "recipient_unreachable", True),
        (weibo_error(29999, "something new"), "rejected", True),
    ],
)
async def test_weibo_errors_map_to_reasons(
    rig: Rig, fake: tuple[FakeWeibo, str], answer: tuple[int, dict[str, Any]], reason: str, permanent: bool
) -> None:
    fake[0].errors.append(answer)
    with pytest.raises(SendError) as raised:
        await rig.spec.sender.send(reply(TEXT))
    assert (raised.value.reason, raised.value.permanent) == (reason, permanent)
