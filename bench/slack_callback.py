"""p99 answer time of signed Slack Events API callbacks under load, against Slack's 3 s deadline.

The real gateway runs as its own process (SQLite store, outbox relay, RabbitMQ); a separate load
process posts signed ``event_callback`` requests (a message in a followed channel from one of 500
users, signed beforehand with the signing secret, as Slack does) at a fixed concurrency. With
``--repeat 2`` every event is delivered twice (Slack's retry of the same event_id), so half of the
answers are duplicates found in the store.

    .venv/bin/python -m bench.slack_callback --concurrency 8 32 128 --count 3000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from slack_sdk.signature import SignatureVerifier

from tests.e2e.harness import GatewayProcess, free_port, gateway_config

DEADLINE = 3.0
SECRET = "bench-slack-signing-secret"
INSTALLATION = f"""
[inboxes.slack-demo]
tenant = "demo"

[channels.slack]
api_base = "http://127.0.0.1:9/api"

[channels.slack.inboxes.slack-demo]
signing_secret = "{SECRET}"
bot_token = "xoxb-bench-slack-bot-token"
channels = ["C0BENCH"]
fetch_files = false
profile_emails = false
"""


def signed(n: int) -> tuple[bytes, dict[str, str]]:
    ts = f"{1_765_000_000 + n}.{n % 1_000_000:06d}"
    body = orjson.dumps({
        "type": "event_callback", "team_id": "T0BENCH", "api_app_id": "A0BENCH", "event_id": f"Ev0B{n:08d}",
        "event_time": 1_765_000_000 + n,
        "authorizations": [{"team_id": "T0BENCH", "user_id": "U0BOT", "is_bot": True}],
        "event": {"type": "message", "channel": "C0BENCH", "channel_type": "channel",
                  "user": f"U0B{n % 500:05d}", "team": "T0BENCH",
                  "text": f"bench message {n}: my order has not arrived", "ts": ts, "event_ts": ts},
    })
    timestamp = str(int(time.time()))
    signature = SignatureVerifier(SECRET).generate_signature(timestamp=timestamp, body=body) or ""
    return body, {"Content-Type": "application/json", "X-Slack-Request-Timestamp": timestamp,
                  "X-Slack-Signature": signature}


async def _load(url: str, count: int, concurrency: int, repeat: int, offset: int
                ) -> tuple[list[float], dict[int, int], float]:
    requests = [signed(offset + i) for i in range(count)] * repeat
    random.Random(offset).shuffle(requests)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                body, headers = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(f"{url}/slack/slack-demo/events", data=body, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, statuses, elapsed


def _load_process(url: str, count: int, concurrency: int, repeat: int, offset: int,
                  out: multiprocessing.Queue[object]) -> None:
    out.put(asyncio.run(_load(url, count, concurrency, repeat, offset)))


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--count", type=int, default=3000, help="distinct events per round")
    parser.add_argument("--repeat", type=int, default=1, help="deliveries of each event (2: Slack's retry)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        config = gateway_config(
            tmp_path, port=port, amqp_url=args.amqp_url, exchange="bench-slack", queue="bench-slack-desk",
            extra=INSTALLATION,
        )
        config.write_text(config.read_text().replace('level = "INFO"', 'level = "WARNING"'))
        gateway = GatewayProcess(config=config, port=port, log_path=tmp_path / "gateway.log")
        await gateway.start()
        try:
            pid = gateway.proc.pid if gateway.proc else "?"
            print(f"gateway pid {pid}: SQLite store + relay + RabbitMQ; each event delivered {args.repeat}x")
            header = ("conc", "n", "200", "req/s", "p50 ms", "p99 ms", "max ms")
            print(" ".join(f"{h:>8}" for h in header), " deadline")
            for round_number, concurrency in enumerate(args.concurrency):
                ctx = multiprocessing.get_context("spawn")
                out: multiprocessing.Queue[object] = ctx.Queue()
                load = ctx.Process(target=_load_process, args=(
                    gateway.url, args.count, concurrency, args.repeat, round_number * 1_000_000, out,
                ))
                load.start()
                latencies, statuses, elapsed = await asyncio.to_thread(out.get)  # type: ignore[misc]
                load.join()
                p99 = _pct(latencies, 99)
                cells = (
                    f"{concurrency:>8}", f"{len(latencies):>8}", f"{statuses.get(200, 0):>8}",
                    f"{len(latencies) / elapsed:>8.0f}", f"{statistics.median(latencies) * 1000:>8.1f}",
                    f"{p99 * 1000:>8.1f}", f"{max(latencies) * 1000:>8.1f}",
                )
                share = f"p99 = {p99 / DEADLINE * 100:.2f}% of {DEADLINE:g} s"
                print(" ".join(cells), f" {share}; statuses {statuses}")
        finally:
            await gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
