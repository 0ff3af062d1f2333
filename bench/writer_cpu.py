"""CPU of the SQLite store's writer thread per placement: ``SQLiteStore.accept`` alone, no HTTP.

    .venv/bin/python bench/writer_cpu.py [--customers 5000] [--messages 10000]

API-shaped messages (one email identity, 0.8 KB body) from 64 tasks at once, as the gateway's
handlers send them. The first pass places one message per customer (new customers), the second
``--messages`` more on the same customers (known customers); each prints the writer thread's CPU
(user + system, from /proc) per placement. Run two trees alternately to compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson

# Run as a script, bench/ comes first on sys.path and bench/dedupe.py would shadow the dedupe package.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.measure import task_cpu  # noqa: E402
from bench.store_accept import build_event  # noqa: E402
from core.model import CanonicalMessage, Identity, RawEnvelope  # noqa: E402
from core.settings import OutboxSettings, StoreSettings  # noqa: E402
from dedupe.policy import PlacementPolicy  # noqa: E402
from gateway.store.sqlite import SQLiteStore  # noqa: E402

POLICY = PlacementPolicy(window=3600.0)


def thread_cpu(tid: int) -> float:
    return task_cpu(Path(f"/proc/self/task/{tid}/stat"))


def request(n: int, customers: int) -> tuple[RawEnvelope, CanonicalMessage]:
    email, text = f"bench{n % customers}@example.com", f"Order #{100000 + n} has not arrived yet."
    external_id = f"bench-{uuid.uuid4().hex}"
    body = orjson.dumps({"customer": {"email": email}, "text": text, "external_id": external_id})
    now = datetime.now(UTC)
    envelope = RawEnvelope(
        channel="api", tenant="demo", inbox="demo", body=body + b" " * (800 - len(body)), received_at=now,
        content_type="application/json", headers={"content-type": "application/json"},
        signature_verified=True, retry=0, remote="127.0.0.1", meta={},
    )  # fmt: skip
    message = CanonicalMessage(
        channel="api", tenant="demo", inbox="demo", external_id=external_id, received_at=now,
        identities=(Identity(kind="email", value=email),), display_name="Bench",
        subject="Where is my parcel?", text=text, extra={"app": "bench"},
    )  # fmt: skip
    return envelope, message


async def main(customers: int, messages: int) -> None:
    directory = Path(tempfile.mkdtemp())
    settings = StoreSettings.model_validate(
        {"path": directory / "tg.db", "blob_dir": directory / "blobs", "min_free_disk_mb": 0}
    )
    store = SQLiteStore(settings, OutboxSettings.model_validate({"max_backlog": 10**9}))
    await store.open()
    (writer,) = [t.native_id for t in threading.enumerate() if t.name == "tg-store-writer"]
    assert writer is not None
    gate = asyncio.Semaphore(64)

    async def one(n: int) -> None:
        async with gate:
            envelope, message = request(n, customers)
            await store.accept(envelope, [message], policies=[POLICY], build_event=build_event)

    try:
        passes = (("new customers", 0, customers), ("known customers", customers, messages))
        for label, first, count in passes:
            cpu, started = thread_cpu(writer), time.perf_counter()
            await asyncio.gather(*(one(n) for n in range(first, first + count)))
            per = 1e6 * (thread_cpu(writer) - cpu) / count
            rate = count / (time.perf_counter() - started)
            print(f"{label:16} writer {per:5.0f} us per placement  ({count} at {rate:,.0f}/s)")
    finally:
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=10000)
    args = parser.parse_args()
    asyncio.run(main(args.customers, args.messages))
