"""CPU per placement of ``PostgresStore.accept`` alone (no HTTP, no relay): the gateway's and the server's.

    .venv/bin/python bench/pg_accept.py [--tree DIR] [--messages 1500] [--customers 200] [--concurrency 64]

Places ``--messages`` one-message envelopes, ``--concurrency`` in flight, on a fresh database on the
local PostgreSQL (the tests' admin DSN, ``TICKETGATE_TEST_PG_DSN``). With ``--customers N`` the
messages come from N customers created beforehand (every placement one of a known customer);
with ``--customers 0`` each message is a new customer's first. Prints the CPU time of this process
and of all PostgreSQL processes (/proc) per placement, and placements per second.

``--tree`` imports the store from another source tree (e.g. a ``git archive`` of a base commit),
so two trees can be measured in alternated rounds by the same script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", default=str(_ROOT), help="the source tree whose store is measured")
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--customers", type=int, default=200, help="0: every message a new customer's")
    parser.add_argument("--concurrency", type=int, default=64)
    return parser.parse_args()


def postgres_cpu() -> float:
    """CPU seconds (user + system) of every process named postgres."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.index("(") + 1 : stat.rindex(")")].startswith("postgres"):
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> str:
    # Imported here, from the tree measured (bench/ first on sys.path would shadow dedupe/).
    from bench.store_accept import build_event
    from core.model import CanonicalMessage, Identity, RawEnvelope
    from core.settings import OutboxSettings, StoreSettings
    from dedupe.policy import PlacementPolicy
    from gateway.store.postgres import PostgresStore
    from tests.support.postgres import admin_dsn, fresh_database, require_postgres

    policy = PlacementPolicy(window=72 * 3600)
    require_postgres(admin_dsn())
    with fresh_database(admin_dsn(), prefix="tg_bench") as dsn, tempfile.TemporaryDirectory() as tmp:
        where = {"path": Path(tmp) / "unused.db", "blob_dir": Path(tmp) / "b", "min_free_disk_mb": 0}
        settings = StoreSettings.model_validate({"backend": "postgresql", "dsn": dsn, **where})
        store = PostgresStore(settings, OutboxSettings.model_validate({"max_backlog": 10**8}))
        await store.open()

        async def place(n: int, customer: int) -> None:
            now = datetime.now(UTC)
            envelope = RawEnvelope(
                channel="api", tenant="acme", inbox="app", body=f'{{"id": {n}}}'.encode(), received_at=now
            )
            message = CanonicalMessage(
                channel="api", tenant="acme", inbox="app", external_id=f"m{n}", received_at=now,
                identities=(Identity(kind="email", value=f"c{customer}@example.com", verified=True),),
                display_name="Ada", subject="An order", text=f"Question number {n} about my order, please.",
            )  # fmt: skip
            await store.accept(envelope, [message], policies=[policy], build_event=build_event)

        for customer in range(args.customers):
            await place(10**7 + customer, customer)
        gate = asyncio.Semaphore(args.concurrency)

        async def limited(n: int) -> None:
            async with gate:
                await place(n, n % args.customers if args.customers else 10**6 + n)

        client, server, wall = time.process_time(), postgres_cpu(), time.perf_counter()
        await asyncio.gather(*(limited(n) for n in range(args.messages)))
        client = time.process_time() - client
        server, wall = postgres_cpu() - server, time.perf_counter() - wall
        await store.close()
    n = args.messages
    per = f"client {1e6 * client / n:,.0f} us, server {1e6 * server / n:,.0f} us per placement"
    return f"{per}; {n / wall:,.0f} /s"


def main() -> None:
    args = _args()
    sys.path[0:1] = [args.tree]  # the tree measured, not bench/ (bench/dedupe.py would shadow dedupe)
    if str(_ROOT) not in sys.path:
        sys.path.append(str(_ROOT))
    print(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
