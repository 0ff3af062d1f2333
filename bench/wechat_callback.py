"""p99 answer time of encrypted WeChat callbacks under load, against WeChat's 5 s deadline.

The real gateway runs as its own process (SQLite store, outbox relay, RabbitMQ); a separate load
process posts safe-mode callbacks, built beforehand with wechatpy's crypto, at a fixed concurrency.

    .venv/bin/python -m bench.wechat_callback --concurrency 32 --count 5000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.wechat_send import build_callback, text_xml
from tests.e2e.harness import GatewayProcess, free_port, gateway_config

DEADLINE = 5.0
ACCOUNT = """
[inboxes.wechat-demo]
tenant = "demo"

[channels.wechat.accounts.demo]
inbox = "wechat-demo"
app_id = "wx0123456789abcdef"
token = "devtoken"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
"""


async def _load(url: str, count: int, concurrency: int) -> tuple[list[float], dict[int, int], float]:
    requests = [
        build_callback(text_xml(f"bench message {i}", openid=f"oBench{i % 500}", msg_id=9_000_000 + i))
        for i in range(count)
    ]
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                query, body = queue.get_nowait()
                started = time.perf_counter()
                async with session.post(f"{url}/wechat/demo?{query}", data=body) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, statuses, elapsed


def _load_process(url: str, count: int, concurrency: int, out: multiprocessing.Queue[object]) -> None:
    out.put(asyncio.run(_load(url, count, concurrency)))


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        port = free_port()
        config = gateway_config(
            tmp_path,
            port=port,
            amqp_url=args.amqp_url,
            exchange="bench-wechat",
            queue="bench-wechat-desk",
            extra=ACCOUNT,
        )
        config.write_text(config.read_text().replace('level = "INFO"', 'level = "WARNING"'))
        gateway = GatewayProcess(config=config, port=port, log_path=tmp_path / "gateway.log")
        await gateway.start()
        try:
            print(f"gateway pid {gateway.proc.pid if gateway.proc else '?'}: SQLite store + relay + RabbitMQ")
            header = ("conc", "n", "ok", "req/s", "p50 ms", "p99 ms", "max ms")
            print(" ".join(f"{h:>8}" for h in header), " deadline")
            for concurrency in args.concurrency:
                ctx = multiprocessing.get_context("spawn")
                out: multiprocessing.Queue[object] = ctx.Queue()
                load = ctx.Process(target=_load_process, args=(gateway.url, args.count, concurrency, out))
                load.start()
                latencies, statuses, elapsed = await asyncio.to_thread(out.get)  # type: ignore[misc]
                load.join()
                p99 = _pct(latencies, 99)
                cells = (
                    f"{concurrency:>8}",
                    f"{len(latencies):>8}",
                    f"{statuses.get(200, 0):>8}",
                    f"{len(latencies) / elapsed:>8.0f}",
                    f"{statistics.median(latencies) * 1000:>8.1f}",
                    f"{p99 * 1000:>8.1f}",
                    f"{max(latencies) * 1000:>8.1f}",
                )
                row = " ".join(cells)
                print(row, f" p99 = {p99 / DEADLINE * 100:.2f}% of {DEADLINE:g} s; statuses {statuses}")
        finally:
            await gateway.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
