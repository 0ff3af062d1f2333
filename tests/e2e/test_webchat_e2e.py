"""The live web chat in Debian's headless chromium against the real gateway process and RabbitMQ.

The browser opens the demo page, sends messages and a file through the widget and waits for the
delivery ticks; the connection is cut in the page (CDP ``Network.emulateNetworkConditions``
offline) and closed from the server's side (the gateway restarts) in the middle of sending; every
message still reaches the bus exactly once. A signed-in visitor's chat joins that customer's
thread. ``TICKETGATE_UPDATE_SCREENSHOTS=1`` rewrites docs/webchat-en.png and docs/webchat-zh.png.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from tests.e2e.browser import launch_chromium
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.e2e.harness import ROOT
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHAT = """
[channels.webchat]
session_secret = "e2e-chat-session-secret"
heartbeat = "5s"

[channels.webchat.inboxes.demo]
identity_secret = "dev-chat-hmac-secret"
demo_page = true
title = "Demo support"
title_zh = "演示客服"
"""
AUTH = {"Authorization": "Bearer e2e-test-key-0001"}
# The reply dispatcher (gateway/replies.py) answers reply.requested; the tests of replies wait for it.
DISPATCHER = importlib.util.find_spec("gateway.replies") is not None
OWN = "[data-client-id]"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await launch_chromium(pw)
        try:
            yield launched
        finally:
            await launched.close()


async def open_chat(
    browser: Browser, url: str, *, locale: str = "en-US", height: int = 720
) -> tuple[BrowserContext, Page]:
    context = await browser.new_context(locale=locale, viewport={"width": 1000, "height": height})
    page = await context.new_page()
    await page.goto(url)
    await page.locator("#tg-chat-launcher").click()
    await page.locator("#tg-chat-status[data-state=online]").wait_for(timeout=15_000)
    return context, page


async def send(page: Page, text: str) -> None:
    box = page.locator("#tg-chat-input")
    await box.fill(text)
    await box.press("Enter")


async def ticks(page: Page, count: int, timeout: float = 60_000) -> None:
    await page.wait_for_function(
        """(n) => {
            const root = document.querySelector('#ticketgate-chat').shadowRoot;
            return root.querySelectorAll('[data-client-id][data-status=delivered]').length >= n;
        }""",
        arg=count,
        timeout=timeout,
    )


def chat_events(d: Deployment) -> list[dict[str, Any]]:
    events = [validate_event(r.body) for r in d.consumer.distinct()]
    return [e for e in events if e["type"] == "message.received" and e["message"]["channel"] == "webchat"]


async def wait_events(d: Deployment, count: int, within: float = 30.0) -> list[dict[str, Any]]:
    await d.consumer.wait_until(lambda: len(chat_events(d)) >= count, within=within)
    await asyncio.sleep(1.0)  # anything more (a repeat) would arrive now
    return chat_events(d)


async def test_messages_and_a_file_get_their_ticks_and_reach_the_bus_once(
    deploy: MakeDeployment, browser: Browser, tmp_path: Path
) -> None:
    d = await deploy(extra=CHAT)
    context, page = await open_chat(browser, f"{d.gateway.url}/chat/demo")
    assert await page.locator("#tg-chat-launcher").get_attribute("aria-expanded") == "true"
    await send(page, "Hello, my order #58213 has not arrived.")
    await send(page, "Can you check it?")
    receipt = tmp_path / "receipt.png"
    receipt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    await page.locator("#tg-chat-file").set_input_files(str(receipt))
    await ticks(page, 3)
    # The new messages are announced: they sit in the log's polite live region.
    assert await page.locator("#tg-chat-log").get_attribute("role") == "log"
    events = await wait_events(d, 3)
    assert [e["message"]["text"] for e in events][:2] == [
        "Hello, my order #58213 has not arrived.",
        "Can you check it?",
    ]
    [file_event] = [e for e in events if e["message"]["attachments"]]
    assert file_event["message"]["attachments"][0]["name"] == "receipt.png"
    assert len({e["thread"]["id"] for e in events}) == 1
    # A reload resumes the session: the transcript is there, and the next message joins the thread.
    await page.reload()
    await page.locator("#tg-chat-launcher").click()
    await page.locator("#tg-chat-status[data-state=online]").wait_for()
    assert await page.locator(OWN).count() == 3
    await send(page, "Still there?")
    await ticks(page, 4)
    events = await wait_events(d, 4)
    assert len(events) == 4
    assert len({e["thread"]["id"] for e in events}) == 1
    # Keyboard: Escape closes the panel and gives the focus back to the launcher.
    await page.keyboard.press("Escape")
    assert await page.locator("#tg-chat-launcher").get_attribute("aria-expanded") == "false"
    await context.close()


async def test_cut_network_and_server_restart_mid_send_lose_and_repeat_nothing(
    deploy: MakeDeployment, browser: Browser
) -> None:
    d = await deploy(extra=CHAT)
    context, page = await open_chat(browser, f"{d.gateway.url}/chat/demo")
    cdp = await context.new_cdp_session(page)
    sent: list[str] = []

    async def offline(value: bool) -> None:
        await cdp.send(
            "Network.emulateNetworkConditions",
            {
                "offline": value,
                "latency": 0,
                "downloadThroughput": -1,
                "uploadThroughput": -1,
            },
        )

    await send(page, "first, online")
    sent.append("first, online")
    await ticks(page, 1)
    # The network goes away right after a send, so its ack may be lost; more is typed offline.
    await send(page, "second, the network drops now")
    await offline(True)
    await send(page, "third, typed while offline")
    sent += ["second, the network drops now", "third, typed while offline"]
    await page.locator("#tg-chat-status[data-state=offline]").wait_for()
    await asyncio.sleep(1.0)
    await offline(False)
    await ticks(page, 3)
    # The server closes the socket (a restart) right after a send; the widget reconnects and resends.
    await send(page, "fourth, the gateway restarts now")
    sent.append("fourth, the gateway restarts now")
    d.gateway.signal(signal.SIGTERM)
    assert await d.gateway.wait() == 0
    await send(page, "fifth, typed while the gateway is down")
    sent.append("fifth, typed while the gateway is down")
    await d.gateway.start()
    await ticks(page, 5, timeout=90_000)
    events = await wait_events(d, 5)
    texts = [e["message"]["text"] for e in events]
    assert sorted(texts) == sorted(sent), texts  # each once: nothing lost, nothing repeated
    assert texts == sent  # and in the order typed
    assert len({e["thread"]["id"] for e in events}) == 1
    await context.close()


async def test_a_signed_in_visitor_joins_their_existing_thread(
    deploy: MakeDeployment, browser: Browser
) -> None:
    d = await deploy(extra=CHAT)
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{d.gateway.url}/api/v1/messages",
            headers=AUTH,
            json={
                "customer": {"external_id": "u-42", "email": "ada@example.com", "name": "Ada"},
                "text": "My parcel has not arrived (order 58213).",
            },
        ) as response,
    ):
        assert response.status == 202
        placed = await response.json()
    context, page = await open_chat(
        browser, f"{d.gateway.url}/chat/demo?user_id=u-42&email=ada%40example.com&name=Ada"
    )
    await send(page, "Any news about my parcel?")
    await ticks(page, 1)
    [event] = await wait_events(d, 1)
    assert event["thread"]["id"] == placed["thread_id"]
    assert {"kind": "external", "value": "demo:u-42", "verified": True} in event["customer"]["identities"]
    await context.close()


@pytest.mark.parametrize(("locale", "name"), [("en-US", "webchat-en.png"), ("zh-CN", "webchat-zh.png")])
async def test_screenshots_of_the_widget(
    deploy: MakeDeployment,
    browser: Browser,
    tmp_path: Path,
    amqp_url: str,
    amqp_names: Janitor,
    locale: str,
    name: str,
) -> None:
    queue = amqp_names.queue("control")
    d = await deploy(extra=replies_config(queue) if DISPATCHER else CHAT)
    context, page = await open_chat(browser, f"{d.gateway.url}/chat/demo", locale=locale, height=800)
    texts, answer = {
        "en-US": (
            ["Hi! My order #58213 arrived damaged.", "The box was crushed; photo attached."],
            "Sorry about that! A replacement ships today; you will get the tracking number by SMS.",
        ),
        "zh-CN": (
            ["你好，我的订单 58213 收到时已经破损。", "外包装被压坏了，照片在附件里。"],
            "非常抱歉！我们今天为您补发，物流单号会通过短信发给您。",
        ),
    }[locale]
    for text in texts:
        await send(page, text)
    photo = tmp_path / ("破损照片.png" if locale == "zh-CN" else "damaged-box.png")
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    await page.locator("#tg-chat-file").set_input_files(str(photo))
    await ticks(page, len(texts) + 1)
    if DISPATCHER:
        [first, *_] = await wait_events(d, len(texts) + 1)
        await publish_reply(amqp_url, queue, first["thread"]["id"], f"desk-shot-{locale}", answer)
        await page.locator("[data-reply-id]").wait_for(timeout=30_000)
    title = await page.locator("#tg-chat-title").text_content()
    assert title == ("演示客服" if locale == "zh-CN" else "Demo support")
    shot = tmp_path / name
    await page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("TICKETGATE_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(shot, ROOT / "docs" / name)
    await context.close()


async def test_the_widget_works_from_the_keyboard_alone(deploy: MakeDeployment, browser: Browser) -> None:
    d = await deploy(extra=CHAT)
    context = await browser.new_context(locale="en-US")
    page = await context.new_page()
    await page.goto(f"{d.gateway.url}/chat/demo")
    await page.keyboard.press("Tab")  # the launcher is the page's first control
    assert await page.evaluate("document.activeElement.id") == "ticketgate-chat"
    await page.keyboard.press("Enter")  # opens the panel and puts the focus in the message box
    await page.locator("#tg-chat-status[data-state=online]").wait_for()
    focused = await page.evaluate("document.querySelector('#ticketgate-chat').shadowRoot.activeElement.id")
    assert focused == "tg-chat-input"
    await page.keyboard.type("Typed without a mouse")
    await page.keyboard.press("Enter")
    await ticks(page, 1)
    tick = page.locator("[data-client-id] .tick")
    assert await tick.get_attribute("aria-label") == "Delivered"
    await page.keyboard.press("Escape")
    assert await page.locator("#tg-chat-launcher").get_attribute("aria-expanded") == "false"
    [event] = await wait_events(d, 1)
    assert event["message"]["text"] == "Typed without a mouse"
    await context.close()


def replies_config(control_queue: str) -> str:
    return f"""{CHAT}
[control]
queue = "{control_queue}"

[replies]
poll_interval = "0.2s"
"""


async def publish_reply(amqp_url: str, queue: str, thread_id: str, command_id: str, text: str) -> None:
    """As a desk answers: ``reply.requested`` on the control queue (persistent, default exchange)."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        command = {
            "type": "reply.requested",
            "command_id": command_id,
            "thread_id": thread_id,
            "tenant": "demo",
            "text": text,
            "agent_name": "Mei",
        }
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps(command),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )


def reply_events(d: Deployment, kind: str) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in d.consumer.distinct() if r.type == kind]


@pytest.mark.skipif(not DISPATCHER, reason="no reply dispatcher yet")
async def test_an_agents_reply_appears_in_the_widget_and_waits_for_a_visitor_who_left(
    deploy: MakeDeployment, browser: Browser, amqp_url: str, amqp_names: Janitor
) -> None:
    queue = amqp_names.queue("control")
    d = await deploy(extra=replies_config(queue))
    context, page = await open_chat(browser, f"{d.gateway.url}/chat/demo")
    await send(page, "Is my refund approved?")
    await ticks(page, 1)
    [event] = await wait_events(d, 1)
    thread_id = event["thread"]["id"]
    started = time.monotonic()
    await publish_reply(amqp_url, queue, thread_id, "desk-webchat-1", "Yes: the refund was approved today.")
    reply = page.locator("[data-reply-id]")
    await reply.wait_for(timeout=30_000)
    print(f"reply.requested published -> shown in the widget: {time.monotonic() - started:.2f} s")
    assert "the refund was approved today" in (await reply.text_content() or "")
    # The panel is open and visible: the widget confirms receipt and reading.
    await d.consumer.wait_until(lambda: bool(reply_events(d, "reply.read")), within=30)
    [sent] = reply_events(d, "reply.sent")
    assert sent["reply"]["command_id"] == "desk-webchat-1"
    assert reply_events(d, "reply.delivered")
    # The visitor leaves; the next reply waits and is shown when they come back.
    await page.close()
    await publish_reply(amqp_url, queue, thread_id, "desk-webchat-2", "Anything else we can do?")
    await d.consumer.wait_until(lambda: len(reply_events(d, "reply.sent")) >= 2, within=30)
    assert len(reply_events(d, "reply.delivered")) == 1
    page = await context.new_page()
    await page.goto(f"{d.gateway.url}/chat/demo")
    await page.locator("#tg-chat-launcher").click()
    await page.locator("[data-reply-id]").nth(1).wait_for(timeout=30_000)
    await d.consumer.wait_until(lambda: len(reply_events(d, "reply.delivered")) >= 2, within=30)
    # With the panel closed, a reply is counted on the launcher and announced to screen readers.
    await page.keyboard.press("Escape")
    await publish_reply(amqp_url, queue, thread_id, "desk-webchat-3", "We are here when you need us.")
    await page.locator("#tg-chat-notice", has_text="New reply from support").wait_for(timeout=30_000)
    assert await page.locator("#tg-chat-launcher .badge").text_content() == "1"
    await context.close()


async def test_an_app_webview_page_from_a_file_chats_on_a_phone_screen(
    deploy: MakeDeployment, browser: Browser, tmp_path: Path
) -> None:
    # An app's H5 page loaded from a file: no usable Origin, so the inbox allows a missing one.
    d = await deploy(extra=CHAT.replace("demo_page = true", "demo_page = true\nallow_missing_origin = true"))
    page_file = tmp_path / "h5.html"
    page_file.write_text(
        '<!doctype html><html><head><meta name="viewport" content="width=device-width"></head><body>'
        f'<h1>App help</h1><script src="{d.gateway.url}/chat/demo/widget.js" data-lang="zh"></script>'
        "</body></html>",
        encoding="utf-8",
    )
    context = await browser.new_context(
        viewport={"width": 390, "height": 844},
        is_mobile=True,
        has_touch=True,
        locale="zh-CN",
        user_agent="Mozilla/5.0 (Linux; Android 14; Pixel 8; wv) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Version/4.0 Chrome/120.0.0.0 Mobile Safari/537.36",
    )
    page = await context.new_page()
    await page.goto(page_file.as_uri())
    await page.locator("#tg-chat-launcher").tap()
    await page.locator("#tg-chat-status[data-state=online]").wait_for(timeout=15_000)
    box = await page.locator("#tg-chat-panel").bounding_box()
    assert box is not None
    assert box["width"] == 390  # the panel takes the whole phone screen
    await send(page, "手机里也能聊天吗？")
    await ticks(page, 1)
    [event] = await wait_events(d, 1)
    assert event["message"]["text"] == "手机里也能聊天吗？"
    await context.close()
