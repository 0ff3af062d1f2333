"""Replies on the running gateway: a mail in over SMTP, a desk's ``reply.requested`` on the control
queue (or the desk API), the reply out through a local smarthost (aiosmtpd), the outcome on the bus;
retries, a SIGKILL with replies in flight, repeats and another tenant's thread."""

from __future__ import annotations

import asyncio
import signal
import smtplib
from collections import Counter
from typing import Any

import aio_pika
import aiohttp
import jsonschema  # type: ignore[import-untyped]
import orjson
import pytest

from tests.e2e.conftest import Deployment, MakeDeployment
from tests.e2e.harness import free_port
from tests.support.rabbitmq import Janitor
from tests.support.schema import SCHEMA_DIR, validate_event
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.integration

SUPPORT = "support@demo.localhost"
DESK_KEY = "e2e-desk-key-0001"
OTHER_KEY = "e2e-desk-key-other-0001"


def reply_config(smtp_port: int, sink_port: int, control_queue: str, *, lease: str = "120s") -> str:
    return f"""
[channels.email.smtp]
host = "127.0.0.1"
port = {smtp_port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["{SUPPORT}"]

[channels.email.smarthost]
host = "127.0.0.1"
port = {sink_port}
security = "none"
from_name = "Demo support"

[channels.identity]
keys = ["{DESK_KEY}"]

[channels.identity.tenants.other]
keys = ["{OTHER_KEY}"]

[tenants.other]
name = "Other Ltd."

[control]
queue = "{control_queue}"

[replies]
poll_interval = "0.2s"
backoff_base = "0.2s"
backoff_cap = "1s"
lease = "{lease}"
"""


def customer_mail(message_id: str, subject: str = "Where is my parcel?", **headers: str) -> bytes:
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"From: Li Lei <li.lei@example.com>\r\nTo: {SUPPORT}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{message_id}>\r\nDate: Sat, 05 Dec 2026 10:00:00 +0800\r\n{extra}"
        "Content-Type: text/plain; charset=utf-8\r\n\r\nMy parcel 58213 has not arrived.\r\n"
    ).encode()


def send_mail(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("li.lei@example.com", [SUPPORT], raw)


async def publish(amqp_url: str, queue: str, *commands: dict[str, Any]) -> None:
    """As a desk does: persistent JSON to the default exchange, routed by the control queue's name."""
    schema = orjson.loads((SCHEMA_DIR / "reply.requested.json").read_bytes())
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)
        for command in commands:
            jsonschema.Draft202012Validator(schema).validate(command)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(command),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )


def events_of(d: Deployment, kind: str) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in d.consumer.distinct() if r.type == kind]


async def wait_events(d: Deployment, kind: str, count: int, within: float = 30.0) -> list[dict[str, Any]]:
    await d.consumer.wait_until(lambda: len(events_of(d, kind)) >= count, within=within)
    return events_of(d, kind)


def command(
    thread_id: str, command_id: str, text: str = "Your parcel left our warehouse today.", **more: Any
) -> dict[str, Any]:
    return {
        "type": "reply.requested",
        "command_id": command_id,
        "thread_id": thread_id,
        "tenant": "demo",
        "text": text,
        "agent_name": "Ada",
        **more,
    }


async def start(
    deploy: MakeDeployment, amqp_names: Janitor, sink: SmtpSink, **kw: Any
) -> tuple[Deployment, int, str]:
    smtp_port = free_port()
    queue = amqp_names.queue("control")
    d = await deploy(extra=reply_config(smtp_port, sink.port, queue, **kw))
    return d, smtp_port, queue


async def test_a_mail_answered_through_the_bus_threads_and_the_answer_joins_the_thread(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor
) -> None:
    sink = await SmtpSink().start()
    try:
        d, smtp_port, queue = await start(deploy, amqp_names, sink)
        await asyncio.to_thread(send_mail, smtp_port, customer_mail("parcel-1@example.com"))
        [received] = await wait_events(d, "message.received", 1)
        thread = received["thread"]
        number = await thread_number(d, thread["id"])
        # The event says how to answer: the thread's number and tag, email reachable, no window.
        assert (thread["number"], thread["tag"]) == (number, f"[#TG-{number}]")
        assert received["reply"] == {
            "default_channel": "email",
            "channels": [
                {"channel": "email", "inbox": "demo", "window_seconds": None, "window_ends_at": None}
            ],
        }

        await publish(amqp_url, queue, command(thread["id"], "desk-1"))
        [mail] = await sink.wait_for(1)
        message = mail.message
        assert mail.rcpt_tos == ["li.lei@example.com"]
        assert message["In-Reply-To"] == "<parcel-1@example.com>"
        assert f"[#TG-{number}]" in message["Subject"]
        assert "Auto-Submitted" not in message
        [sent] = await wait_events(d, "reply.sent", 1)
        assert sent["reply"]["command_id"] == "desk-1"
        assert f"<{sent['reply']['provider_message_id']}>" == message["Message-ID"]
        assert sent["thread"] == {"id": thread["id"], "number": number}

        # The customer answers the reply from their mail client: it joins the thread.
        answer = customer_mail(
            "parcel-2@example.com",
            subject=str(message["Subject"]),
            **{
                "In-Reply-To": message["Message-ID"],
                "References": f"<parcel-1@example.com> {message['Message-ID']}",
            },
        )
        await asyncio.to_thread(send_mail, smtp_port, answer)
        _, second = await wait_events(d, "message.received", 2)
        assert second["thread"]["id"] == thread["id"]
        assert second["thread"]["is_new"] is False
        # From another address, with only In-Reply-To (our Message-ID) and no tag: the same thread,
        # found by the reply's Message-ID alone.
        bare = customer_mail(
            "parcel-3@example.com", subject="Thanks!", **{"In-Reply-To": message["Message-ID"]}
        ).replace(b"li.lei@example.com", b"li.lei@work.example")
        await asyncio.to_thread(send_mail, smtp_port, bare)
        third = (await wait_events(d, "message.received", 3))[2]
        assert third["thread"]["id"] == thread["id"]
    finally:
        await sink.close()


async def test_a_smarthost_refusing_three_times_gets_one_mail_and_one_reply_sent(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor
) -> None:
    sink = await SmtpSink(refuse_data=3).start()
    try:
        d, smtp_port, queue = await start(deploy, amqp_names, sink)
        await asyncio.to_thread(send_mail, smtp_port, customer_mail("retry-1@example.com"))
        [received] = await wait_events(d, "message.received", 1)
        await publish(amqp_url, queue, command(received["thread"]["id"], "desk-retry"))
        [sent] = await wait_events(d, "reply.sent", 1)
        assert sent["reply"]["attempts"] == 4
        assert sink.attempts == 4
        assert len(sink.mails) == 1
        await asyncio.sleep(1.0)  # nothing more comes: one mail, one event
        assert len(sink.mails) == 1
        assert len(events_of(d, "reply.sent")) == 1
    finally:
        await sink.close()


async def test_a_repeated_command_sends_nothing_and_another_tenants_thread_is_refused(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor
) -> None:
    sink = await SmtpSink().start()
    try:
        d, smtp_port, queue = await start(deploy, amqp_names, sink)
        await asyncio.to_thread(send_mail, smtp_port, customer_mail("repeat-1@example.com"))
        [received] = await wait_events(d, "message.received", 1)
        thread_id = received["thread"]["id"]
        await publish(amqp_url, queue, command(thread_id, "desk-once"), command(thread_id, "desk-once"))
        await wait_events(d, "reply.sent", 1)
        await publish(amqp_url, queue, command(thread_id, "desk-once"))  # after it went out, too

        url = f"{d.gateway.url}/api/v1/threads/{thread_id}/replies"
        async with aiohttp.ClientSession() as session:
            # The same command over HTTP: 202 with the reply already sent, nothing new.
            body = {k: v for k, v in command(thread_id, "desk-once").items() if k != "type"}
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {DESK_KEY}"}) as resp:
                assert resp.status == 202
                answer = await resp.json()
            assert (answer["command_id"], answer["status"]) == ("desk-once", "sent")
            # Another body under the same command id: refused.
            async with session.post(
                url, json={**body, "text": "something else"}, headers={"Authorization": f"Bearer {DESK_KEY}"}
            ) as resp:
                assert resp.status == 409
            # A key of another tenant does not see this thread at all.
            async with session.post(
                url, json={**body, "command_id": "x-1"}, headers={"Authorization": f"Bearer {OTHER_KEY}"}
            ) as resp:
                assert resp.status == 404
            # A global key naming another tenant for this thread: refused as unknown.
            async with session.post(
                url,
                json={**body, "command_id": "x-2", "tenant": "other"},
                headers={"Authorization": f"Bearer {DESK_KEY}"},
            ) as resp:
                assert resp.status == 404
        # On the queue: reply.failed (rejected) on the claiming tenant, nothing sent.
        await publish(amqp_url, queue, {**command(thread_id, "x-3"), "tenant": "other"})
        [refused] = await wait_events(d, "reply.failed", 1)
        assert (refused["tenant"], refused["reply"]["reason"]) == ("other", "rejected")
        # A sentinel reply proves the queue was worked through past the repeats.
        await publish(amqp_url, queue, command(thread_id, "desk-sentinel", text="One more thing."))
        await wait_events(d, "reply.sent", 2)
        assert [m.message["X-Ticketgate-Reply"] for m in sink.mails] == [
            e["reply"]["id"] for e in events_of(d, "reply.sent")
        ]
        assert len(sink.mails) == 2
    finally:
        await sink.close()


async def test_sigkill_with_replies_in_flight_loses_none(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor
) -> None:
    """docs/replies.md: after a crash every command ends in reply.sent or reply.failed; a reply the
    smarthost took just before the crash may go out once more, with the same Message-ID."""
    sink = await SmtpSink(delay=0.3).start()
    try:
        d, smtp_port, queue = await start(deploy, amqp_names, sink, lease="2s")
        for n in range(4):
            mail = customer_mail(f"kill-{n}@example.com", subject=f"Question {n}").replace(
                b"li.lei@example.com", f"c{n}@example.com".encode()
            )
            await asyncio.to_thread(send_mail, smtp_port, mail)
        received = await wait_events(d, "message.received", 4)
        threads = [e["thread"]["id"] for e in received]
        commands = [command(t, f"kill-{t[-6:]}-{i}", text=f"Answer {i}") for t in threads for i in range(5)]
        await publish(amqp_url, queue, *commands)
        await sink.wait_for(3)
        d.gateway.signal(signal.SIGKILL)
        await d.gateway.wait()
        at_kill = len(sink.mails)
        assert at_kill < len(commands), "the kill came too late to test anything"

        await d.gateway.start()
        await d.consumer.wait_until(
            lambda: len(events_of(d, "reply.sent")) + len(events_of(d, "reply.failed")) >= len(commands),
            within=60,
        )
        outcomes = {
            e["reply"]["command_id"]: e["type"]
            for e in events_of(d, "reply.sent") + events_of(d, "reply.failed")
        }
        assert set(outcomes) == {c["command_id"] for c in commands}
        assert set(outcomes.values()) == {"reply.sent"}
        copies = Counter(m.message["Message-ID"] for m in sink.mails)
        assert len(copies) == len(commands)  # none lost
        assert max(copies.values()) <= 2  # at most once more, after the crash
        repeats = sum(n - 1 for n in copies.values())
        print(f"SIGKILL: {len(commands)} replies, {at_kill} in the sink at the kill, {repeats} sent again")
        # Per thread (one customer each), the customer got the answers in the desk's order.
        for event in received:
            customer = f"{event['customer']['identities'][0]['value']}"
            texts = [m.message.get_content().strip() for m in sink.mails if m.rcpt_tos == [customer]]
            assert list(dict.fromkeys(texts)) == [f"Answer {i}" for i in range(5)]
    finally:
        await sink.close()


async def thread_number(d: Deployment, thread_id: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"{d.gateway.url}/api/v1/threads/{thread_id}", headers={"Authorization": f"Bearer {DESK_KEY}"}
        ) as resp,
    ):
        assert resp.status == 200
        return int((await resp.json())["number"])


def test_the_desk_in_the_guide_is_python_that_compiles() -> None:
    """docs/replies.md's desk is meant to be copied: it must at least be valid Python."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "replies.md").read_text(encoding="utf-8")
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    compile(block, "docs/replies.md", "exec")
    assert "reply.requested" in block
