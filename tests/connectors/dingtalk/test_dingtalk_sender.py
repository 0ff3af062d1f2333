"""The DingTalk reply sender against a local server answering like DingTalk, errors included:
the session webhook while valid, else the robot send APIs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.dingtalk import DingTalkConnector
from core.channel import OutboundReply, SendError, SenderSpec
from core.model import Identity, IdentityKind
from core.settings import Settings
from gateway.channels import GatewayContext
from tests.connectors.dingtalk.fake_dingtalk import APP_KEY, APP_SECRET, FakeDingTalk
from tests.connectors.dingtalk.kit import CORP, STAFF
from tests.support.channels import set_up


@pytest.fixture
async def dingtalk(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeDingTalk:
    fake = FakeDingTalk()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


@contextlib.asynccontextmanager
async def sender_at(base: str) -> AsyncIterator[SenderSpec]:
    settings = Settings.model_validate(
        {
            "tenants": {"acme": {}},
            "inboxes": {"it-desk": {"tenant": "acme"}},
            "channels": {
                "dingtalk": {
                    "api_base": base,
                    "oapi_base": base,
                    "api_timeout": 2,
                    "inboxes": {
                        "it-desk": {
                            "mode": "http",
                            "app_key": APP_KEY,
                            "app_secret": APP_SECRET,
                            "fetch_media": False,
                            "directory_emails": False,
                        }
                    },
                }
            },
        }
    )
    connector = DingTalkConnector.from_settings(settings)
    assert connector is not None

    async def ingest(*_: Any) -> Any:
        raise AssertionError("no ingest in sender tests")

    specs: dict[str, SenderSpec] = {}
    ctx: GatewayContext = set_up(web.Application(), connector, ingest, settings=settings, senders=specs)
    try:
        yield specs["dingtalk"]
    finally:
        for client in ctx._clients:
            await client.close()


@pytest.fixture
async def spec(dingtalk: FakeDingTalk) -> AsyncIterator[SenderSpec]:
    async with sender_at(dingtalk.base) as made:
        yield made


def reply(answering: dict[str, Any], text: str = "We reset your VPN profile.", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "command_id": "cmd-1",
        "tenant": "acme",
        "channel": "dingtalk",
        "inbox": "it-desk",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "thread_number": 3,
        "subject": None,
        "recipient": Identity(kind=IdentityKind.DINGTALK_STAFF_ID, value=f"{CORP}:{STAFF}", verified=True),
        "text": text,
        "answering": answering,
    }
    values.update(kw)
    return OutboundReply(**values)


def single(**more: Any) -> dict[str, Any]:
    return {
        "conversation_type": "single",
        "conversation_id": "cidSingle==",
        "robot_code": APP_KEY,
        "staff_id": STAFF,
        **more,
    }


async def test_a_valid_session_webhook_is_used(spec: SenderSpec, dingtalk: FakeDingTalk) -> None:
    expires = int(time.time() * 1000) + 3_600_000
    sent = await spec.sender.send(
        reply(
            single(
                session_webhook=f"{dingtalk.base}/robot/sendBySession?session=abc",
                session_webhook_expires=expires,
            )
        )
    )
    [posted] = dingtalk.sent
    assert posted == {
        "msgtype": "text",
        "text": {"content": "We reset your VPN profile."},
        "api": "session",
        "session": "abc",
    }
    assert sent.detail["via"] == "session_webhook"
    assert spec.idempotent is False


async def test_an_expired_or_foreign_webhook_falls_back_to_the_robot_api(
    spec: SenderSpec, dingtalk: FakeDingTalk
) -> None:
    expired = int(time.time() * 1000) - 1
    await spec.sender.send(
        reply(
            single(
                session_webhook=f"{dingtalk.base}/robot/sendBySession?session=old",
                session_webhook_expires=expired,
            )
        )
    )
    later = int(time.time() * 1000) + 3_600_000
    await spec.sender.send(
        reply(
            single(
                session_webhook="https://attacker.example/robot/sendBySession?x=1",
                session_webhook_expires=later,
            )
        )
    )
    first, second = dingtalk.sent
    assert first["api"] == second["api"] == "batchSend"
    assert first["userIds"] == [STAFF]
    assert first["robotCode"] == APP_KEY
    assert orjson.loads(first["msgParam"]) == {"content": "We reset your VPN profile."}


async def test_a_group_is_answered_with_the_group_api(spec: SenderSpec, dingtalk: FakeDingTalk) -> None:
    sent = await spec.sender.send(reply({"conversation_type": "group", "conversation_id": "cidGroup=="}))
    [posted] = dingtalk.sent
    assert posted["api"] == "groupSend"
    assert posted["openConversationId"] == "cidGroup=="
    assert sent.provider_message_id.startswith("pqk-")


@pytest.mark.parametrize(
    ("answer", "reason", "permanent"),
    [
        ((429, {"code": "Throttling", "message": "too many"}, {"Retry-After": "3"}), "rate_limited", False),
        (
            (400, {"code": "staffId.notExisted", "message": "no such staff"}, {}),
            "recipient_unreachable",
            True,
        ),
        ((401, {"code": "InvalidAuthentication", "message": "token"}, {}), "auth", False),
        ((400, {"code": "invalidParameter.msgParam", "message": "bad"}, {}), "rejected", True),
        ((503, {"code": "ServiceUnavailable", "message": "busy"}, {}), "provider_error", False),
    ],
)
async def test_dingtalk_errors_are_sorted_for_the_dispatcher(
    spec: SenderSpec,
    dingtalk: FakeDingTalk,
    answer: tuple[int, dict[str, Any], dict[str, str]],
    reason: str,
    permanent: bool,
) -> None:
    dingtalk.script("batchSend", answer, answer)  # a refused token is retried once with a new one
    with pytest.raises(SendError) as caught:
        await spec.sender.send(reply(single()))
    assert caught.value.reason == reason
    assert caught.value.permanent is permanent
