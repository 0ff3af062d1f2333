"""Live web chat benchmark and client: visitors on the widget's socket protocol against the real gateway.

``load``: the real gateway (``ticketgate run``, SQLite, relay, RabbitMQ) as a child process, and
``--visitors`` (1,000) concurrent visitors, each on its own socket, sending ``--messages`` messages
one after the other (the widget's one-in-flight rule). Prints messages/s acknowledged (an ack is
sent only after the durable commit), p50/p99/max from send to delivery tick, and how many distinct
events reached the bus.

``idle``: ``--sockets`` (10,000) visitors connect, say hello and stay idle. Prints the gateway's RSS
before and with them held (per socket), and the latency of ``/healthz`` and of an API message with
and without them: idle chats must not hurt the rest of the gateway.

``say``: one visitor sends one message to a running gateway and prints the answer (the set-up
guide's try-it command).

Usage:
  .venv/bin/python -m bench.webchat            # load, then idle
  .venv/bin/python -m bench.webchat load --visitors 1000 --messages 5
  .venv/bin/python -m bench.webchat idle --sockets 10000
  .venv/bin/python -m bench.webchat say --url http://127.0.0.1:8080 "你好"

The machine is shared and noisy: compare figures from the same run, and quote the command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import QueueCounter  # noqa: E402
from tests.e2e.harness import GatewayProcess, free_port, gateway_config  # noqa: E402

AMQP = os.environ.get("TICKETGATE_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
API_KEY = "e2e-test-key-0001"  # the harness config's key


def chat_config(sockets: int) -> str:
    """The web chat for a benchmark: every visitor comes from 127.0.0.1, so the per-IP bounds are
    opened up; the rest is the shipped defaults."""
    return f"""
[channels.webchat]
session_secret = "bench-chat-session-secret"
max_sockets = {sockets}
max_sockets_per_ip = {sockets}
messages_per_minute = 600
message_burst = 100
ip_messages_per_minute = 100000000
ip_message_burst = 1000000
connects_per_minute = 100000000
connect_burst = 1000000

[channels.webchat.inboxes.demo]
demo_page = true
"""


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@contextlib.asynccontextmanager
async def gateway(sockets: int) -> AsyncIterator[tuple[GatewayProcess, QueueCounter]]:
    import aio_pika

    with tempfile.TemporaryDirectory(prefix="tg-webchat-bench-") as tmp:
        port = free_port()
        exchange = f"bench-webchat-{uuid.uuid4().hex[:8]}"
        extra = chat_config(sockets)
        config = gateway_config(
            Path(tmp), port=port, amqp_url=AMQP, exchange=exchange, queue=f"{exchange}.desk", extra=extra
        )
        # Room for the sockets and the rest of the gateway.
        text = config.read_text().replace(
            "shutdown_timeout = 5", f"shutdown_timeout = 5\nmax_connections = {sockets + 2048}"
        )
        text = text.replace('[log]\nlevel = "INFO"', '[log]\nlevel = "WARNING"')
        config.write_text(text)
        counter = QueueCounter()
        connection = await aio_pika.connect(AMQP)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(ex, routing_key="#.message.received")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            counter.seen(message.message_id)
            await message.ack()

        await queue.consume(on_message)
        process = GatewayProcess(config=config, port=port, log_path=Path(tmp) / "gateway.log")
        await process.start()
        try:
            yield process, counter
        finally:
            await process.stop()
            with contextlib.suppress(Exception):
                await channel.exchange_delete(exchange)
            await connection.close()


class Visitor:
    """One widget: a socket, a session, messages with client ids."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.welcome: dict[str, Any] = {}

    @classmethod
    async def open(
        cls, http: aiohttp.ClientSession, url: str, inbox: str = "demo", token: str | None = None
    ) -> Visitor:
        ws = await http.ws_connect(
            f"{url}/chat/{inbox}/ws", headers={"Origin": url}, heartbeat=None, autoping=True
        )
        visitor = cls(ws)
        await ws.send_str(orjson.dumps({"type": "hello", "token": token, "lang": "en"}).decode())
        visitor.welcome = await visitor.frame("welcome")
        return visitor

    async def frame(self, kind: str, client_id: str | None = None) -> dict[str, Any]:
        while True:
            message = await self.ws.receive(timeout=60)
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                raise ConnectionError(f"socket closed: {message.type} {message.data}")
            frame: dict[str, Any] = orjson.loads(message.data)
            if frame.get("type") in (kind, "error") and (
                client_id is None or frame.get("client_id") == client_id
            ):
                return frame

    async def say(self, text: str) -> tuple[dict[str, Any], float]:
        client_id = uuid.uuid4().hex
        started = time.perf_counter()
        await self.ws.send_str(
            orjson.dumps({"type": "message", "client_id": client_id, "text": text}).decode()
        )
        answer = await self.frame("ack", client_id)
        return answer, time.perf_counter() - started


async def load(visitors: int, messages: int) -> None:
    raise_fd_limit()
    async with gateway(visitors + 100) as (process, counter):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            opened = await asyncio.gather(*(Visitor.open(http, process.url) for _ in range(visitors)))
            latencies: list[float] = []
            errors = 0

            async def chat(n: int, visitor: Visitor) -> None:
                nonlocal errors
                for m in range(messages):
                    answer, took = await visitor.say(
                        f"visitor {n} message {m}: where is order #{100000 + n}?"
                    )
                    if answer["type"] == "ack":
                        latencies.append(took)
                    else:
                        errors += 1

            started = time.perf_counter()
            await asyncio.gather(*(chat(n, v) for n, v in enumerate(opened)))
            elapsed = time.perf_counter() - started
            await counter.wait_for(len(latencies), within=60)
            await asyncio.gather(*(v.ws.close() for v in opened))
            on_bus = len(counter.ids)
            api_rate, api_latencies = await api_baseline(process.url, visitors, messages)
        total = len(latencies)
        print(f"web chat load: {visitors} concurrent visitors x {messages} messages, one in flight each")
        print(
            f"  acknowledged (stored)   {total} in {elapsed:.2f} s = {total / elapsed:.0f} messages/s"
            f" ({errors} errors)"
        )
        print(
            f"  send -> delivery tick   p50 {statistics.median(latencies) * 1000:.1f} ms"
            f"  p99 {pct(latencies, 0.99) * 1000:.1f} ms  max {max(latencies) * 1000:.1f} ms"
        )
        print(f"  events on the bus       {on_bus} distinct (expected {total})")
        print(
            f"  the same through the API, same gateway, right after: {api_rate:.0f} messages/s,"
            f" p50 {statistics.median(api_latencies) * 1000:.1f} ms"
            f" p99 {pct(api_latencies, 0.99) * 1000:.1f} ms (the machine's noise, for comparison)"
        )
        print(f"  gateway RSS after       {rss_kib(process.proc.pid) / 1024:.0f} MiB" if process.proc else "")


async def api_baseline(url: str, clients: int, each: int) -> tuple[float, list[float]]:
    """As many messages through POST /api/v1/messages, ``clients`` at once, one in flight each."""
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client(n: int) -> None:
            for m in range(each):
                started = time.perf_counter()
                async with http.post(
                    f"{url}/api/v1/messages",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    json={"customer": {"external_id": f"bench-{n}"}, "text": f"client {n} message {m}"},
                ) as response:
                    await response.read()
                    if response.status == 202:
                        latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client(n) for n in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


async def probe_latency(
    http: aiohttp.ClientSession, url: str, n: int = 200
) -> tuple[list[float], list[float]]:
    health: list[float] = []
    api: list[float] = []
    for i in range(n):
        started = time.perf_counter()
        async with http.get(f"{url}/healthz") as response:
            await response.read()
        health.append(time.perf_counter() - started)
        if i % 4 == 0:
            started = time.perf_counter()
            async with http.post(
                f"{url}/api/v1/messages",
                headers={"Authorization": f"Bearer {API_KEY}"},
                json={
                    "customer": {"email": f"idle{i}@example.com"},
                    "text": f"api message {i} {uuid.uuid4().hex}",
                },
            ) as response:
                assert response.status == 202, response.status
            api.append(time.perf_counter() - started)
    return health, api


async def idle(sockets: int) -> None:
    raise_fd_limit()
    async with gateway(sockets + 10) as (process, _counter):
        assert process.proc is not None
        pid = process.proc.pid
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as probe_http:
            health0, api0 = await probe_latency(probe_http, process.url)
            before = rss_kib(pid)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                held: list[Visitor] = []
                started = time.perf_counter()
                batch = 500
                for first in range(0, sockets, batch):
                    held += await asyncio.gather(
                        *(Visitor.open(http, process.url) for _ in range(min(batch, sockets - first)))
                    )
                opened_in = time.perf_counter() - started
                await asyncio.sleep(2)
                with_sockets = rss_kib(pid)
                health1, api1 = await probe_latency(probe_http, process.url)
                visitor = await Visitor.open(http, process.url)
                _answer, chat_took = await visitor.say("still answered with every socket held?")
                await asyncio.gather(*(v.ws.close() for v in [*held, visitor]), return_exceptions=True)
        print(f"web chat idle sockets: {sockets} visitors connected and said hello in {opened_in:.1f} s")
        print(
            f"  gateway RSS             {before / 1024:.0f} MiB before,"
            f" {with_sockets / 1024:.0f} MiB with them"
            f" (+{(with_sockets - before) / sockets:.1f} KiB per socket)"
        )
        print(
            f"  /healthz                p50 {statistics.median(health0) * 1000:.1f} ms p99"
            f" {pct(health0, 0.99) * 1000:.1f} ms without; p50 {statistics.median(health1) * 1000:.1f} ms"
            f" p99 {pct(health1, 0.99) * 1000:.1f} ms with them"
        )
        print(
            f"  API message (stored)    p50 {statistics.median(api0) * 1000:.1f} ms p99"
            f" {pct(api0, 0.99) * 1000:.1f} ms without; p50 {statistics.median(api1) * 1000:.1f} ms"
            f" p99 {pct(api1, 0.99) * 1000:.1f} ms with them"
        )
        print(f"  one more chat message   {chat_took * 1000:.1f} ms to its tick with them held")


async def say(url: str, inbox: str, text: str) -> None:
    async with aiohttp.ClientSession() as http:
        visitor = await Visitor.open(http, url.rstrip("/"), inbox)
        answer, took = await visitor.say(text)
        await visitor.ws.close()
    print(orjson.dumps({"session": visitor.welcome["session"], **answer}).decode())
    print(f"({took * 1000:.0f} ms)", file=sys.stderr)
    if answer["type"] != "ack":
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    p_load = sub.add_parser("load")
    p_load.add_argument("--visitors", type=int, default=1000)
    p_load.add_argument("--messages", type=int, default=5)
    p_idle = sub.add_parser("idle")
    p_idle.add_argument("--sockets", type=int, default=10_000)
    p_say = sub.add_parser("say")
    p_say.add_argument("--url", default="http://127.0.0.1:8080")
    p_say.add_argument("--inbox", default="demo")
    p_say.add_argument("text")
    args = parser.parse_args()
    if args.command == "say":
        asyncio.run(say(args.url, args.inbox, args.text))
    elif args.command == "load":
        asyncio.run(load(args.visitors, args.messages))
    elif args.command == "idle":
        asyncio.run(idle(args.sockets))
    else:
        asyncio.run(load(1000, 5))
        asyncio.run(idle(10_000))


if __name__ == "__main__":
    main()
