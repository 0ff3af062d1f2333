"""Throughput and latency of ``SQLiteStore.accept`` for 1 KB messages at several concurrencies.

    .venv/bin/python bench/store_accept.py [--messages 20000] [--concurrency 1 64 256] [--dir PATH]

Each run uses a fresh database (WAL, synchronous=FULL) in a temporary directory under ``--dir``
(default: the system temp dir; put it on the disk you want to measure). Commits per second show
group commit: at concurrency 1 every accept is its own fsync, at 64+ one fsync covers many.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

# Run as a script, bench/ comes first on sys.path and bench/dedupe.py would shadow the dedupe package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from core import events  # noqa: E402
from core.events import CustomerView, Event  # noqa: E402
from core.model import CanonicalMessage, Identity, Placement, RawEnvelope  # noqa: E402
from core.settings import OutboxSettings, StoreSettings  # noqa: E402
from dedupe.policy import PlacementPolicy  # noqa: E402
from gateway.store.sqlite import SQLiteStore  # noqa: E402

POLICY = PlacementPolicy(window=72 * 3600)
CUSTOMERS = 2000


def build_event(
    message: CanonicalMessage,
    placement: Placement,
    customer: CustomerView,
    subject: str | None,
    ref: str | None,
) -> Event:
    return events.message_received(
        message,
        placement=placement,
        customer=customer,
        thread_subject=subject,
        raw_ref=ref,
        signature_verified=True,
        retry=0,
        public_url=None,
        occurred_at=message.received_at,
    )


def make(n: int) -> tuple[RawEnvelope, CanonicalMessage]:
    now = datetime.now(UTC)
    text = (f"message {n} " * 100)[:1000]
    body = f'{{"id": "{n}", "text": "{text}"}}'.encode()[:1024].ljust(1024)
    envelope = RawEnvelope(channel="api", tenant="acme", inbox="app", body=body, received_at=now)
    message = CanonicalMessage(
        channel="api",
        tenant="acme",
        inbox="app",
        external_id=f"bench-{n}",
        received_at=now,
        identities=(Identity(kind="email", value=f"customer{n % CUSTOMERS}@example.com", verified=True),),
        subject=f"question {n % CUSTOMERS}",
        text=text,
    )
    return envelope, message


async def run(root: Path, messages: int, concurrency: int) -> None:
    settings = StoreSettings.model_validate({"path": root / "tg.db", "blob_dir": root / "blobs"})
    store = SQLiteStore(settings, OutboxSettings.model_validate({"max_backlog": max(messages * 2, 1)}))
    await store.open()
    work = [make(n) for n in range(messages)]
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < messages:
            envelope, message = work[next_index]
            next_index += 1
            started = time.perf_counter()
            await store.accept(envelope, [message], policies=[POLICY], build_event=build_event)
            latencies.append(time.perf_counter() - started)

    commits_before = store.stats.commits
    cpu_started = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    commits = store.stats.commits - commits_before
    await store.close()

    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"concurrency {concurrency:>4}: {messages / elapsed:8.0f} accepts/s   "
        f"p50 {cuts[49] * 1000:7.2f} ms   p99 {cuts[98] * 1000:7.2f} ms   "
        f"{commits / elapsed:7.0f} commits/s   {messages / commits:6.1f} accepts/commit   "
        f"{cpu / messages * 1e6:5.0f} us CPU/accept   "
        f"(largest batch {store.stats.largest_batch}, {elapsed:.1f} s)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary databases go")
    args = parser.parse_args()
    for concurrency in args.concurrency:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="tg-bench-") as tmp:
            await run(Path(tmp), args.messages, concurrency)


if __name__ == "__main__":
    asyncio.run(main())
