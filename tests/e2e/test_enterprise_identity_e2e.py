"""The same employee on Feishu, on DingTalk and by mail: the tenant directories' work email links
them into one customer on the real gateway and the real bus."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from tests.connectors.dingtalk.fake_dingtalk import APP_KEY, FakeDingTalk
from tests.connectors.dingtalk.fake_dingtalk import APP_SECRET as DINGTALK_SECRET
from tests.connectors.dingtalk.kit import STAFF, robot
from tests.connectors.dingtalk.kit import signed_headers as dingtalk_headers
from tests.connectors.feishu.fake_feishu import APP_SECRET as FEISHU_SECRET
from tests.connectors.feishu.fake_feishu import FakeFeishu
from tests.connectors.feishu.kit import APP_ID, EMPLOYEE, event, sealed, signed_headers
from tests.e2e.conftest import MakeDeployment
from tests.e2e.harness import free_port
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

WORK_EMAIL = "li.na@corp.example"


@pytest.fixture
async def feishu(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeFeishu:
    fake = FakeFeishu()
    fake.users[EMPLOYEE] = {"open_id": EMPLOYEE, "enterprise_email": WORK_EMAIL}
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def dingtalk(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeDingTalk:
    fake = FakeDingTalk()
    fake.staff[STAFF] = {"userid": STAFF, "org_email": WORK_EMAIL.upper()}
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


async def test_feishu_dingtalk_and_mail_from_the_work_address_are_one_customer(
    deploy: MakeDeployment, feishu: FakeFeishu, dingtalk: FakeDingTalk
) -> None:
    port = free_port()
    d = await deploy(
        extra=f"""
[channels.feishu.inboxes.demo]
api_base = "{feishu.base}"
app_id = "{APP_ID}"
app_secret = "{FEISHU_SECRET}"
verification_token = "t"
encrypt_key = "k"
fetch_media = false

[channels.dingtalk]
api_base = "{dingtalk.base}"
oapi_base = "{dingtalk.base}"

[channels.dingtalk.inboxes.demo]
mode = "http"
app_key = "{APP_KEY}"
app_secret = "{DINGTALK_SECRET}"
fetch_media = false

[channels.email.smtp]
host = "127.0.0.1"
port = {port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["support@demo.localhost"]
"""
    )
    async with aiohttp.ClientSession() as session:
        body = sealed(event(61, "Laptop will not boot", token="t"), "k")
        async with session.post(
            f"{d.gateway.url}/feishu/demo", data=body, headers=signed_headers("k", body)
        ) as r:
            assert r.status == 200
        await d.consumer.wait_for(1)
        body = orjson.dumps(robot(62, "Any news on my laptop?"))
        async with session.post(
            f"{d.gateway.url}/dingtalk/demo", data=body, headers=dingtalk_headers(DINGTALK_SECRET)
        ) as r:
            assert r.status == 200

    def send() -> None:
        raw = (
            f"From: Li Na <{WORK_EMAIL}>\r\nTo: support@demo.localhost\r\nSubject: laptop\r\n"
            "Message-ID: <laptop-1@corp.example>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\nStill broken.\r\n"
        ).encode()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.sendmail(WORK_EMAIL, ["support@demo.localhost"], raw)

    await d.consumer.wait_until(
        lambda: sum(1 for r in d.consumer.distinct() if r.type == "message.received") >= 2, within=20
    )
    await asyncio.to_thread(send)
    await d.consumer.wait_until(
        lambda: sum(1 for r in d.consumer.distinct() if r.type == "message.received") >= 3, within=20
    )
    events: list[dict[str, Any]] = [validate_event(r.body) for r in d.consumer.distinct()]
    received = [e for e in events if e["type"] == "message.received"]
    feishu_event, dingtalk_event, mail = received
    merges = [e for e in events if e["type"] == "customer.merged"]
    survivor = mail["customer"]["id"]
    # The mail found the customer that owns the work email; the two chat customers are that customer
    # or were merged into it.
    merged = {survivor} | {m for e in merges for m in e["customer"].get("merged", [])}
    assert feishu_event["customer"]["id"] in merged
    assert dingtalk_event["customer"]["id"] in merged
    kinds = {i["kind"] for i in mail["customer"]["identities"]}
    assert {"email", "feishu_open_id", "dingtalk_staff_id"} <= kinds
