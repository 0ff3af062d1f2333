"""The API channel's way back: replies POSTed to the inbox's callback URL, signed like Stripe's webhooks,
against a local receiver that verifies them the way docs/channels/api.md tells an app to."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.api import ApiConnector
from connectors.api.callback import SIGNATURE_HEADER, sign, verify
from core.channel import OutboundAttachment, OutboundReply, SendError, SenderSpec
from core.errors import ConfigError
from core.model import Identity, IdentityKind
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.channels import GatewayContext
from gateway.store.blobs import BlobDir
from gateway.store.sqlite import SQLiteStore
from tests.connectors.form.fake_ingest import FakeIngest
from tests.support.channels import set_up

KEY = "app-key-0123456789abcdef"
SECRET, OLD_SECRET = "whsec-new-0123456789abcdef", "whsec-old-0123456789abcdef"


@dataclass
class Receiver:
    """An app's callback endpoint: verifies the signature with its one secret, then answers as told."""

    secret: str = SECRET
    answers: list[web.Response] = field(default_factory=list)
    delay: float = 0.0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/ticketgate/replies", self.handle)
        app.router.add_post("/moved", self.moved)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        await asyncio.sleep(self.delay)
        if not verify(request.headers.get(SIGNATURE_HEADER, ""), body, self.secret, now=time.time()):
            return web.json_response({"error": "bad signature"}, status=400)
        if self.answers:
            return self.answers.pop(0)
        return web.json_response({"id": "app-msg-1"}, status=201)

    async def moved(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ticketgate/replies")


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    made = Receiver()
    server: TestServer = await aiohttp_server(made.app())
    made.url = str(server.make_url("/ticketgate/replies"))
    return made


def settings(url: str, secrets: list[str] | None = None, **inbox: Any) -> Settings:
    return Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"app": {"tenant": "acme"}},
        "channels": {"api": {"callback_timeout": 2, "inboxes": {"app": {
            "keys": [KEY], "callback_url": url, "callback_secrets": secrets or [SECRET], **inbox,
        }}}},
    })


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    config = StoreSettings.model_validate(
        {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )
    instance = SQLiteStore(config, OutboxSettings())
    await instance.open()
    yield instance
    await instance.close()


class Rig:
    def __init__(self, config: Settings, store: SQLiteStore) -> None:
        connector = ApiConnector.from_settings(config)
        assert connector is not None
        self.specs: dict[str, SenderSpec] = {}
        self.ctx: GatewayContext = set_up(
            web.Application(), connector, FakeIngest(), settings=config, store=store, senders=self.specs
        )

    async def send(self, reply: OutboundReply) -> Any:
        return await self.specs["api"].sender.send(reply)

    async def close(self) -> None:
        for client in self.ctx._clients:
            await client.close()


@pytest.fixture
async def rig(receiver: Receiver, store: SQLiteStore) -> AsyncIterator[Rig]:
    made = Rig(settings(receiver.url), store)
    yield made
    await made.close()


def reply(**kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "command_id": "desk-cmd-17",
        "tenant": "acme",
        "channel": "api",
        "inbox": "app",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "thread_number": 12,
        "subject": "退款",
        "recipient": Identity(kind=IdentityKind.EXTERNAL, value="app:u-42", verified=True),
        "text": "退款已经处理，三个工作日内到账。",
        "agent_name": "王芳",
        "answering_external_id": "order-4711-msg-1",
    }
    values.update(kw)
    return OutboundReply(**values)


async def test_the_reply_arrives_signed_and_the_apps_id_is_kept(rig: Rig, receiver: Receiver) -> None:
    sent = await rig.send(reply())
    assert sent.provider_message_id == "app-msg-1"
    [(headers, body)] = receiver.received
    payload = orjson.loads(body)
    assert payload["type"] == "reply"
    assert payload["reply_id"] == "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98"
    assert payload["customer_external_id"] == "u-42"
    assert payload["in_reply_to"] == "order-4711-msg-1"
    assert (payload["text"], payload["agent_name"], payload["thread_number"]) == (
        "退款已经处理，三个工作日内到账。", "王芳", 12
    )
    assert headers["Idempotency-Key"] == payload["reply_id"]
    # The signature is what the documentation says: HMAC-SHA256 of "t.body", hex.
    t, v1 = (item.split("=", 1)[1] for item in headers[SIGNATURE_HEADER].split(","))
    assert v1 == hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


async def test_without_an_id_in_the_answer_ours_stands(rig: Rig, receiver: Receiver) -> None:
    receiver.answers.append(web.Response(status=204))
    sent = await rig.send(reply())
    assert sent.provider_message_id == "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98"


async def test_attachments_travel_inline(rig: Rig, receiver: Receiver, tmp_path: Path) -> None:
    data = b"%PDF-1.4 invoice"
    sha = BlobDir(tmp_path / "blobs").put(data)
    attachment = OutboundAttachment(
        name="invoice.pdf", content_type="application/pdf", size=len(data), sha256=sha
    )
    await rig.send(reply(attachments=(attachment,)))
    [(_, body)] = receiver.received
    [sent] = orjson.loads(body)["attachments"]
    assert base64.b64decode(sent["data_base64"]) == data
    assert (sent["name"], sent["sha256"]) == ("invoice.pdf", sha)


@pytest.mark.parametrize(
    ("status", "reason", "permanent"),
    [
        (400, "rejected", True),
        (401, "auth", False),  # retried: the secret gets fixed
        (404, "recipient_unreachable", True),
        (413, "too_large", True),
        (422, "rejected", True),
        (408, "timeout", False),
        (429, "rate_limited", False),
        (500, "provider_error", False),
        (503, "provider_error", False),
    ],
)
async def test_the_apps_answer_decides(
    rig: Rig, receiver: Receiver, status: int, reason: str, permanent: bool
) -> None:
    receiver.answers.append(web.Response(status=status, text="nope", headers={"Retry-After": "7"}))
    with pytest.raises(SendError) as raised:
        await rig.send(reply())
    assert (raised.value.reason, raised.value.permanent) == (reason, permanent)
    assert raised.value.detail.startswith(f"HTTP {status}: nope")
    if not permanent:
        assert raised.value.retry_after == 7.0


async def test_a_slow_app_is_a_timeout_to_retry(rig: Rig, receiver: Receiver) -> None:
    receiver.delay = 5.0  # past callback_timeout (2 s)
    with pytest.raises(SendError) as raised:
        await rig.send(reply())
    assert (raised.value.reason, raised.value.permanent) == ("timeout", False)


async def test_an_unreachable_app_is_retried(store: SQLiteStore) -> None:
    made = Rig(settings("http://127.0.0.1:9/replies"), store)
    try:
        with pytest.raises(SendError) as raised:
            await made.send(reply())
    finally:
        await made.close()
    assert (raised.value.reason, raised.value.permanent) == ("provider_error", False)


async def test_redirects_are_not_followed(receiver: Receiver, store: SQLiteStore) -> None:
    made = Rig(settings(receiver.url.replace("/ticketgate/replies", "/moved")), store)
    try:
        with pytest.raises(SendError) as raised:
            await made.send(reply())
    finally:
        await made.close()
    assert (raised.value.reason, raised.value.permanent) == ("rejected", True)
    assert receiver.received == []


async def test_during_a_rotation_both_secrets_sign(receiver: Receiver, store: SQLiteStore) -> None:
    receiver.secret = OLD_SECRET  # the app has not moved to the new secret yet
    made = Rig(settings(receiver.url, [SECRET, OLD_SECRET]), store)
    try:
        sent = await made.send(reply())
    finally:
        await made.close()
    assert sent.provider_message_id == "app-msg-1"
    [(headers, _)] = receiver.received
    assert headers[SIGNATURE_HEADER].count("v1=") == 2


def test_verify_refuses_a_stale_timestamp_and_a_wrong_secret() -> None:
    body = b'{"type":"reply"}'
    header = sign([SECRET], 1_700_000_000, body)
    assert verify(header, body, SECRET, now=1_700_000_100)
    assert not verify(header, body, SECRET, now=1_700_000_400)  # past five minutes: a replay
    assert not verify(header, body, OLD_SECRET, now=1_700_000_100)
    assert not verify(header, body + b" ", SECRET, now=1_700_000_100)
    assert not verify("v1=" + header.split("v1=")[1], body, SECRET, now=1_700_000_100)  # no t


def test_inboxes_without_a_callback_register_no_sender(store: SQLiteStore) -> None:
    config = Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"app": {"tenant": "acme"}},
        "channels": {"api": {"inboxes": {"app": {"keys": [KEY]}}}},
    })
    connector = ApiConnector.from_settings(config)
    assert connector is not None
    specs: dict[str, SenderSpec] = {}
    set_up(web.Application(), connector, FakeIngest(), settings=config, store=store, senders=specs)
    assert specs == {}


@pytest.mark.parametrize(
    ("inbox", "message"),
    [
        ({"callback_secrets": []}, "callback_url needs callback_secrets"),
        ({"callback_secrets": ["short"]}, "at least 16 characters"),
        ({"callback_url": "http://app.example.com/replies"}, "https://"),
    ],
)
def test_callback_settings_fail_closed(inbox: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ApiConnector.from_settings(settings("https://app.example.com/replies", **inbox))
