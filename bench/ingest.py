"""End-to-end ingest benchmark: API requests in, events confirmed on a RabbitMQ queue out.

Runs the real gateway (``ticketgate run``: SQLite store with group commit, outbox relay, AMQP
publisher with confirms) as a child process, drives ``POST /api/v1/messages`` from a separate load
process over keep-alive connections, and counts the events a consumer receives on a queue.

Prints, from one run (the machine is shared and noisy, so compare the ratios):
- closed loop at fixed concurrency: sustained events/s confirmed on the queue, ack latency p50/p99;
- open loop at a fixed offered rate (default 1,000 req/s): ack latency p50/p99 measured from each
  request's scheduled send time, so a stall is not hidden (no coordinated omission);
- the gateway's peak RSS;
- a bare aio-pika publisher (windowed confirms, no gateway) on the same broker, and the ratio.

With ``--store postgresql`` the gateway runs on a fresh database on the local PostgreSQL (the admin
DSN the tests use, ``TICKETGATE_TEST_PG_DSN``, default ``postgresql://root@127.0.0.1:5432/postgres``;
dropped afterwards), and PostgreSQL's own CPU per event is read from /proc of its processes.

Messages come from ``--customers`` customers in turn (default 5,000: in a run of a few seconds most
messages are a customer's first); a few hundred makes nearly every placement one of a known customer.

Usage: .venv/bin/python bench/ingest.py [--store sqlite|postgresql] [--concurrency 64] [--seconds 10]
       [--rate 1000] [--customers 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiormq
import aiormq.abc
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import QueueCounter, child_name, children, task_cpu  # noqa: E402
from bench.publish_baseline import bare_publish_rate  # noqa: E402
from tests.e2e.harness import GatewayProcess, free_port, gateway_config  # noqa: E402

API_KEY = "e2e-test-key-0001"  # the harness config's key


# --- load generator (runs in its own process) -------------------------------------------------


def _request(port: int, n: int, customers: int) -> bytes:
    body = orjson.dumps(
        {
            "customer": {"email": f"bench{n % customers}@example.com", "name": "Bench Customer"},
            "subject": "Where is my parcel?",
            "text": f"Order #{100000 + n} has not arrived yet; tracking SF1234567890{n % 10}.",
            "external_id": f"bench-{uuid.uuid4().hex}",
        }
    )
    head = (
        f"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _closed_loop(port: int, concurrency: int, seconds: float, customers: int) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    # Customers in turn from a random one, so that short runs (bench/rss.py's slices) of a large
    # population do not all write as its first few.
    counter = iter(range(random.randrange(customers), 10**9))

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.perf_counter() < deadline:
                request = _request(port, next(counter), customers)
                started = time.perf_counter()
                status = await _roundtrip(reader, writer, request)
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses, "elapsed": time.perf_counter() - started}


async def _open_loop(
    port: int, rate: float, seconds: float, connections: int, customers: int
) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    total = int(rate * seconds)
    start = time.perf_counter() + 0.1

    async def one(i: int) -> None:
        scheduled = start + i / rate
        request = _request(port, 10**8 + i, customers)
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        reader, writer = await pool.get()
        try:
            status = await _roundtrip(reader, writer, request)
        finally:
            pool.put_nowait((reader, writer))
        latencies.append(time.perf_counter() - scheduled)
        statuses[status] = statuses.get(status, 0) + 1

    await asyncio.gather(*(one(i) for i in range(total)))
    while not pool.empty():
        pool.get_nowait()[1].close()
    return {"latencies": latencies, "statuses": statuses, "elapsed": seconds}


def loadgen(
    mode: str, port: int, concurrency: int, seconds: float, rate: float, customers: int = 5000
) -> dict[str, Any]:
    """Entry point of the load process; messages come from ``customers`` customers in turn."""
    started = time.process_time()
    if mode == "closed":
        result = asyncio.run(_closed_loop(port, concurrency, seconds, customers))
    else:
        result = asyncio.run(_open_loop(port, rate, seconds, concurrency, customers))
    result["cpu"] = time.process_time() - started
    return result


# --- measurement ------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def _pids_named(*names: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    pids.append(int(entry.name))
    return pids


def _postgres_cpu(database: str | None) -> float:
    """CPU of the PostgreSQL server's processes: its backends serving ``database`` (their command
    line names it) plus the shared ones (WAL writer, checkpointer, background writer). Other
    databases' backends (other benchmarks, tests) are left out; a backend that ended meanwhile is
    not counted (the gateway's pool keeps its connections)."""
    if database is None:
        return 0.0
    total = 0.0
    shared = (b"walwriter", b"checkpointer", b"background writer", b"wal writer")
    for pid in _pids_named("postgres", "postmaster"):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if database.encode() in cmdline or any(word in cmdline for word in shared):
                total += task_cpu(Path(f"/proc/{pid}/stat"))
    return total


def cpu_seconds(pid: int, database: str | None = None) -> dict[str, float]:
    """CPU time (user + system) from /proc: the gateway's event loop thread, its other threads, its
    child processes by name (the outbox relay), the broker (when readable) and PostgreSQL serving
    ``database``."""
    result: dict[str, float] = {"event loop": 0.0, "store writer and other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = "event loop" if task.name == str(pid) else "store writer and other threads"
        result[name] += task_cpu(task / "stat")
    for child in children(pid):
        with contextlib.suppress(OSError):
            name = child_name(child)
            result[name] = result.get(name, 0.0) + task_cpu(Path(f"/proc/{child}/stat"))
    for broker in _pids_named("beam.smp"):
        with contextlib.suppress(OSError):
            result["broker"] = result.get("broker", 0.0) + task_cpu(Path(f"/proc/{broker}/stat"))
    if database is not None:
        result["postgresql"] = _postgres_cpu(database)
    return result


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run(args: argparse.Namespace) -> None:
    if args.store == "postgresql":
        from tests.support.postgres import admin_dsn, fresh_database, require_postgres

        require_postgres(admin_dsn())
        with fresh_database(admin_dsn(), prefix="tg_bench") as dsn:
            await _run(args, dsn)
    else:
        await _run(args, None)


async def _run(args: argparse.Namespace, dsn: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tg-bench-", dir=args.dir))
    exchange, queue = f"bench.{uuid.uuid4().hex[:8]}", f"bench.desk.{uuid.uuid4().hex[:8]}"
    port = free_port()
    store = None
    database = None
    if dsn is not None:
        from psycopg.conninfo import conninfo_to_dict

        database = str(conninfo_to_dict(dsn)["dbname"])
        store = f'[store]\nbackend = "postgresql"\ndsn = "{dsn}"\nblob_dir = "{tmp / "data" / "blobs"}"\n'
    config = gateway_config(tmp, port=port, amqp_url=args.url, exchange=exchange, queue=queue, store=store)
    text = config.read_text().replace('level = "INFO"', 'level = "WARNING"')
    config.write_text(text)
    gateway = GatewayProcess(config=config, port=port, log_path=tmp / "gateway.log")
    await gateway.start()
    assert gateway.proc is not None

    # The counting consumer talks aiormq directly: aio-pika's message objects cost ~120 us of CPU
    # per event on this 2-core machine, taken from the gateway under test.
    connection = await aiormq.connect(args.url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=2000)
    counter = QueueCounter()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        counter.seen(message.header.properties.message_id)

    await channel.basic_consume(queue, on_message, no_ack=True)

    loop = asyncio.get_running_loop()
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        # Warm-up: imports, JIT-free but caches, connections, SQLite pages.
        await loop.run_in_executor(pool, loadgen, "closed", port, args.concurrency, 1.0, 0.0, args.customers)
        await counter.wait_for(1, within=30)

        before = len(counter.ids)
        cpu_before = cpu_seconds(gateway.proc.pid, database)
        own_before = time.process_time()
        t0 = time.perf_counter()
        closed = await loop.run_in_executor(
            pool, loadgen, "closed", port, args.concurrency, args.seconds, 0.0, args.customers
        )
        acked = closed["statuses"].get(202, 0)
        await counter.wait_for(before + acked, within=120)
        cpu_after = cpu_seconds(gateway.proc.pid, database)
        cpu_after["consumer (this process)"] = time.process_time() - own_before
        cpu_after["load generator"] = closed["cpu"]
        events = len(counter.ids) - before
        e2e_rate = events / (counter.last_at - t0)
        ack_rate = acked / closed["elapsed"]

        before = len(counter.ids)
        opened = await loop.run_in_executor(
            pool, loadgen, "open", port, 256, args.seconds, args.rate, args.customers
        )
        await counter.wait_for(before + opened["statuses"].get(202, 0), within=120)
        rss = peak_rss_mb(gateway.proc.pid)
    finally:
        pool.shutdown()
        await connection.close()
        await gateway.stop()

    bare = float("nan") if args.skip_bare else await bare_publish_rate(args.url, args.bare_n, args.window)

    lat_closed = closed["latencies"]
    lat_open = opened["latencies"]
    stored = "SQLite group commit" if dsn is None else "PostgreSQL"
    print(f"gateway: API -> {stored} -> outbox relay -> RabbitMQ (confirms), pid {gateway.proc.pid}")
    print(f"closed loop, {args.concurrency} connections, {args.seconds:.0f} s:")
    print(f"  acked            {acked} requests ({ack_rate:,.0f}/s), statuses {closed['statuses']}")
    print(f"  on the queue     {events} events, {e2e_rate:,.0f} events/s end to end")
    p50, p99 = percentile(lat_closed, 50) * 1000, percentile(lat_closed, 99) * 1000
    print(f"  ack latency      p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"open loop, {args.rate:,.0f} req/s offered for {args.seconds:.0f} s:")
    print(f"  statuses         {opened['statuses']}")
    print(
        f"  ack latency      p50 {percentile(lat_open, 50) * 1000:.1f} ms, "
        f"p99 {percentile(lat_open, 99) * 1000:.1f} ms, max {max(lat_open) * 1000:.1f} ms"
    )
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    gateway_names = (
        "event loop",
        "store writer and other threads",
        "relay process",
        "normalizer process",
        "other children",
    )
    gateway_cpu = sum(cpu.get(name, 0.0) for name in gateway_names)
    budget = (os.cpu_count() or 1) * 1e6 / max(e2e_rate, 1)
    print(f"CPU per event in the closed loop (us; the machine has {budget:.0f} us per event at this rate):")
    print(f"  gateway          {gateway_cpu / max(events, 1) * 1e6:.0f} us in all")
    for name in (*gateway_names, "postgresql", "broker", "consumer (this process)", "load generator"):
        if name in cpu:
            print(f"    {name:<31}{cpu[name] / max(events, 1) * 1e6:6.0f}")
    print(f"  all measured     {sum(cpu.values()) / max(events, 1) * 1e6:.0f} us")
    print(f"gateway peak RSS   {rss:.0f} MB")
    print(f"bare aio-pika      {bare:,.0f} msg/s ({args.bare_n} x 1 KB persistent, window {args.window})")
    print(f"ratio              gateway end to end / bare publisher = {e2e_rate / bare:.2f}")
    print(
        f"(mean closed-loop latency {statistics.fmean(lat_closed) * 1000:.1f} ms; cpu count {os.cpu_count()})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--bare-n", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--customers", type=int, default=5000, help="messages come from this many customers in turn"
    )
    parser.add_argument("--skip-bare", action="store_true", help="leave out the bare aio-pika baseline")
    parser.add_argument("--dir", default=None, help="where the gateway's data goes (default: a temp dir)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
