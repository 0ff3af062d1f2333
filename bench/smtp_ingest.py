"""SMTP ingest throughput: many concurrent sessions sending 5 KB and 200 KB mails.

    .venv/bin/python bench/smtp_ingest.py [--sessions 16] [--mails 2000] [--sizes 5 200] [--e2e]

In one run, for each size, the same load goes to:

- ``bare``: aiosmtpd answering ``250`` at once (the transport's ceiling on this machine);
- ``ticketgate``: the email connector's listener (limits, smuggling check, routing, trust, the
  envelope) with an ``ingest`` that answers "stored" at once: **transport only**;
- with ``--e2e``: the whole gateway from ``gateway.app.create_app`` (email normalizer, SQLite
  store with group commit, outbox relay, RabbitMQ with confirms); a mail counts when its event
  was consumed from a queue. Needs RabbitMQ (``TICKETGATE_TEST_AMQP_URL`` or the local default).

Load comes from ``--sessions`` client processes, each one SMTP session sending its share of mails
with smtplib (smtp-source would need Debian's whole postfix package installed). On a 2-core
machine the clients compete with the server for CPU, so compare the ratio, not the absolute figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import smtplib
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from connectors.email import EmailConnector
from gateway.model import IngestResult, Outcome, Placement, RawEnvelope
from gateway.settings import Settings

RCPT = "support@bench.localhost"
STORED = IngestResult(
    outcome=Outcome.ACCEPTED,
    placements=(Placement(message_id="m", thread_id="t", customer_id="c", sequence=1, is_new_thread=True),),
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_mail(n: int, size: int, run: str) -> bytes:
    head = (
        f"From: Customer {n % 500} <customer{n % 500}@example.com>\r\n"
        f"To: {RCPT}\r\nSubject: Order {n} question\r\nMessage-ID: <{run}.{n}@bench.example>\r\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"Hello, my parcel has not arrived yet, could you please check the tracking number?\r\n"
    body = line * max(1, (size - len(head)) // len(line) + 1)
    return head + body[: max(0, size - len(head))]


def client(port: int, first: int, count: int, size: int, run: str) -> int:
    """One SMTP session sending ``count`` mails; returns how many got 250."""
    ok = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for n in range(first, first + count):
            smtp.sendmail("customer@example.com", [RCPT], make_mail(n, size, run))
            ok += 1
    return ok


async def drive(
    pool: ProcessPoolExecutor, port: int, sessions: int, mails: int, size: int, run: str
) -> float:
    loop = asyncio.get_running_loop()
    share = mails // sessions
    started = time.perf_counter()
    done = await asyncio.gather(
        *(loop.run_in_executor(pool, client, port, i * share, share, size, run) for i in range(sessions))
    )
    elapsed = time.perf_counter() - started
    assert sum(done) == share * sessions
    return elapsed


class BareHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


@asynccontextmanager
async def bare_server() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(BareHandler(), loop=loop, hostname="bench", data_size_limit=1 << 24),
        "127.0.0.1",
        0,
    )
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def settings(data: Path, port: int, *, amqp_url: str | None = None, exchange: str = "bench") -> Settings:
    raw: dict[str, Any] = {
        "store": {"path": str(data / "ticketgate.db"), "blob_dir": str(data / "blobs")},
        "tenants": {"bench": {}},
        "inboxes": {"support": {"tenant": "bench"}},
        "channels": {
            "email": {
                "smtp": {
                    "host": "127.0.0.1",
                    "port": port,
                    "hostname": "bench",
                    "max_connections_per_ip": 1000,
                    "max_message_size": 1 << 24,
                },
                "inboxes": {"support": {"addresses": [RCPT]}},
            }
        },
    }
    if amqp_url is not None:
        raw["broker"] = {"url": amqp_url, "exchange": exchange, "queues": [{"name": f"{exchange}.desk"}]}
        raw["outbox"] = {"poll_interval": 0.2}
    return Settings.model_validate(raw)


@asynccontextmanager
async def transport_only(data: Path) -> AsyncIterator[int]:
    async def ingest(envelope: RawEnvelope, normalize: Callable[..., Any]) -> IngestResult:
        return STORED

    port = free_port()
    s = settings(data, port)
    connector = EmailConnector.from_settings(s)
    assert connector is not None
    app = web.Application()
    connector.setup(app, ingest)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield port
    finally:
        await runner.cleanup()


async def run_e2e(
    pool: ProcessPoolExecutor, args: argparse.Namespace, size: int, data: Path
) -> tuple[float, int]:
    """The whole gateway; returns (seconds until the last event was consumed, events consumed)."""
    import aio_pika

    from gateway.app import create_app

    url = os.environ.get("TICKETGATE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    exchange = f"bench.{uuid.uuid4().hex[:8]}"
    port = free_port()
    app = create_app(settings(data, port, amqp_url=url, exchange=exchange))
    runner = web.AppRunner(app)
    await runner.setup()
    connection = await aio_pika.connect_robust(url)
    consumed = 0
    all_in = asyncio.Event()
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.declare_queue(f"{exchange}.desk", durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal consumed
            await message.ack()
            consumed += 1
            if consumed >= args.mails:
                all_in.set()

        await queue.consume(on_message)
        started = time.perf_counter()
        await drive(pool, port, args.sessions, args.mails, size, uuid.uuid4().hex)
        await asyncio.wait_for(all_in.wait(), 300)
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
        exchange_obj = await channel.get_exchange(exchange)
        await exchange_obj.delete()
    finally:
        await connection.close()
        await runner.cleanup()
    return elapsed, consumed


async def main(args: argparse.Namespace) -> None:
    args.mails -= args.mails % args.sessions
    print(f"{args.sessions} sessions (one process each), {args.mails} mails per run, {os.cpu_count()} CPUs")
    with ProcessPoolExecutor(max_workers=args.sessions) as pool, tempfile.TemporaryDirectory() as tmp:
        # Warm the worker processes up so process start-up is not measured.
        await asyncio.gather(
            *(asyncio.get_running_loop().run_in_executor(pool, int) for _ in range(args.sessions))
        )
        for size_kb in args.sizes:
            size = size_kb * 1024
            async with bare_server() as port:
                bare = await drive(pool, port, args.sessions, args.mails, size, "bare")
            async with transport_only(Path(tmp) / f"t{size_kb}") as port:
                ours = await drive(pool, port, args.sessions, args.mails, size, "tg")
            print(
                f"{size_kb:>4} KB  bare aiosmtpd {args.mails / bare:8.0f} mails/s   "
                f"ticketgate transport only {args.mails / ours:8.0f} mails/s   "
                f"ticketgate/bare {bare / ours:5.2f}"
            )
            if args.e2e:
                elapsed, consumed = await run_e2e(pool, args, size, Path(tmp) / f"e{size_kb}")
                print(
                    f"{size_kb:>4} KB  end to end (store + relay + RabbitMQ, events consumed) "
                    f"{consumed / elapsed:8.0f} mails/s   "
                    f"e2e/bare {(consumed / elapsed) / (args.mails / bare):5.2f}"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--mails", type=int, default=2000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 200], help="mail sizes in KB")
    parser.add_argument("--e2e", action="store_true", help="also run the whole gateway against RabbitMQ")
    asyncio.run(main(parser.parse_args()))
