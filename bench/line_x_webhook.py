"""LINE and X webhook benchmark: signed bodies into ``/line/{inbox}`` and ``/x/{app}`` of the real app.

The real application (signature check, pipeline, SQLite store with group commit, inline outbox
relay to an in-memory publisher) on a local port; a client posts signed bodies at a fixed
concurrency over keep-alive connections. Prints, per body shape: bodies/s and messages/s answered
200, answer latency p50/p99/max against the provider's deadline (LINE 2 s, X 3 s), and the cost of
one signature check with two secrets configured. Figures from a shared, loaded machine: compare
ratios, not absolutes.

Usage: .venv/bin/python bench/line_x_webhook.py [--bodies 2000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from connectors.line.connector import Account  # noqa: E402
from connectors.line.connector import signature as line_signature  # noqa: E402
from connectors.x.connector import App  # noqa: E402
from connectors.x.connector import signature as x_signature  # noqa: E402
from core.settings import Settings  # noqa: E402
from gateway.app import Overrides, create_app  # noqa: E402
from gateway.publisher import MemoryPublisher  # noqa: E402

LINE_SECRET, X_SECRET, ACCOUNT = "bench-line-secret", "bench-x-secret", "1432107654321098752"


def settings(tmp: Path) -> Settings:
    return Settings.model_validate({
        "server": {"normalizer_process": False},
        "store": {"path": str(tmp / "bench.db"), "blob_dir": str(tmp / "blobs")},
        "outbox": {"relay": "inline"},
        "control": {"enabled": False},
        "tenants": {"acme": {}},
        "inboxes": {"line": {"tenant": "acme"}, "x": {"tenant": "acme"}},
        "channels": {
            "line": {"api_base": "http://127.0.0.1:9", "data_api_base": "http://127.0.0.1:9",
                     "inboxes": {"line": {"channel_secret": LINE_SECRET, "fetch_media": False}}},
            "x": {"api_base": "http://127.0.0.1:9", "apps": {"acme": {
                "consumer_secret": X_SECRET, "accounts": {ACCOUNT: {"inbox": "x", "fetch_media": False}}}}},
        },
    })


def line_body(n: int, events: int) -> bytes:
    return orjson.dumps({"destination": "U" + "d" * 32, "events": [
        {"type": "message", "mode": "active", "timestamp": 1764921600000 + n,
         "webhookEventId": f"01BENCH{n:09d}{i:03d}", "deliveryContext": {"isRedelivery": False},
         "replyToken": f"{n:016x}{i:016x}",
         "source": {"type": "user", "userId": f"U{(n * events + i) % 50000:032x}"},
         "message": {"id": str(700_000_000_000 + n * events + i), "type": "text",
                     "text": f"注文 {n}-{i} はどこ？"}}
        for i in range(events)
    ]})


def x_body(n: int, events: int) -> bytes:
    dms = [
        {"type": "message_create", "id": str(1_870_000_000_000_000_000 + n * events + i),
         "created_timestamp": "1764921600000",
         "message_create": {"target": {"recipient_id": ACCOUNT}, "sender_id": str(1_600_000_000 + n % 50000),
                            "message_data": {"text": f"Where is order {n}-{i}?", "entities": {"urls": []}}}}
        for i in range(events)
    ]
    return orjson.dumps({"for_user_id": ACCOUNT, "direct_message_events": dms})


Shape = tuple[str, str, str, Callable[[int, int], bytes], Callable[[bytes], dict[str, str]], int, float]
SHAPES: list[Shape] = [
    ("LINE, one event per body", "/line/line", "line", line_body,
     lambda raw: {"X-Line-Signature": line_signature(LINE_SECRET.encode(), raw).decode()}, 1, 2.0),
    ("LINE, 10 events per body", "/line/line", "line", line_body,
     lambda raw: {"X-Line-Signature": line_signature(LINE_SECRET.encode(), raw).decode()}, 10, 2.0),
    ("X, one DM per body", "/x/acme", "x", x_body,
     lambda raw: {"x-twitter-webhooks-signature": x_signature(X_SECRET.encode(), raw).decode()}, 1, 3.0),
]


async def run(shape: Shape, bodies: int, concurrency: int) -> None:
    name, path, _, make, sign, events, deadline = shape
    with tempfile.TemporaryDirectory() as tmp:
        server = TestServer(create_app(settings(Path(tmp)), Overrides(publisher=MemoryPublisher())))
        await server.start_server()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for n in range(bodies):
            queue.put_nowait(make(n, events))
        latencies: list[float] = []
        url = str(server.make_url(path))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

            async def worker() -> None:
                while not queue.empty():
                    raw = queue.get_nowait()
                    headers: dict[str, Any] = {"Content-Type": "application/json", **sign(raw)}
                    started = time.perf_counter()
                    async with session.post(url, data=raw, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"answered {resp.status}")
                    latencies.append(time.perf_counter() - started)

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - began
        await server.close()
    q = statistics.quantiles(latencies, n=100)
    print(f"{name:<26} {bodies / elapsed:7.0f} bodies/s {bodies * events / elapsed:7.0f} messages/s "
          f"answer p50 {q[49] * 1000:6.1f} ms p99 {q[98] * 1000:6.1f} ms max {max(latencies) * 1000:6.1f} ms "
          f"(deadline {deadline:.0f} s)")


def signature_costs() -> None:
    line = Account(inbox="b", tenant="t", fetch_media=False, reply_with_token=False,
                   secrets=(LINE_SECRET.encode(), b"previous"))
    app = App(name="b", secrets=(X_SECRET.encode(), b"previous"))
    checks: list[tuple[str, bytes, Callable[[bytes], bool]]] = [
        ("LINE", line_body(1, 1),
         lambda raw: line.verifies(raw, line_signature(LINE_SECRET.encode(), raw).decode())),
        ("X", x_body(1, 1), lambda raw: app.verifies(raw, x_signature(X_SECRET.encode(), raw).decode())),
    ]
    for name, raw, check in checks:
        rounds = 20000
        began = time.perf_counter()
        for _ in range(rounds):
            check(raw)
        per = (time.perf_counter() - began) / rounds
        print(f"{name} signature check (two secrets, {len(raw)} B body, signing included): "
              f"{per * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bodies", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    signature_costs()
    for shape in SHAPES:
        bodies = args.bodies if shape[5] == 1 else max(args.bodies // 5, 1)
        asyncio.run(run(shape, bodies, args.concurrency))


if __name__ == "__main__":
    main()
