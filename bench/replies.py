"""Replies through the email sender: replies per second into a local SMTP sink, and the time from a
desk's command to its ``reply.sent``.

    .venv/bin/python bench/replies.py [--threads 50] [--replies 1000] [--concurrency 8]
                                      [--rate 0] [--store sqlite|postgresql]

The real gateway runs as a ``ticketgate run`` child (SQLite store by default, the outbox relay in
its own process, RabbitMQ with confirms). This process plays the customers, the desk and the
smarthost: it sends ``--threads`` mails over SMTP (one customer and one thread each), then
publishes ``--replies`` ``reply.requested`` commands on the control queue, spread over the threads
(the replies of one thread go out one after another, threads in parallel), and receives every
reply in an aiosmtpd sink on a free port while it consumes the ``reply.sent`` events.

Printed: replies per second (first command published to last ``reply.sent`` consumed), and the
latency from publishing a command to consuming its ``reply.sent`` (p50, p90, p99, max) — the whole
way: the control queue, the ledger commit, the claim, the SMTP transaction, the outcome's commit,
the relay and the broker. ``--rate`` paces the commands (per second) to measure latency below
saturation; 0 publishes them all at once. The sink shares this process with the load, so the
figures are a floor; on a shared machine they are noisy: compare runs, not absolute numbers.
Needs RabbitMQ (``TICKETGATE_TEST_AMQP_URL`` or the local default).
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aio_pika  # noqa: E402
import orjson  # noqa: E402

from tests.e2e.harness import GatewayProcess, free_port, gateway_config  # noqa: E402
from tests.support.consumer import Consumer  # noqa: E402
from tests.support.rabbitmq import broker_url  # noqa: E402
from tests.support.smtp_sink import SmtpSink  # noqa: E402

SUPPORT = "support@demo.localhost"


def config_extra(smtp_port: int, sink_port: int, control: str, concurrency: int) -> str:
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
# The smarthost's own limit is not under test.
rate = 100000.0
burst = 100000

[control]
queue = "{control}"
prefetch = 256

[replies]
concurrency = {concurrency}
poll_interval = "0.5s"
"""


def send_mails(port: int, count: int, run: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for n in range(count):
            raw = (
                f"From: Customer {n} <c{n}.{run}@example.com>\r\nTo: {SUPPORT}\r\n"
                f"Subject: Parcel {n}\r\nMessage-ID: <{run}.{n}@bench.example>\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\nWhere is my parcel?\r\n"
            ).encode()
            client.sendmail(f"c{n}.{run}@example.com", [SUPPORT], raw)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> None:
    amqp = broker_url()
    tag = uuid.uuid4().hex[:10]
    exchange, queue, control = f"bench.replies.{tag}", f"bench.replies.desk.{tag}", f"bench.control.{tag}"
    sink = await SmtpSink().start()
    with tempfile.TemporaryDirectory(prefix="tg-bench-replies-") as tmp_dir:
        tmp = Path(tmp_dir)
        port, smtp_port = free_port(), free_port()
        store = None
        if args.store == "postgresql":
            store = f'[store]\nbackend = "postgresql"\ndsn = "{args.dsn}"\nblob_dir = "{tmp / "blobs"}"\n'
        config = gateway_config(
            tmp, port=port, amqp_url=amqp, exchange=exchange, queue=queue, store=store,
            extra=config_extra(smtp_port, sink.port, control, args.concurrency),
        )  # fmt: skip
        gateway = GatewayProcess(config=config, port=port, log_path=tmp / "gateway.log")
        consumer = await Consumer(amqp, exchange).start()
        connection = await aio_pika.connect(amqp)
        try:
            await gateway.start()
            await asyncio.to_thread(send_mails, smtp_port, args.threads, tag)
            await consumer.wait_until(
                lambda: sum(r.type == "message.received" for r in consumer.received) >= args.threads,
                within=120,
            )
            threads = [
                orjson.loads(r.body)["thread"]["id"]
                for r in consumer.distinct()
                if r.type == "message.received"
            ]
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue(control, durable=True)
            published: dict[str, float] = {}
            wall: dict[str, float] = {}  # the same moments on the wall clock the gateway stamps with
            arrived: dict[str, float] = {}  # stamped as the consumer receives (it wakes the predicate)
            seen: set[str | None] = set()
            failed: list[dict[str, Any]] = []
            ledger: list[float] = []
            intake: list[float] = []

            def collect() -> bool:
                for delivery in consumer.received:
                    if delivery.type not in ("reply.sent", "reply.failed") or delivery.message_id in seen:
                        continue
                    seen.add(delivery.message_id)
                    event = orjson.loads(delivery.body)
                    arrived.setdefault(event["reply"]["command_id"], time.perf_counter())
                    if delivery.type == "reply.failed":
                        failed.append(event["reply"])
                    else:
                        requested = event["reply"]["requested_at"].replace("Z", "+00:00")
                        occurred = event["occurred_at"].replace("Z", "+00:00")
                        gap = datetime.fromisoformat(occurred) - datetime.fromisoformat(requested)
                        ledger.append(gap.total_seconds())
                        stored = datetime.fromisoformat(requested).timestamp()
                        intake.append(stored - wall[event["reply"]["command_id"]])
                return len(arrived) >= args.replies

            waiting = asyncio.create_task(consumer.wait_until(collect, within=args.timeout))
            started = time.perf_counter()
            pause = 1.0 / args.rate if args.rate > 0 else 0.0
            for n in range(args.replies):
                command_id = f"bench-{tag}-{n}"
                body: dict[str, Any] = {
                    "type": "reply.requested", "command_id": command_id,
                    "thread_id": threads[n % len(threads)], "tenant": "demo",
                    "text": f"Your parcel {n} is on its way.", "agent_name": "Bench",
                }  # fmt: skip
                published[command_id] = time.perf_counter()
                wall[command_id] = time.time()
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        orjson.dumps(body), content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=control,
                )  # fmt: skip
                if pause:
                    await asyncio.sleep(max(0.0, started + (n + 1) * pause - time.perf_counter()))
            await waiting
            elapsed = max(arrived.values()) - started
            latencies = [arrived[c] - published[c] for c in arrived]
            mode = "burst" if not args.rate else f"{args.rate:g}/s"
            ms = {q: percentile(latencies, q) * 1000 for q in (0.5, 0.9, 0.99)}
            print(
                f"replies through the email sender: {args.replies} over {len(threads)} threads, "
                f"concurrency {args.concurrency}, store {args.store}, commands {mode}"
            )
            print(
                f"  {args.replies / elapsed:8.1f} replies/s  ({elapsed:.2f} s; {len(failed)} failed; "
                f"{len(sink.mails)} mails in the sink)"
            )
            print(
                f"  command -> reply.sent consumed: p50 {ms[0.5]:7.1f} ms  p90 {ms[0.9]:7.1f} ms"
                f"  p99 {ms[0.99]:7.1f} ms  max {max(latencies) * 1000:7.1f} ms"
            )
            if ledger:
                print(
                    f"  stored command -> reply.sent committed (the gateway's clock):"
                    f" p50 {statistics.median(ledger) * 1000:7.1f} ms"
                    f"  p99 {percentile(ledger, 0.99) * 1000:7.1f} ms"
                )
            if intake:
                print(
                    f"  command published -> stored (the control queue):"
                    f" p50 {statistics.median(intake) * 1000:7.1f} ms"
                    f"  p99 {percentile(intake, 0.99) * 1000:7.1f} ms"
                )
        finally:
            await gateway.stop()
            await consumer.close()
            async with connection:
                ch = await connection.channel()
                for name in (queue, control):
                    await ch.queue_delete(name)
                await ch.exchange_delete(exchange)
            await sink.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=50)
    parser.add_argument("--replies", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="[replies] concurrency")
    parser.add_argument("--rate", type=float, default=0.0, help="commands per second; 0: all at once")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--dsn", default="postgresql://ticketgate@127.0.0.1:5432/ticketgate_bench")
    parser.add_argument("--timeout", type=float, default=600.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
