"""The Douyin webhook and sender: signed pushes in (verify_webhook, private messages, comments,
forgeries, hostile bodies), replies out against a local server answering like open.douyin.com."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.douyin import DESCRIPTOR, DouyinConnector
from connectors.douyin.account import signature
from core.channel import OutboundReply, SendError, SenderSpec
from core.errors import ConfigError
from core.model import Identity, IdentityKind
from core.settings import Settings
from gateway.metrics import Metrics
from tests.connectors.douyin.fake_api import FakeDouyin, douyin_error
from tests.connectors.wechat.test_wechat_callbacks import FakeIngest
from tests.support.channels import set_up

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "douyin"
SECRET, OLD_SECRET, TOKEN = "dev-douyin-secret", "old-douyin-secret", "act.dev-douyin-token"
CLIENT_KEY, BRAND = "awdemo0123456789", "_000brandOpenId000001"
Client = TestClient[web.Request, web.Application]


def settings(api_base: str = "http://127.0.0.1:9", **app: Any) -> Settings:
    config = {
        "inbox": "dy",
        "client_key": CLIENT_KEY,
        "client_secret": SECRET,
        "previous_client_secret": OLD_SECRET,
        "access_token": TOKEN,
        "account_open_id": BRAND,
        **app,
    }
    return Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"dy": {"tenant": "acme"}},
            "channels": {
                "douyin": {"api_base": api_base, "max_body_bytes": 32 * 1024, "apps": {"brand": config}}
            },
        }
    )


@pytest.fixture
async def fake(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeDouyin, str]:
    api = FakeDouyin(token=TOKEN, account=BRAND)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("")).rstrip("/")


class Rig:
    def __init__(self, client: Client, ingest: FakeIngest, metrics: Metrics, spec: SenderSpec) -> None:
        self.client, self.ingest, self.metrics, self.spec = client, ingest, metrics, spec

    async def post(self, body: bytes, *, secret: str | None = SECRET, msg_id: str = "m1") -> Any:
        headers = {"Content-Type": "application/json", "Msg-Id": msg_id}
        if secret is not None:
            headers["X-Douyin-Signature"] = signature(secret, body)
        return await self.client.post("/douyin/brand", data=body, headers=headers)


@pytest.fixture
async def rig(
    aiohttp_client: Callable[..., Awaitable[Client]], fake: tuple[FakeDouyin, str]
) -> AsyncIterator[Rig]:
    config = settings(fake[1])
    connector = DouyinConnector.from_settings(config)
    assert connector is not None
    ingest, metrics, specs = FakeIngest(), Metrics(), {}
    app = web.Application()
    ctx = set_up(app, connector, ingest, settings=config, metrics=metrics, senders=specs)
    client = await aiohttp_client(app)
    yield Rig(client, ingest, metrics, specs["douyin"])
    for http in ctx._clients:
        await http.close()


def test_the_descriptor_answers_within_douyins_five_seconds() -> None:
    assert DESCRIPTOR.deadline == 5.0
    assert IdentityKind.DOUYIN_OPEN_ID in DESCRIPTOR.identity_kinds


def test_an_app_without_its_secret_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="client_secret"):
        DouyinConnector.from_settings(settings(client_secret=None))
    with pytest.raises(ConfigError, match="account_open_id"):
        DouyinConnector.from_settings(settings(account_open_id=None))


def test_the_signature_is_the_documented_one() -> None:
    # The console's own example body; SHA-1 over secret + body, hex (webhooks/summarize).
    body = b'{"event":"verify_webhook","client_key":"abc","content":{"challenge":12345}}'
    assert signature("secret", body) == __import__("hashlib").sha1(b"secret" + body).hexdigest()


async def test_verify_webhook_answers_the_challenge_and_stores_nothing(rig: Rig) -> None:
    body = b'{"event":"verify_webhook","client_key":"","content":{"challenge":12345}}'
    answer = await rig.post(body)
    assert answer.status == 200
    assert orjson.loads(await answer.read()) == {"challenge": 12345}
    assert rig.ingest.envelopes == []


async def test_a_signed_private_message_is_stored_then_answered(rig: Rig) -> None:
    body = (FIXTURES / "im_text.json").read_bytes()
    answer = await rig.post(body, msg_id="7311111111111111111")
    assert answer.status == 200
    [envelope] = rig.ingest.envelopes
    assert envelope.body == body
    assert envelope.signature_verified
    assert envelope.meta["msg_id"] == "7311111111111111111"
    assert "x-douyin-signature" not in envelope.headers


async def test_the_previous_secret_is_accepted_during_a_rotation(rig: Rig) -> None:
    assert (await rig.post((FIXTURES / "im_text.json").read_bytes(), secret=OLD_SECRET)).status == 200


async def test_forged_or_unsigned_pushes_are_refused_before_parsing(rig: Rig) -> None:
    broken = b'{"event": "im_receive_msg", "content": {'
    assert (await rig.post(broken, secret="not-the-secret")).status == 401
    assert (await rig.post(broken, secret=None)).status == 401
    assert rig.ingest.envelopes == []
    assert b'reason="signature"} 2.0' in rig.metrics.exposition()


async def test_hostile_bodies_are_refused_without_harm(rig: Rig) -> None:
    deep = b'{"event":"im_receive_msg","content":' + b'{"a":' * 3000 + b"1" + b"}" * 3001
    assert (await rig.post(deep)).status == 400
    huge = b'{"event":"im_receive_msg","content":{"text":"' + b"x" * (64 * 1024) + b'"}}'
    assert (await rig.post(huge)).status == 413
    assert rig.ingest.envelopes == []


def reply(answering: dict[str, Any], text: str = "您好，已为您补发。", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a11",
        "command_id": "cmd",
        "tenant": "acme",
        "channel": "douyin",
        "inbox": "dy",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a11",
        "thread_number": 1,
        "subject": None,
        "text": text,
        "answering": answering,
        "recipient": Identity(kind=IdentityKind.DOUYIN_OPEN_ID, value=f"{CLIENT_KEY}:_000customerOpenId0001"),
        "last_inbound_at": datetime.now(UTC),
    }
    values.update(kw)
    return OutboundReply(**values)


IM = {
    "account": "brand",
    "source": None,
    "from_user_id": "_000customerOpenId0001",
    "conversation_short_id": "@conv==",
    "server_message_id": "@srv1==",
}
COMMENT = {
    "account": "brand",
    "source": "comment",
    "from_user_id": "_000customerOpenId0002",
    "comment_id": "@c1==",
    "item_id": "@item1==",
}


async def test_a_private_message_is_answered_in_its_conversation(
    rig: Rig, fake: tuple[FakeDouyin, str]
) -> None:
    sent = await rig.spec.sender.send(reply(IM))
    assert fake[0].sent == [
        {
            "api": "im",
            "msg_id": "@srv1==",
            "conversation_id": "@conv==",
            "to_user_id": "_000customerOpenId0001",
            "content": {"msg_type": 1, "text": {"text": "您好，已为您补发。"}},
        }
    ]
    assert sent.provider_message_id == "@sent1=="


async def test_a_comment_is_answered_by_a_comment_reply_outside_the_window(
    rig: Rig, fake: tuple[FakeDouyin, str]
) -> None:
    assert rig.spec.window == 48 * 3600
    assert rig.spec.outside_window is not None
    assert rig.spec.outside_window(reply(COMMENT))
    assert not rig.spec.outside_window(reply(IM))
    await rig.spec.sender.send(reply(COMMENT))
    assert fake[0].sent == [
        {"api": "comment", "item_id": "@item1==", "comment_id": "@c1==", "content": "您好，已为您补发。"}
    ]


@pytest.mark.parametrize(
    ("status", "answer", "reason", "permanent"),
    [
        (200, douyin_error(2190008, "access_token过期"), "auth", True),
        (200, douyin_error(2190004, "应用未获得该能力"), "auth", True),
        (200, douyin_error(2100004, "系统繁忙"), "provider_error", False),
        (200, douyin_error(2100009, "用户被禁封"), "blocked", True),
        (200, {"err_no": 2100004, "err_msg": "系统繁忙", "log_id": "1"}, "provider_error", False),
        (429, {}, "rate_limited", False),
        (502, {}, "provider_error", False),
    ],
)
async def test_douyin_errors_map_to_reasons(
    rig: Rig, fake: tuple[FakeDouyin, str], status: int, answer: dict[str, Any], reason: str, permanent: bool
) -> None:
    fake[0].errors.append((status, answer))
    with pytest.raises(SendError) as raised:
        await rig.spec.sender.send(reply(IM))
    assert (raised.value.reason, raised.value.permanent) == (reason, permanent)
    assert fake[0].sent == []


async def test_attachments_and_overlong_text_fail_before_any_call(
    rig: Rig, fake: tuple[FakeDouyin, str]
) -> None:
    with pytest.raises(SendError) as raised:
        await rig.spec.sender.send(reply(IM, text="x" * 501))
    assert raised.value.reason == "too_large"
    with pytest.raises(SendError) as missing:
        await rig.spec.sender.send(reply({**IM, "conversation_short_id": None}))
    assert missing.value.reason == "recipient_unreachable"
    assert fake[0].sent == []


async def test_a_conversation_of_another_authorized_account_is_not_answered(
    rig: Rig, fake: tuple[FakeDouyin, str]
) -> None:
    with pytest.raises(SendError) as raised:
        await rig.spec.sender.send(reply({**IM, "to_user_id": "_000otherBrand"}))
    assert (raised.value.reason, raised.value.permanent) == ("unsupported", True)
    await rig.spec.sender.send(reply({**IM, "to_user_id": BRAND}))
    assert len(fake[0].sent) == 1
