"""Replies from two gateway processes on one PostgreSQL: both consume the control queue and claim
from one reply ledger; one is SIGKILLed with replies in flight. Every command still ends in
``reply.sent``, the smarthost's ledger shows none lost, a repeat at most once (same Message-ID),
and each customer got their thread's replies in the desk's order."""

from __future__ import annotations

import asyncio
import signal
import smtplib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from tests.e2e.harness import GatewayProcess, free_port, gateway_config
from tests.support.consumer import Consumer
from tests.support.postgres import admin_dsn, fresh_database, require_postgres
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event
from tests.support.smtp_sink import SmtpSink

pytestmark = pytest.mark.integration

SUPPORT = "support@demo.localhost"
THREADS = 6
PER_THREAD = 5
SHARED_STORE = """[store]
backend = "postgresql"
dsn = {{ env = "TG_TEST_STORE_DSN" }}
blob_dir = "{blob_dir}"
"""


def extra(smtp_port: int, sink_port: int, control: str) -> str:
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

[control]
queue = "{control}"
single_active_consumer = true

[replies]
poll_interval = "0.2s"
backoff_base = "0.2s"
backoff_cap = "1s"
lease = "3s"
"""


@pytest.fixture
def store_dsn() -> Iterator[str]:
    dsn = admin_dsn()
    require_postgres(dsn)
    with fresh_database(dsn, prefix="ticketgate_e2e") as database:
        yield database


def send_mail(port: int, n: int) -> None:
    raw = (
        f"From: Customer {n} <c{n}@example.com>\r\nTo: {SUPPORT}\r\nSubject: Question {n}\r\n"
        f"Message-ID: <multi-{n}@example.com>\r\nContent-Type: text/plain\r\n\r\nWhere is parcel {n}?\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(f"c{n}@example.com", [SUPPORT], raw)


async def test_two_instances_one_killed_every_reply_sent_in_order(
    tmp_path: Path, store_dsn: str, amqp_url: str, amqp_names: Janitor
) -> None:
    exchange, queue, control = (
        amqp_names.exchange("replies"),
        amqp_names.queue("desk"),
        amqp_names.queue("ctl"),
    )
    sink = await SmtpSink(delay=0.2).start()
    consumer = await Consumer(amqp_url, exchange).start()
    gateways: list[GatewayProcess] = []
    smtp_ports = []
    for n in range(2):
        port, smtp_port = free_port(), free_port()
        smtp_ports.append(smtp_port)
        config = gateway_config(
            tmp_path, name=f"gw{n}", port=port, amqp_url=amqp_url, exchange=exchange, queue=queue,
            store=SHARED_STORE.format(blob_dir=tmp_path / "shared-blobs"),
            extra=extra(smtp_port, sink.port, control),
        )  # fmt: skip
        gateways.append(
            GatewayProcess(
                config=config,
                port=port,
                log_path=tmp_path / f"gw{n}.log",
                env={"TG_TEST_STORE_DSN": store_dsn},
            )
        )
    try:
        await asyncio.gather(*(g.start() for g in gateways))
        for n in range(THREADS):
            await asyncio.to_thread(send_mail, smtp_ports[n % 2], n)

        def received() -> list[dict[str, Any]]:
            return [validate_event(r.body) for r in consumer.distinct() if r.type == "message.received"]

        await consumer.wait_until(lambda: len(received()) >= THREADS, within=30)
        customers = {e["thread"]["id"]: e["customer"]["identities"][0]["value"] for e in received()}
        commands = [
            {
                "type": "reply.requested", "command_id": f"m-{thread[-8:]}-{i}", "thread_id": thread,
                "tenant": "demo", "text": f"Answer {i}",
            }
            for thread in customers
            for i in range(PER_THREAD)
        ]  # fmt: skip
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(control, durable=True, arguments={"x-single-active-consumer": True})
            for command in commands:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(command), content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=control,
                )  # fmt: skip
        await sink.wait_for(5)
        gateways[1].signal(signal.SIGKILL)
        await gateways[1].wait()
        at_kill = len(sink.mails)
        assert at_kill < len(commands)

        def outcomes() -> dict[str, str]:
            return {
                orjson.loads(r.body)["reply"]["command_id"]: str(r.type)
                for r in consumer.distinct()
                if r.type in ("reply.sent", "reply.failed")
            }

        # The survivor takes over the killed instance's leases once they run out.
        await consumer.wait_until(lambda: len(outcomes()) >= len(commands), within=90)
        assert set(outcomes().values()) == {"reply.sent"}
        copies = Counter(m.message["Message-ID"] for m in sink.mails)
        assert len(copies) == len(commands)
        assert max(copies.values()) <= 2
        for thread, address in customers.items():
            texts = [m.message.get_content().strip() for m in sink.mails if m.rcpt_tos == [address]]
            assert list(dict.fromkeys(texts)) == [f"Answer {i}" for i in range(PER_THREAD)], (thread, texts)
        repeats = sum(n - 1 for n in copies.values())
        print(
            f"two instances, one SIGKILLed: {len(commands)} replies, {at_kill} out at the kill,"
            f" {repeats} sent again"
        )
    finally:
        for gateway in gateways:
            await gateway.stop()
        await consumer.close()
        await sink.close()
