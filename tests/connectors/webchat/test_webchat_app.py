"""The web chat on the real channel context, pipeline and SQLite store: the widget's protocol over
a real socket, uploads, identities, limits, and the sender's way back to the widget."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.webchat import DESCRIPTOR, tokens
from core.channel import OutboundAttachment, OutboundReply, SendError, SenderSpec
from core.model import Identity
from core.settings import Settings
from gateway.channels import GatewayContext, Registry
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.store import build_store
from gateway.store.base import Store
from tests.connectors.webchat.kit import (
    IDENTITY_SECRET,
    ORIGIN,
    ChatSocket,
    settings_for,
    token_for,
)

Client = TestClient[web.Request, web.Application]


@dataclass
class Chat:
    client: Client
    store: Store
    metrics: Metrics
    senders: dict[str, SenderSpec]
    reports: list[tuple[str, str]] = field(default_factory=list)

    async def socket(self, origin: str | None = ORIGIN) -> ChatSocket:
        headers = {"Origin": origin} if origin else {}
        ws = await self.client.ws_connect("/chat/demo/ws", headers=headers)
        return ChatSocket(ws)

    async def events(self) -> list[dict[str, Any]]:
        rows = await self.store.outbox_fetch(10_000)
        return [orjson.loads(row.body) for row in rows if row.type == "message.received"]

    def refusals(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for family in self.metrics.registry.collect():
            for sample in family.samples:
                if sample.name == "ticketgate_refusals_total" and sample.labels["channel"] == "webchat":
                    counts[sample.labels["reason"]] = counts.get(sample.labels["reason"], 0.0) + sample.value
        return counts


MakeChat = Callable[..., Awaitable[Chat]]


@pytest.fixture
async def make_chat(tmp_path: Path) -> AsyncIterator[MakeChat]:
    clients: list[Client] = []

    async def make(settings: Settings | None = None, shared: Store | None = None, **chat: Any) -> Chat:
        """A gateway; ``shared``: another instance on the same store (as on PostgreSQL)."""
        settings = settings or settings_for(tmp_path, **chat)
        store = shared or build_store(settings)
        metrics = Metrics()
        pipeline = Pipeline(settings, store, metrics)
        app = web.Application()

        async def store_ctx(_app: web.Application) -> AsyncIterator[None]:
            await store.open()
            yield
            await store.close()

        if shared is None:
            app.cleanup_ctx.append(store_ctx)
        senders: dict[str, SenderSpec] = {}
        made = Chat(client=None, store=store, metrics=metrics, senders=senders)  # type: ignore[arg-type]

        async def deliveries(channel: str, pmid: str, status: str, at: datetime, *_: Any) -> bool:
            made.reports.append((pmid, status))
            return True

        registry = Registry.installed()
        for name in ("webchat", "api"):
            descriptor = registry.get(name)
            connector = descriptor.connector.from_settings(settings)
            if connector is None:
                continue
            ctx = GatewayContext(
                app,
                descriptor,
                settings=settings,
                ingest=pipeline.ingest,
                store=store,
                metrics=metrics,
                senders=senders,
                deliveries=deliveries,
            )  # type: ignore[arg-type]
            connector.setup(ctx)
        client: Client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        made.client = client
        return made

    yield make
    for client in clients:
        await client.close()


def reply(
    reply_id: str, answering: dict[str, Any], text: str = "Your refund is on its way."
) -> OutboundReply:
    return OutboundReply(
        reply_id=reply_id,
        command_id=f"cmd-{reply_id}",
        tenant="demo",
        channel="webchat",
        inbox="demo",
        thread_id="t",
        thread_number=1,
        subject=None,
        recipient=Identity(kind="webchat_visitor", value=f"demo:{answering.get('session', 'x')}"),
        text=text,
        agent_name="Mei",
        answering=answering,
    )


async def test_a_message_is_acknowledged_after_the_commit_and_a_resend_makes_no_second_event(
    make_chat: MakeChat,
) -> None:
    chat = await make_chat()
    sock = await chat.socket()
    welcome = await sock.hello(page="https://shop.example/orders/58213?reset_token=secret#top")
    assert welcome["verified"] is False
    assert welcome["token"]
    assert welcome["replies"] == []
    ack = await sock.say("client-0001", "我的订单还没到，请帮忙查一下")
    assert ack["type"] == "ack"
    assert ack["status"] == "accepted"
    assert ack["message_id"]
    await sock.close()
    # The widget lost the ack and sends the same message again on a new socket of the same session.
    again = await chat.socket()
    resumed = await again.hello(welcome["token"])
    assert resumed["session"] == welcome["session"]
    repeat = await again.say("client-0001", "我的订单还没到，请帮忙查一下")
    assert repeat["type"] == "ack"
    assert repeat["status"] == "duplicate"
    assert repeat["message_id"] == ack["message_id"]
    second = await again.say("client-0002", "order 123456")
    assert second["thread_id"] == ack["thread_id"]
    await again.close()
    events = await chat.events()
    assert len(events) == 2
    first = events[0]
    assert first["message"]["channel"] == "webchat"
    assert first["message"]["language"] == "zh"
    assert {"kind": "webchat_visitor", "value": f"demo:{welcome['session']}", "verified": True} in (
        first["customer"]["identities"]
    )
    assert first["message"]["extra"]["conversation"] == f"s:{welcome['session']}"
    assert first["message"]["extra"]["page"] == "https://shop.example/orders/58213"  # no query, no fragment


async def test_a_signed_in_visitor_joins_the_existing_customer_and_thread(
    make_chat: MakeChat, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path, channels={"api": {"inboxes": {"demo": {"keys": ["test-api-key-0001"]}}}}
    )
    chat = await make_chat(settings)
    existing = await chat.client.post(
        "/api/v1/messages",
        json={
            "customer": {"external_id": "u-42", "email": "ada@example.com"},
            "text": "Where is my parcel?",
        },
        headers={"Authorization": "Bearer test-api-key-0001"},
    )
    assert existing.status == 202, await existing.text()
    placed = await existing.json()
    signature = tokens.sign_identity(IDENTITY_SECRET.encode(), "u-42", "ada@example.com")
    sock = await chat.socket()
    welcome = await sock.hello(
        identity={"user_id": "u-42", "email": "ada@example.com", "signature": signature}
    )
    assert welcome["verified"] is True
    ack = await sock.say("client-0101", "It has been two weeks now")
    assert ack["thread_id"] == placed["thread_id"]
    # A forged signature is refused (and counted): that visitor chats anonymously, apart.
    forged = await chat.socket()
    anonymous = await forged.hello(identity={"user_id": "u-42", "signature": "00" * 32})
    assert anonymous["verified"] is False
    assert anonymous["identity_refused"] is True
    other = await forged.say("client-0102", "I am u-42, honestly")
    assert other["thread_id"] != placed["thread_id"]
    assert chat.refusals() == {"signature": 1.0}
    events = await chat.events()
    chat_event = next(e for e in events if e["message"]["id"] == ack["message_id"])
    assert chat_event["customer"]["id"] == events[0]["customer"]["id"]
    assert {"kind": "external", "value": "demo:u-42", "verified": True} in chat_event["customer"][
        "identities"
    ]
    assert {"kind": "email", "value": "ada@example.com", "verified": True} in chat_event["customer"][
        "identities"
    ]
    await sock.close()
    await forged.close()


async def test_a_signed_in_session_is_not_resumed_for_someone_else(make_chat: MakeChat) -> None:
    chat = await make_chat()
    sock = await chat.socket()
    token = token_for("s-shared-browser", user_id="u-1")
    welcome = await sock.hello(token)  # u-1 signed out; nobody signed in now
    assert welcome["session"] != "s-shared-browser"
    assert welcome["verified"] is False
    await sock.close()


async def test_origins_sizes_and_rates_are_bounded(make_chat: MakeChat) -> None:
    chat = await make_chat(messages_per_minute=60, message_burst=2, max_text_chars=50)
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await chat.socket(origin="https://evil.example")
    assert refused.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await chat.socket(origin=None)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await chat.socket(origin="myapp://home")  # an app's page: only allow_missing_origin admits it
    sock = await chat.socket()
    await sock.hello()
    too_long = await sock.say("client-0201", "x" * 51)
    assert too_long == {
        "type": "error",
        "client_id": "client-0201",
        "code": "too_large",
        "reason": "at most 50 characters",
    }
    assert (await sock.say("client-0202", "one"))["type"] == "ack"
    assert (await sock.say("client-0203", "two"))["type"] == "ack"
    limited = await sock.say("client-0204", "three")
    assert limited["code"] == "rate_limited"
    assert limited["retry_after"] > 0
    bad = await sock.say("client-0205", "")
    assert bad["type"] == "error"
    await sock.close()
    assert chat.refusals()["auth"] == 3.0
    assert chat.refusals()["size"] == 1.0
    assert chat.refusals()["rate_limit"] >= 1.0
    assert len(await chat.events()) == 2


async def test_a_socket_without_hello_or_idle_is_closed(make_chat: MakeChat) -> None:
    chat = await make_chat(hello_timeout=0.2, idle_timeout=0.3)
    silent = await chat.socket()
    closed = await silent.ws.receive(timeout=5)
    assert closed.type is aiohttp.WSMsgType.CLOSE
    assert closed.data == 4400
    idle = await chat.socket()
    await idle.hello()
    closed = await idle.ws.receive(timeout=5)
    assert closed.type is aiohttp.WSMsgType.CLOSE
    assert closed.data == 4408


async def test_sockets_are_capped_per_ip(make_chat: MakeChat) -> None:
    chat = await make_chat(max_sockets=3, max_sockets_per_ip=2)
    first, second = await chat.socket(), await chat.socket()
    with pytest.raises(aiohttp.WSServerHandshakeError) as full:
        await chat.socket()
    assert full.value.status == 503
    await first.close()
    await asyncio.sleep(0.05)
    third = await chat.socket()  # a closed socket frees its place
    await third.close()
    await second.close()
    await asyncio.sleep(0.05)
    events = {
        s.labels["event"]: s.value
        for f in chat.metrics.registry.collect()
        for s in f.samples
        if s.name == "ticketgate_channel_events_total" and s.labels["channel"] == "webchat"
    }
    assert events["socket_opened"] == events["socket_closed"] == 3
    assert events["socket_refused_full"] == 1


async def test_an_upload_is_a_message_with_its_file(make_chat: MakeChat) -> None:
    chat = await make_chat(max_upload_bytes=1024)
    sock = await chat.socket()
    welcome = await sock.hello()
    auth = {"Authorization": f"Bearer {welcome['token']}", "Origin": ORIGIN}

    def upload(name: str, data: bytes, content_type: str, client_id: str) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("client_id", client_id)
        form.add_field("file", data, filename=name, content_type=content_type)
        return form

    ok = await chat.client.post(
        "/chat/demo/messages",
        data=upload("receipt.png", b"\x89PNG...", "image/png", "client-0301"),
        headers=auth,
    )
    assert ok.status == 202
    answer = await ok.json()
    assert answer["type"] == "ack"
    echo = await sock.until("echo")  # the widget's other tabs see it
    assert echo["client_id"] == "client-0301"
    again = await chat.client.post(
        "/chat/demo/messages",
        data=upload("receipt.png", b"\x89PNG...", "image/png", "client-0301"),
        headers=auth,
    )
    assert again.status == 200
    assert (await again.json())["status"] == "duplicate"
    big = await chat.client.post(
        "/chat/demo/messages", data=upload("big.png", b"x" * 2048, "image/png", "client-0302"), headers=auth
    )
    assert big.status == 413
    exe = await chat.client.post(
        "/chat/demo/messages",
        data=upload("x.exe", b"MZ", "application/x-msdownload", "client-0303"),
        headers=auth,
    )
    assert exe.status == 415
    forged = await chat.client.post(
        "/chat/demo/messages",
        data=upload("a.png", b"x", "image/png", "client-0304"),
        headers={"Authorization": "Bearer forged.token", "Origin": ORIGIN},
    )
    assert forged.status == 401
    [event] = await chat.events()
    [attachment] = event["message"]["attachments"]
    assert attachment["name"] == "receipt.png"
    assert attachment["content_type"] == "image/png"
    await sock.close()


async def test_a_reply_reaches_the_open_widget_and_waits_for_one_that_is_gone(make_chat: MakeChat) -> None:
    chat = await make_chat()
    sender = chat.senders["webchat"].sender
    sock = await chat.socket()
    welcome = await sock.hello()
    ack = await sock.say("client-0401", "hello?")
    [event] = await chat.events()
    answering = event["message"]["extra"]
    sent = await sender.send(reply("r-0001", answering))
    assert sent.provider_message_id == "r-0001"
    pushed = await sock.until("reply", timeout=1.0)  # within a second
    assert pushed["id"] == "r-0001"
    assert pushed["text"] == "Your refund is on its way."
    assert pushed["agent"] == "Mei"
    await sock.send({"type": "received", "ids": ["r-0001"]})
    await sock.send({"type": "read", "ids": ["r-0001"]})
    await sock.send({"type": "ping"})
    await sock.until("pong")
    assert ("r-0001", "delivered") in chat.reports
    assert ("r-0001", "read") in chat.reports
    await sock.close()
    # The visitor is gone: the reply is held, and shown (once) when they come back.
    await sender.send(reply("r-0002", answering, "Anything else?"))
    await sender.send(reply("r-0002", answering, "Anything else?"))  # a retried send holds nothing twice
    back = await chat.socket()
    resumed = await back.hello(welcome["token"])
    assert [(r["id"], r["status"]) for r in resumed["replies"]] == [("r-0001", "read"), ("r-0002", "sent")]
    await back.close()
    assert ack["type"] == "ack"
    # An HTML-only reply is shown as its text: no agent HTML runs in the customer's page.
    await sender.send(
        dataclasses.replace(
            reply("r-0004", answering), text=None, html="<p>See <b>step 2</b><script>alert(1)</script></p>"
        )
    )
    back = await chat.socket()
    html_only = (await back.hello(welcome["token"]))["replies"][-1]
    assert html_only["text"].split() == ["See", "step", "2"]
    assert "html" not in html_only
    await back.close()
    with pytest.raises(SendError) as nowhere:
        await sender.send(
            dataclasses.replace(reply("r-0003", {}), recipient=Identity(kind="email", value="a@b.c"))
        )
    assert nowhere.value.reason == "recipient_unreachable"
    assert nowhere.value.permanent


async def test_the_demo_page_and_the_widget_are_served(make_chat: MakeChat) -> None:
    chat = await make_chat()
    page = await chat.client.get("/chat/demo", headers={"Accept-Language": "zh-CN,zh;q=0.9"})
    html = await page.text()
    assert page.status == 200
    assert 'lang="zh-CN"' in html
    assert "/chat/demo/widget.js" in html
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    signed = await (await chat.client.get("/chat/demo?user_id=u-7&email=a%40b.example")).text()
    expected = tokens.sign_identity(IDENTITY_SECRET.encode(), "u-7", "a@b.example")
    assert f'data-user-hash="{expected}"' in signed
    widget = await chat.client.get("/chat/demo/widget.js")
    assert widget.status == 200
    assert widget.content_type == "application/javascript"
    assert (await chat.client.get("/chat/nope/widget.js")).status == 404
    # A site that embeds the widget may upload and fetch reply files with the token (CORS).
    for path in ("/chat/demo/messages", "/chat/demo/files/" + "0" * 64):
        allowed = await chat.client.options(path, headers={"Origin": ORIGIN})
        assert allowed.status == 204
        assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in allowed.headers["Access-Control-Allow-Headers"]
        refused = await chat.client.options(path, headers={"Origin": "https://evil.example"})
        assert refused.status == 403


def test_descriptor_is_installed() -> None:
    assert Registry.installed().get("webchat") is DESCRIPTOR


async def test_typing_and_read_receipts_go_both_ways_and_are_not_tickets(make_chat: MakeChat) -> None:
    chat = await make_chat(inbox={"agent_keys": ["test-agent-key-0001"]})
    agent = {"Authorization": "Bearer test-agent-key-0001"}
    desk = await chat.client.ws_connect("/chat/demo/agent/activity", headers=agent)
    sock = await chat.socket()
    welcome = await sock.hello()
    conversation = f"s:{welcome['session']}"
    ack = await sock.say("client-0501", "is anyone there?")
    await sock.send({"type": "typing"})
    typing = orjson.loads((await desk.receive(timeout=5)).data)
    assert typing == {"type": "typing", "conversation": conversation}
    typed = await chat.client.post(
        "/chat/demo/agent/typing", headers=agent, json={"conversation": conversation, "agent": "Mei"}
    )
    assert (await typed.json()) == {"sockets": 1}
    assert (await sock.until("typing")) == {"type": "typing", "agent": "Mei"}
    read = await chat.client.post(
        "/chat/demo/agent/read",
        headers=agent,
        json={"conversation": conversation, "message_ids": [ack["message_id"]]},
    )
    assert read.status == 200
    assert (await sock.until("seen"))["message_ids"] == [ack["message_id"]]
    sender = chat.senders["webchat"].sender
    [event] = await chat.events()
    await sender.send(reply("r-0501", event["message"]["extra"]))
    await sock.until("reply")
    await sock.send({"type": "read", "ids": ["r-0501"]})
    seen = orjson.loads((await desk.receive(timeout=5)).data)
    assert seen == {"type": "read", "conversation": conversation, "reply_ids": ["r-0501"]}
    forged = await chat.client.post(
        "/chat/demo/agent/typing",
        headers={"Authorization": "Bearer nope-nope"},
        json={"conversation": conversation},
    )
    assert forged.status == 401
    assert len(await chat.events()) == 1  # typing and receipts made no ticket
    await desk.close()
    await sock.close()


async def test_a_reply_file_is_served_to_its_visitor_only(make_chat: MakeChat, tmp_path: Path) -> None:
    chat = await make_chat()
    sender = chat.senders["webchat"].sender
    sock = await chat.socket()
    welcome = await sock.hello()
    upload = aiohttp.FormData()
    upload.add_field("client_id", "client-0601")
    upload.add_field("file", b"%PDF-1.4 invoice", filename="invoice.pdf", content_type="application/pdf")
    stored = await chat.client.post(
        "/chat/demo/messages",
        data=upload,
        headers={"Authorization": f"Bearer {welcome['token']}", "Origin": ORIGIN},
    )
    assert stored.status == 202
    [event] = await chat.events()
    [attachment] = event["message"]["attachments"]
    file = OutboundAttachment(
        name="发票.pdf", content_type="application/pdf", size=attachment["size"], sha256=attachment["sha256"]
    )
    await sender.send(dataclasses.replace(reply("r-0601", event["message"]["extra"]), attachments=(file,)))
    pushed = await sock.until("reply")
    assert pushed["files"] == [
        {
            "name": "发票.pdf",
            "type": "application/pdf",
            "size": attachment["size"],
            "sha256": attachment["sha256"],
        }
    ]
    path = f"/chat/demo/files/{attachment['sha256']}"
    served = await chat.client.get(path, headers={"Authorization": f"Bearer {welcome['token']}"})
    assert served.status == 200
    assert await served.read() == b"%PDF-1.4 invoice"
    assert "filename*=UTF-8''%E5%8F%91%E7%A5%A8.pdf" in served.headers["Content-Disposition"]
    other = await chat.client.get(path, headers={"Authorization": f"Bearer {token_for('someone-else')}"})
    assert other.status == 404
    assert (await chat.client.get(path)).status == 401
    await sock.close()


async def test_a_reply_sent_by_another_instance_reaches_the_socket_here(make_chat: MakeChat) -> None:
    first = await make_chat(bulletin_interval=0.05)
    second = await make_chat(shared=first.store, bulletin_interval=0.05)
    sock = await second.socket()  # the visitor is connected to the second instance
    await sock.hello()
    await sock.say("client-0701", "hello from instance two")
    [event] = await first.events()
    await asyncio.sleep(0.2)  # both instances have looked at the bulletin once
    await first.senders["webchat"].sender.send(
        reply("r-0701", event["message"]["extra"])
    )  # sent by the first
    pushed = await sock.until("reply", timeout=2.0)
    assert pushed["id"] == "r-0701"
    await sock.send({"type": "ping"})
    assert (await sock.receive())["type"] == "pong"  # and only once: no second reply frame came first
    await sock.close()


async def test_an_oversized_frame_closes_the_socket_and_is_counted(make_chat: MakeChat) -> None:
    chat = await make_chat(max_frame_bytes=2048)
    sock = await chat.socket()
    await sock.hello()
    await sock.ws.send_str('{"type": "message", "client_id": "client-0801", "text": "' + "x" * 4096 + '"}')
    closed = await sock.ws.receive(timeout=5)
    assert closed.type is aiohttp.WSMsgType.CLOSE
    assert closed.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await asyncio.sleep(0.05)
    assert chat.refusals() == {"size": 1.0}
    assert await chat.events() == []


async def test_a_flood_of_frames_ends_the_socket(make_chat: MakeChat) -> None:
    chat = await make_chat(frame_burst=5, frames_per_minute=1)
    sock = await chat.socket()
    await sock.hello()
    for _ in range(10):
        await sock.ws.send_str('{"type": "typing"}')
    closed = await sock.ws.receive(timeout=5)
    while closed.type is not aiohttp.WSMsgType.CLOSE:
        closed = await sock.ws.receive(timeout=5)
    assert closed.data == 4429
    assert chat.refusals() == {"rate_limit": 1.0}
