"""A desk's view: what an API call and a web form turn into on the real bus."""

from __future__ import annotations

import asyncio
import io
import uuid
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import MakeDeployment
from tests.support.consumer import Received
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer e2e-test-key-0001"}


async def post_api(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], *, key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = dict(AUTH)
    if key is not None:
        headers["Idempotency-Key"] = key
    async with session.post(f"{url}/api/v1/messages", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


def api_body(text: str, email: str = "li.lei@example.com") -> dict[str, Any]:
    return {
        "customer": {"email": email, "phone": "+86 138 0013 8000", "name": "李雷"},
        "subject": "退款",
        "text": text,
        "kind": "message",
    }


def events_of(received: list[Received]) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in received]


async def test_api_message_is_one_schema_valid_event_and_a_repeat_publishes_nothing(
    deploy: MakeDeployment,
) -> None:
    d = await deploy()
    key = f"call-{uuid.uuid4()}"
    async with aiohttp.ClientSession() as session:
        status, first = await post_api(
            session, d.gateway.url, api_body("订单号 123456789012345678 还没有退款，我要投诉"), key=key
        )
        assert status == 202, first
        [delivery] = await d.consumer.wait_for(1)
        event = validate_event(delivery.body)

        assert delivery.routing_key == "demo.api.message.received"
        assert delivery.message_id == event["event_id"]
        assert delivery.correlation_id == event["thread"]["id"] == first["thread_id"]
        assert delivery.delivery_mode == 2
        assert delivery.headers["sequence"] == event["thread"]["sequence"] == 1
        assert event["message"]["id"] == first["message_id"]
        assert event["thread"]["is_new"] is True
        assert {"kind": "email", "value": "li.lei@example.com", "verified": False} in event["customer"][
            "identities"
        ]
        assert {"kind": "phone", "value": "+8613800138000", "verified": False} in event["customer"][
            "identities"
        ]
        assert event["routing"]["priority"] == "high"
        assert "complaint" in event["routing"]["tags"]
        assert {"kind": "order_number", "value": "123456789012345678"} in event["message"]["entities"]
        assert event["provenance"]["signature_verified"] is True

        # The same request again: the first answer, and nothing published.
        status, again = await post_api(
            session, d.gateway.url, api_body("订单号 123456789012345678 还没有退款，我要投诉"), key=key
        )
        assert status == 200
        assert (again["message_id"], again["thread_id"], again["status"]) == (
            first["message_id"],
            first["thread_id"],
            "duplicate",
        )
        # The same Idempotency-Key for another message is refused, not answered as the first one.
        other = api_body("different text, same key")
        status, refused = await post_api(session, d.gateway.url, other, key=key)
        assert status == 422, refused
        # A later, different message is the next thing on the bus: the repeat made no event.
        status, sentinel = await post_api(session, d.gateway.url, api_body("second question"), key=f"{key}-2")
        assert status == 202
        received = await d.consumer.wait_for(2)
        async with session.get(f"{d.gateway.url}/metrics") as resp:
            metrics = await resp.text()
        assert 'ticketgate_messages_total{channel="api",outcome="accepted"} 2.0' in metrics
        assert 'ticketgate_messages_total{channel="api",outcome="duplicate"} 1.0' in metrics
        assert 'ticketgate_ack_latency_seconds_count{channel="api"} 3.0' in metrics
        second = validate_event(received[1].body)
        assert second["message"]["id"] == sentinel["message_id"]
        assert second["thread"]["id"] == first["thread_id"]
        assert second["thread"]["sequence"] == 2
        assert len(received) == 2


@pytest.mark.browser
async def test_web_form_posted_by_a_real_browser_becomes_one_event(deploy: MakeDeployment) -> None:
    from playwright.async_api import async_playwright

    from tests.e2e.browser import launch_chromium

    d = await deploy()
    async with async_playwright() as pw:
        browser = await launch_chromium(pw)
        try:
            page = await browser.new_page(locale="en-US")
            await page.goto(f"{d.gateway.url}/forms/demo")
            await page.get_by_label("Name").fill("Ada Lovelace")
            await page.get_by_label("Email").fill("Ada@Example.com")
            await page.get_by_label("Subject").fill("Broken charger")
            await page.get_by_label("Message").fill("It sparks when plugged in. Order #58213.")
            await page.get_by_role("button", name="Send").click()
            await page.wait_for_load_state()
            assert "Thank you" in await page.content()
        finally:
            await browser.close()

    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.form.message.received"
    assert event["message"]["channel"] == "form"
    assert event["message"]["subject"] == "Broken charger"
    assert event["customer"]["display_name"] == "Ada Lovelace"
    assert {"kind": "email", "value": "ada@example.com", "verified": False} in event["customer"]["identities"]
    assert event["thread"]["is_new"] is True


@pytest.mark.parametrize(
    ("description", "request_kwargs", "expected_status"),
    [
        (
            "malformed JSON",
            {"data": b"{not json", "headers": {**AUTH, "Content-Type": "application/json"}},
            400,
        ),
        (
            "wrong API key",
            {"json": api_body("x"), "headers": {"Authorization": "Bearer wrong-key-123456"}},
            401,
        ),
        (
            "oversized body",
            {
                "data": io.BytesIO(b"x" * (11 * 1024 * 1024)),
                "headers": {**AUTH, "Content-Type": "application/json"},
            },
            413,
        ),
    ],
)
async def test_bad_api_input_gets_a_clear_4xx_and_changes_nothing(
    deploy: MakeDeployment, description: str, request_kwargs: dict[str, Any], expected_status: int
) -> None:
    d = await deploy()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{d.gateway.url}/api/v1/messages", **request_kwargs) as resp:
            assert resp.status == expected_status, description
            body = await resp.read()
            assert orjson.loads(body).get("reason"), f"{description}: no reason in {body!r}"
        status, sentinel = await post_api(session, d.gateway.url, api_body("sentinel"), key=str(uuid.uuid4()))
        assert status == 202
    [only] = await d.consumer.wait_for(1)
    assert validate_event(only.body)["message"]["id"] == sentinel["message_id"]


async def test_form_from_a_foreign_origin_and_over_the_rate_limit_is_refused(deploy: MakeDeployment) -> None:
    d = await deploy()
    form = {"name": "Eve", "email": "eve@example.com", "subject": "hi", "message": "hello"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{d.gateway.url}/forms/demo",
            data=form,
            headers={"Origin": "https://evil.example", "Accept": "application/json"},
        ) as resp:
            assert resp.status == 403
            assert "origin" in (await resp.json())["reason"].lower()
        statuses = []
        for i in range(12):
            async with session.post(
                f"{d.gateway.url}/forms/demo",
                data={**form, "message": f"hello {i}"},
                headers={"Origin": d.gateway.url, "Accept": "application/json"},
            ) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert resp.headers["Retry-After"]
    assert 429 in statuses
    accepted = statuses.count(202) + statuses.count(200)
    assert accepted >= 1
    received = await d.consumer.wait_for(accepted)
    assert len({validate_event(r.body)["message"]["id"] for r in received}) == accepted
    assert "rate limit" in d.gateway.log()


async def test_events_go_out_on_the_wake_ups_of_commits_not_the_poll(deploy: MakeDeployment) -> None:
    """The relay process is woken only while it waits; what is committed while it works must still
    go out at once, not at its next poll (here a minute away): one message at a time, and bursts
    that land while it publishes."""
    d = await deploy(env={"TICKETGATE__OUTBOX__POLL_INTERVAL": "60"})
    sent = 0
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            status, _ = await post_api(session, d.gateway.url, api_body(f"one at a time {i}"))
            assert status == 202
            sent += 1
            await d.consumer.wait_for(sent, within=5)
        for burst in range(4):
            answers = await asyncio.gather(*(
                post_api(session, d.gateway.url, api_body(f"burst {burst} message {i}", f"c{i}@example.com"))
                for i in range(40)
            ))
            assert [status for status, _ in answers] == [202] * 40
            sent += 40
            await d.consumer.wait_for(sent, within=5)
