"""Disk cost per message, before and after retention.

    .venv/bin/python bench/retention.py [--messages 20000] [--concurrency 32] [--text-bytes 600]
                                        [--backend sqlite|postgresql] [--dsn DSN]

Runs the gateway app in-process (the real API channel, normalizer, pipeline and store; an
in-memory bus) and posts ``--messages`` API messages of about 0.8 KB (``--text-bytes`` of text plus
customer, subject and JSON), from one customer in ten writing ten times. Once every event is
published it prints the store's size per message and where the bytes are (SQLite: ``dbstat`` per
table and index; PostgreSQL: ``pg_total_relation_size``). Then it moves the clock 40 days on, runs
what the daemon's purge loop runs with ``[retention] raw_bodies = messages = events = "30d"``
(idempotency keys at their 8 days, recent texts past the duplicate window), gives the free pages
back (SQLite's incremental vacuum; PostgreSQL: VACUUM, as autovacuum would) and prints the size
per message again: what stays for good (customers, identities, thread tombstones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # bench/dedupe.py must not shadow the dedupe package

from core.settings import RetentionSettings, Settings  # noqa: E402
from gateway.app import Overrides, create_app, purge_kinds, purge_retention, sweep_recent_texts  # noqa: E402
from gateway.publisher import MemoryPublisher  # noqa: E402
from gateway.store import build_store  # noqa: E402
from gateway.store.base import Store  # noqa: E402

KEY = "bench-retention-key-0123456789"
DAY = 86400.0


def settings_for(tmp: Path, backend: str, dsn: str | None) -> Settings:
    store: dict[str, Any] = {
        "path": str(tmp / "tg.db"),
        "blob_dir": str(tmp / "blobs"),
        "min_free_disk_mb": 0,
    }
    if backend == "postgresql":
        store.update(backend="postgresql", dsn=dsn)
    return Settings.model_validate(
        {
            "server": {"host": "127.0.0.1", "port": 0, "normalizer_process": False},
            "log": {"level": "WARNING"},
            "store": store,
            "outbox": {"relay": "inline", "poll_interval": 0.05, "max_backlog": 10**7},
            "tenants": {"acme": {}},
            "inboxes": {"app": {"tenant": "acme"}},
            "channels": {"api": {"inboxes": {"app": {"keys": [KEY]}}, "rate_limit_per_minute": 10**8}},
        }
    )


def body(n: int, text_bytes: int) -> bytes:
    customer = n % max(1, ARGS.messages // 10)
    text = (f"Hello, this is message {n} about order {100000 + n}. " * 40)[:text_bytes]
    return orjson.dumps(
        {
            "external_id": f"m-{n}",
            "customer": {"email": f"customer{customer}@example.com", "name": f"Customer {customer}"},
            "subject": f"Order {100000 + customer}",
            "text": text,
        }
    )


async def ingest(settings: Settings, publisher: MemoryPublisher) -> float:
    app = create_app(settings, Overrides(publisher=publisher))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/api/v1/messages"
    started = time.monotonic()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(ARGS.messages):
        queue.put_nowait(n)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw_sizes: list[int] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            n = queue.get_nowait()
            data = body(n, ARGS.text_bytes)
            raw_sizes.append(len(data))
            async with session.post(url, data=data, headers=headers) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"message {n}: {resp.status} {await resp.text()}")

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(ARGS.concurrency)))
    async with publisher.changed:
        await publisher.changed.wait_for(
            lambda: len({m.message_id for m in publisher.published}) >= ARGS.messages
        )
    elapsed = time.monotonic() - started
    await runner.cleanup()
    average = sum(raw_sizes) / len(raw_sizes)
    print(f"ingested {ARGS.messages} API messages ({average:.0f} B raw each) in {elapsed:.1f} s")
    return elapsed


def sqlite_usage(tmp: Path) -> tuple[int, dict[str, int]]:
    db = tmp / "tg.db"
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        tables = dict(conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall())
        free = (
            conn.execute("PRAGMA freelist_count").fetchone()[0]
            * conn.execute("PRAGMA page_size").fetchone()[0]
        )
    finally:
        conn.close()
    tables["(free pages)"] = free
    total = sum(p.stat().st_size for p in tmp.glob("tg.db*"))
    return total, tables


def postgres_usage(dsn: str) -> tuple[int, dict[str, int]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n"
            " ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'r'"
        ).fetchall()
    sizes = {name: int(size) for name, size in rows}
    return sum(sizes.values()), sizes


def blob_bytes(tmp: Path) -> int:
    return sum(p.stat().st_size for p in (tmp / "blobs").rglob("*") if p.is_file())


def report(label: str, total: int, tables: dict[str, int], blobs: int) -> None:
    n = ARGS.messages
    print(f"\n{label}: database {total:,} B = {total / n:,.0f} B/message; blob files {blobs:,} B"
          f" = {blobs / n:,.0f} B/message")  # fmt: skip
    for name, size in sorted(tables.items(), key=lambda kv: -kv[1])[:14]:
        if size:
            print(f"  {name:34} {size:>12,} B  {size / n:>7,.0f} B/message")


async def purge(settings: Settings, shift: float) -> None:
    """What the daemon's purge loop does, ``shift`` seconds later."""
    moved: Callable[[], datetime] = lambda: datetime.now(UTC) + timedelta(seconds=shift)  # noqa: E731
    store: Store = build_store(settings)
    with contextlib.suppress(AttributeError):
        store._clock = moved  # type: ignore[attr-defined]  # a bench: the store's clock reads 40 days on
    await store.open()
    try:
        retention = RetentionSettings(
            raw_bodies=30 * DAY, messages=30 * DAY, events=30 * DAY, max_batches=10**6
        )
        now = moved()
        started = time.monotonic()
        await sweep_recent_texts(store, now - timedelta(seconds=settings.dedupe.duplicate_window))
        await purge_kinds(store, {"keys": settings.store.idempotency_retention}, now, retention)
        removed = await purge_retention(store, retention, now, settings.store.idempotency_retention)
        freed = await store.reclaim_space(2**31 - 1)
        print(f"\npurge: {removed:,} rows in {time.monotonic() - started:.1f} s "
              f"(batches of {retention.batch}); {freed:,} pages given back")  # fmt: skip
    finally:
        await store.close()
    if settings.store.backend == "postgresql":
        import psycopg

        assert ARGS.dsn is not None
        with psycopg.connect(ARGS.dsn, autocommit=True) as conn:
            conn.execute("VACUUM")


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="tg-retention-", dir=ARGS.dir) as name:
        tmp = Path(name)
        settings = settings_for(tmp, ARGS.backend, ARGS.dsn)
        await ingest(settings, MemoryPublisher())

        def usage() -> tuple[int, dict[str, int]]:
            return sqlite_usage(tmp) if ARGS.backend == "sqlite" else postgres_usage(str(ARGS.dsn))

        report("before retention", *usage(), blob_bytes(tmp))
        await purge(settings, 40 * DAY)
        report("after retention (40 days on, 30-day retention)", *usage(), blob_bytes(tmp))


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--text-bytes", type=int, default=600)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--dsn", default=os.environ.get("TICKETGATE_BENCH_PG_DSN"),
                        help="an EMPTY PostgreSQL database (--backend postgresql)")  # fmt: skip
    parser.add_argument("--dir", default=None, help="where the temporary store goes (default: system temp)")
    args = parser.parse_args()
    if args.backend == "postgresql" and not args.dsn:
        parser.error("--backend postgresql needs --dsn (an empty database)")
    return args


ARGS = parse() if __name__ == "__main__" else argparse.Namespace(messages=0, text_bytes=600)

if __name__ == "__main__":
    asyncio.run(main())
