"""Meta webhook benchmark: signed WhatsApp bodies into ``/meta/{app}`` of the real application.

The real app (signature check, channel split, pipeline, SQLite store with group commit, inline
outbox relay to an in-memory publisher) served on a local port; a client posts signed bodies at a
fixed concurrency over keep-alive connections. Prints, per body shape (one message, a batch of ten
messages over two entries): bodies/s and messages/s answered 200, answer latency p50/p99, and the
cost of one signature check. Figures from a shared, loaded machine: compare ratios, not absolutes.

Usage: .venv/bin/python bench/meta_webhook.py [--bodies 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.meta.hub import MetaApp  # noqa: E402
from core.settings import Settings  # noqa: E402
from gateway.app import Overrides, create_app  # noqa: E402
from gateway.publisher import MemoryPublisher  # noqa: E402

SECRET = "bench-app-secret"


def settings(tmp: Path) -> Settings:
    return Settings.model_validate(
        {
            "server": {"normalizer_process": False},
            "store": {"path": str(tmp / "bench.db"), "blob_dir": str(tmp / "blobs")},
            "outbox": {"relay": "inline"},
            "control": {"enabled": False},
            "tenants": {"acme": {}},
            "inboxes": {"support": {"tenant": "acme"}},
            "channels": {
                "meta": {"apps": {"acme": {"app_secret": SECRET, "verify_token": "v"}}},
                "whatsapp": {
                    "api_base": "http://127.0.0.1:9",
                    "inboxes": {"support": {"app": "acme", "access_token": "t", "fetch_media": False}},
                },
            },
        }
    )


def body(n: int, per_entry: int, entries: int) -> bytes:
    def value(e: int) -> dict[str, Any]:
        messages = [
            {
                "from": f"49151{(n * 10 + e * per_entry + i) % 100000:07d}",
                "id": f"wamid.BENCH{n:07d}.{e}.{i}",
                "timestamp": "1764920000",
                "type": "text",
                "text": {"body": f"Wo ist Bestellung {n}-{i}?"},
            }
            for i in range(per_entry)
        ]
        return {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
            "messages": messages,
        }

    return orjson.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [
                {"id": "102290129340398", "changes": [{"field": "messages", "value": value(e)}]}
                for e in range(entries)
            ],
        }
    )


def sign(raw: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()


async def run(shape: str, per_entry: int, entries: int, bodies: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = TestServer(create_app(settings(Path(tmp)), Overrides(publisher=MemoryPublisher())))
        await server.start_server()
        payloads = [body(n, per_entry, entries) for n in range(bodies)]
        latencies: list[float] = []
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for raw in payloads:
            queue.put_nowait(raw)
        url = str(server.make_url("/meta/acme"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def worker() -> None:
                while not queue.empty():
                    raw = queue.get_nowait()
                    started = time.perf_counter()
                    async with session.post(
                        url, data=raw, headers={"X-Hub-Signature-256": sign(raw)}
                    ) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"answered {resp.status}")
                    latencies.append(time.perf_counter() - started)

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
        await server.close()
    quantiles = statistics.quantiles(latencies, n=100)
    messages = bodies * per_entry * entries
    print(
        f"{shape:<28} {bodies / elapsed:8.0f} bodies/s {messages / elapsed:8.0f} messages/s "
        f"answer p50 {quantiles[49] * 1000:6.1f} ms p99 {quantiles[98] * 1000:6.1f} ms"
    )


def signature_cost() -> None:
    app = MetaApp(name="bench", secrets=(SECRET.encode(), b"previous"), verify_digest=b"\x00" * 32)
    raw = body(1, 1, 1)
    header = sign(raw)
    rounds = 20000
    began = time.perf_counter()
    for _ in range(rounds):
        app.signed(header, raw)
    per = (time.perf_counter() - began) / rounds
    print(f"signature check (two secrets, {len(raw)} B body): {per * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bodies", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    signature_cost()
    asyncio.run(run("one message per body", 1, 1, args.bodies, args.concurrency))
    asyncio.run(run("10 messages, 2 entries", 5, 2, max(args.bodies // 5, 1), args.concurrency))


if __name__ == "__main__":
    main()
