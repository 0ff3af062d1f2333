"""A support day on the real gateway and the real bus: what the desks see when customers write.

Every scenario runs the gateway process against the real RabbitMQ and asserts on the events a desk
consumed (validated against the published schema), never on the store's tables. Web forms are
posted as a browser's fetch would (JSON answer, same Origin), mail goes through the gateway's SMTP
listener with smtplib, calls come from the API channel as a call center sends them, and the desk
speaks through the control queue and the desk API.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid
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

pytestmark = pytest.mark.integration

API_AUTH = {"Authorization": "Bearer e2e-test-key-0001"}
DESK_KEY = "e2e-desk-key-0001"
DESK_AUTH = {"Authorization": f"Bearer {DESK_KEY}"}
SUPPORT = "support@demo.localhost"
COMPLAINT = "My order 58213 arrived with a cracked screen. Please send a replacement or refund me."


DESK_API = f"""
[channels.identity]
keys = ["{DESK_KEY}"]
"""


def day_config(smtp_port: int, *, control_queue: str | None = None, extra: str = "") -> str:
    """The harness config plus the SMTP listener, the desk API and (optionally) a control queue."""
    control = f'\n[control]\nqueue = "{control_queue}"\n' if control_queue else ""
    return f"""
[channels.email.smtp]
host = "127.0.0.1"
port = {smtp_port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["{SUPPORT}"]
{DESK_API}{control}{extra}"""


# -- how the customers and the desk reach the gateway ---------------------------------------------


async def fill_form(
    session: aiohttp.ClientSession, url: str, *, name: str, email: str, message: str, phone: str = ""
) -> dict[str, Any]:
    fields = {"name": name, "email": email, "phone": phone, "subject": "Web form", "message": message}
    async with session.post(
        f"{url}/forms/demo", data=fields, headers={"Origin": url, "Accept": "application/json"}
    ) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 202, answer
        return answer


def mail(
    sender: str, text: str, *, subject: str = "Help", in_reply_to: str | None = None, name: str = ""
) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"{name} <{sender}>" if name else sender
    message["To"] = SUPPORT
    message["Subject"] = subject
    message["Message-ID"] = make_msgid(domain="customer.example")
    if in_reply_to is not None:
        message["In-Reply-To"] = in_reply_to
        message["References"] = in_reply_to
    message.set_content(text)
    return message


async def send_mail(port: int, message: EmailMessage) -> str:
    """Deliver over SMTP (250 means stored); returns the Message-ID without angle brackets."""

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            refused = client.send_message(message)
            assert not refused, refused

    await asyncio.to_thread(send)
    return str(message["Message-ID"]).strip("<>")


async def post_api(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(f"{url}/api/v1/messages", json=body, headers=API_AUTH) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 202, answer
        return answer


async def desk(
    session: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    async with session.request(method, url, json=body, headers=DESK_AUTH) as resp:
        answer: dict[str, Any] = await resp.json()
        assert resp.status == 200, answer
        return answer


# -- what the desk consumed -----------------------------------------------------------------------


def distinct_events(d: Deployment) -> list[dict[str, Any]]:
    """Every schema-valid event once, in arrival order: delivery is at-least-once, and a desk drops a
    repeat by its AMQP message_id (the event id), as docs/events.md tells it to."""
    seen: set[str] = set()
    events = []
    for received in d.consumer.received:
        event = validate_event(received.body)
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            events.append(event)
    return events


async def consumed(d: Deployment, kind: str, count: int, within: float = 15.0) -> list[dict[str, Any]]:
    """Wait for ``count`` distinct events of ``kind`` on the desk's queue; every event is schema-valid."""

    def of_kind() -> list[dict[str, Any]]:
        return [e for e in distinct_events(d) if e["type"] == kind]

    await d.consumer.wait_until(lambda: len(of_kind()) >= count, within=within)
    return of_kind()


def every_type(d: Deployment) -> list[str]:
    return [event["type"] for event in distinct_events(d)]


# -- the scenarios --------------------------------------------------------------------------------


async def test_form_then_email_then_call_is_one_customer_one_thread(deploy: MakeDeployment) -> None:
    smtp = free_port()
    d = await deploy(extra=day_config(smtp))
    async with aiohttp.ClientSession() as session:
        form = await fill_form(
            session,
            d.gateway.url,
            name="Ada Lovelace",
            email="Ada@Example.com",
            phone="+41 79 123 45 67",
            message="The charger I bought last week sparks when I plug it in.",
        )
        # In the afternoon she writes from that address, with more detail.
        await send_mail(smtp, mail("ada@example.com", "It also smells burnt now. Order 58213.", name="Ada"))
        # And calls; the call center's system records the call with her phone number.
        call = await post_api(
            session,
            d.gateway.url,
            {
                "kind": "call_record",
                "customer": {"phone": "+41791234567"},
                "text": "Customer called about the sparking charger; promised a callback.",
                "call": {"direction": "inbound", "duration_seconds": 312, "from_number": "+41791234567"},
            },
        )
        received = await consumed(d, "message.received", 3)
        [customer_id] = {e["customer"]["id"] for e in received}
        summary = await desk(session, "GET", f"{d.gateway.url}/api/v1/customers/{customer_id}")

    assert [e["message"]["channel"] for e in received] == ["form", "email", "api"]
    assert [e["message"]["id"] for e in (received[0], received[2])] == [
        form["message_id"],
        call["message_id"],
    ]
    assert len({e["thread"]["id"] for e in received}) == 1
    assert [e["thread"]["sequence"] for e in received] == [1, 2, 3]
    assert [e["thread"]["is_new"] for e in received] == [True, False, False]
    assert all(e["message"]["duplicate_of"] is None for e in received)
    # The form's claimed email and phone linked her; the mail and the call found her by one of them.
    identities = {(i["kind"], i["value"]) for i in received[2]["customer"]["identities"]}
    assert identities == {("email", "ada@example.com"), ("phone", "+41791234567")}
    assert received[2]["customer"]["display_name"] == "Ada Lovelace"
    assert {(i["kind"], i["value"]) for i in summary["identities"]} == identities
    assert (summary["merges"], summary["claimed_links"]) == ([], [])
    assert every_type(d) == ["message.received"] * 3  # no merge of anyone on the way


async def test_same_complaint_by_form_and_email_is_one_thread_marked_duplicate(
    deploy: MakeDeployment,
) -> None:
    smtp = free_port()
    d = await deploy(extra=day_config(smtp))
    async with aiohttp.ClientSession() as session:
        form = await fill_form(session, d.gateway.url, name="Bob", email="bob@example.com", message=COMPLAINT)
        # Not sure the form worked, Bob mails the same complaint (inside the 15-minute duplicate window).
        await send_mail(smtp, mail("bob@example.com", COMPLAINT.lower() + "\n\n-- \nBob", subject="Broken"))
        first, second = await consumed(d, "message.received", 2)

    assert (first["message"]["channel"], second["message"]["channel"]) == ("form", "email")
    assert first["message"]["id"] == form["message_id"]
    assert first["message"]["duplicate_of"] is None
    assert second["message"]["duplicate_of"] == first["message"]["id"]
    assert second["thread"]["id"] == first["thread"]["id"]
    assert (second["thread"]["is_new"], second["thread"]["sequence"]) == (False, 2)
    assert second["customer"]["id"] == first["customer"]["id"]


async def test_two_people_with_one_name_are_two_customers(deploy: MakeDeployment) -> None:
    d = await deploy()
    question = "Where is the refund for order 77120? It has been two weeks."
    async with aiohttp.ClientSession() as session:
        await fill_form(
            session, d.gateway.url, name="Wang Wei", email="wang.wei@example.com", message=question
        )
        await post_api(
            session,
            d.gateway.url,
            {"customer": {"name": "Wang Wei", "email": "wei.wang@example.org"}, "text": question},
        )
        first, second = await consumed(d, "message.received", 2)

    assert first["customer"]["display_name"] == second["customer"]["display_name"] == "Wang Wei"
    assert first["customer"]["id"] != second["customer"]["id"]
    assert first["thread"]["id"] != second["thread"]["id"]
    assert [first["thread"]["is_new"], second["thread"]["is_new"]] == [True, True]
    # The same words from two people are not a duplicate touchpoint.
    assert second["message"]["duplicate_of"] is None
    assert every_type(d) == ["message.received"] * 2


async def test_email_reply_after_the_window_joins_the_original_thread(deploy: MakeDeployment) -> None:
    smtp = free_port()
    window = 1.0
    d = await deploy(extra=day_config(smtp, extra=f'\n[threading]\nwindow = "{window:g}s"\n'))
    question = await send_mail(smtp, mail("carol@example.com", "Can I change the delivery address?"))
    [asked] = await consumed(d, "message.received", 1)
    # The thread window is about time, not about any task: wait until it has passed on the clock.
    asked_at = datetime.fromisoformat(asked["message"]["received_at"])
    await asyncio.sleep(max(0.0, window + 0.3 - (datetime.now(UTC) - asked_at).total_seconds()))

    await send_mail(smtp, mail("carol@example.com", "Unrelated: do you ship to Norway?"))
    await send_mail(
        smtp,
        mail("carol@example.com", "Thanks, the new address is Main St 5.", in_reply_to=f"<{question}>"),
    )
    _, unrelated, reply = await consumed(d, "message.received", 3)

    # Without a reference, a message after the window opens a new thread...
    assert unrelated["thread"]["is_new"]
    assert unrelated["thread"]["id"] != asked["thread"]["id"]
    # ...while the reply's In-Reply-To takes it back to the original one.
    assert reply["message"]["in_reply_to"] == question
    assert reply["thread"]["id"] == asked["thread"]["id"]
    assert (reply["thread"]["is_new"], reply["thread"]["sequence"]) == (False, 2)
    assert len({e["customer"]["id"] for e in (asked, unrelated, reply)}) == 1


async def test_after_the_desk_closes_a_thread_the_next_message_opens_one_that_refers_to_it(
    deploy: MakeDeployment, amqp_url: str, amqp_names: Janitor
) -> None:
    control_queue = amqp_names.queue("control")
    d = await deploy(extra=day_config(free_port(), control_queue=control_queue))
    async with aiohttp.ClientSession() as session:
        body = {"customer": {"email": "dave@example.com", "name": "Dave"}, "text": "My invoice is wrong."}
        await post_api(session, d.gateway.url, body)
        [first] = await consumed(d, "message.received", 1)
        old_thread = first["thread"]["id"]

        # The desk solves it and reports the thread closed on the control queue, as a desk would:
        # a persistent JSON message to the default exchange, routed by the queue's name.
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(control_queue, durable=True)
            close = {
                "type": "thread.closed",
                "thread_id": old_thread,
                "tenant": "demo",
                "at": datetime.now(UTC).isoformat(),
            }
            # What the desk sends is what docs/schema/control.json documents.
            control_schema = orjson.loads((SCHEMA_DIR / "control.json").read_bytes())
            jsonschema.Draft202012Validator(control_schema).validate(close)
            await channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(close),
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=control_queue,
            )
        await wait_for_thread_status(session, d.gateway.url, old_thread, "closed")

        await post_api(session, d.gateway.url, {**body, "text": "One more thing: the VAT number is missing."})
        _, second = await consumed(d, "message.received", 2)

    assert second["customer"]["id"] == first["customer"]["id"]
    assert second["thread"]["id"] != old_thread
    assert (second["thread"]["is_new"], second["thread"]["sequence"]) == (True, 1)
    assert second["thread"]["previous_id"] == old_thread


async def wait_for_thread_status(
    session: aiohttp.ClientSession, url: str, thread_id: str, status: str, within: float = 10.0
) -> None:
    """Poll the desk API (another process's state) until the thread has ``status``."""
    deadline = time.monotonic() + within
    while True:
        thread = await desk(session, "GET", f"{url}/api/v1/threads/{thread_id}")
        if thread["status"] == status:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"thread {thread_id} still {thread['status']} after {within}s")
        await asyncio.sleep(0.05)  # polling another process, not a task of ours


async def test_desk_links_two_customers_and_undoes_it(deploy: MakeDeployment) -> None:
    d = await deploy(extra=DESK_API)
    url = d.gateway.url
    async with aiohttp.ClientSession() as session:
        await fill_form(session, url, name="Erin", email="erin@example.com", message="Password reset fails.")
        await post_api(
            session, url, {"customer": {"email": "erin@work.example"}, "text": "Reset link expired."}
        )
        home, work = await consumed(d, "message.received", 2)
        assert home["customer"]["id"] != work["customer"]["id"]

        # An agent sees it is the same Erin and links the two customers.
        linked = await desk(
            session,
            "POST",
            f"{url}/api/v1/customers/{home['customer']['id']}/link",
            {"customer_id": work["customer"]["id"], "actor": "agent-7", "note": "same person, confirmed"},
        )
        [merged] = await consumed(d, "customer.merged", 1)
        # Mail from her work address now goes to the surviving customer.
        await post_api(session, url, {"customer": {"email": "erin@work.example"}, "text": "Still failing."})
        *_, after_merge = await consumed(d, "message.received", 3)

        # It was a mistake after all: undo.
        undone = await desk(session, "POST", f"{url}/api/v1/merges/{linked['merge_id']}/undo")
        [unmerged] = await consumed(d, "customer.unmerged", 1)
        await post_api(session, url, {"customer": {"email": "erin@work.example"}, "text": "Any news?"})
        *_, after_undo = await consumed(d, "message.received", 4)

    assert (linked["customer_id"], linked["merged_customers"]) == (
        home["customer"]["id"],
        [work["customer"]["id"]],
    )
    assert merged["customer"] == {"id": home["customer"]["id"], "merged": [work["customer"]["id"]]}
    assert merged["merge"]["id"] == linked["merge_id"]
    assert (merged["merge"]["evidence"]["source"], merged["merge"]["evidence"]["actor"]) == (
        "desk",
        "agent-7",
    )
    assert after_merge["customer"]["id"] == home["customer"]["id"]
    assert {i["value"] for i in after_merge["customer"]["identities"]} == {
        "erin@example.com",
        "erin@work.example",
    }
    assert undone["undone_at"] is not None
    assert unmerged["merge"]["id"] == linked["merge_id"]
    assert unmerged["customer"] == merged["customer"]
    assert after_undo["customer"]["id"] == work["customer"]["id"]
    # Her two open threads of the inbox were joined by the link: merged at her next message.
    assert after_merge["thread"]["id"] == home["thread"]["id"]
    assert every_type(d) == [
        "message.received",
        "message.received",
        "customer.merged",
        "thread.merged",
        "message.received",
        "customer.unmerged",
        "message.received",
    ]
