"""Memory over a long run: the gateway's RSS while N API messages go through one instance.

Runs the real gateway (as bench/ingest.py does: SQLite store, outbox relay, RabbitMQ with confirms)
and drives ``POST /api/v1/messages`` from a load process in slices of ``--slice`` seconds, with a
consumer draining the desk queue. After each slice it samples the resident set (VmRSS) of the
gateway process and of its children (the relay process), and prints one line per sample. At the
end it compares the first sample taken after ``--warmup`` messages with the last one: a gateway
whose memory is flat stays within a few percent however many messages went through.

Usage: .venv/bin/python bench/rss.py [--messages 1000000] [--customers 5000] [--store sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiormq
import aiormq.abc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.ingest import loadgen  # noqa: E402
from bench.measure import children  # noqa: E402
from tests.e2e.harness import GatewayProcess, free_port, gateway_config  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample(pid: int) -> tuple[float, float]:
    """(gateway process, its children) resident set in MB."""
    kids = 0.0
    for child in children(pid):
        try:
            kids += rss_mb(child)
        except OSError:
            continue  # a child that ended meanwhile
    return rss_mb(pid), kids


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tg-rss-", dir=args.dir))
    exchange, queue = f"bench.{uuid.uuid4().hex[:8]}", f"bench.desk.{uuid.uuid4().hex[:8]}"
    port = free_port()
    config = gateway_config(tmp, port=port, amqp_url=args.url, exchange=exchange, queue=queue)
    config.write_text(config.read_text().replace('level = "INFO"', 'level = "WARNING"'))
    gateway = GatewayProcess(config=config, port=port, log_path=tmp / "gateway.log")
    await gateway.start()
    assert gateway.proc is not None
    pid = gateway.proc.pid

    connection = await aiormq.connect(args.url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=2000)
    delivered = [0]

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        delivered[0] += 1

    await channel.basic_consume(queue, on_message, no_ack=True)
    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    sent = 0
    baseline: tuple[int, float, float] | None = None
    last: tuple[int, float, float] | None = None
    started = time.perf_counter()
    print(f"gateway pid {pid}; {args.messages:,} messages in {args.slice:.0f} s slices")
    print(f"{'messages':>10} {'elapsed s':>9} {'gateway MB':>10} {'children MB':>11} {'on queue':>10}")
    try:
        while sent < args.messages:
            result = await loop.run_in_executor(
                pool, loadgen, "closed", port, args.concurrency, args.slice, 0.0, args.customers
            )
            sent += result["statuses"].get(202, 0)
            gw, kids = sample(pid)
            last = (sent, gw, kids)
            if baseline is None and sent >= args.warmup:
                baseline = last
            elapsed = time.perf_counter() - started
            print(f"{sent:>10,} {elapsed:>9.0f} {gw:>10.1f} {kids:>11.1f} {delivered[0]:>10,}")
    finally:
        pool.shutdown()
        await connection.close()
        await gateway.stop()
    if baseline is not None and last is not None:
        print(
            f"after {baseline[0]:,} messages: gateway {baseline[1]:.1f} MB, children {baseline[2]:.1f} MB;"
            f" after {last[0]:,}: gateway {last[1]:.1f} MB, children {last[2]:.1f} MB"
        )
        print(
            f"ratio last / first: gateway {last[1] / baseline[1]:.3f},"
            f" gateway + children {(last[1] + last[2]) / (baseline[1] + baseline[2]):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=20_000, help="messages before the first sample")
    parser.add_argument("--slice", type=float, default=20.0, help="seconds of load between samples")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--customers",
        type=int,
        default=5000,
        help="distinct customers; more than the SQLite writer keeps in memory (20,000) exercises its bound",
    )
    parser.add_argument("--dir", default=None, help="where the gateway's data goes (default: a temp dir)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
