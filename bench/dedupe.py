"""Cost of placement (claim + identity + thread assignment) per message with N messages already stored.

    .venv/bin/python -m bench.dedupe                         # SQLite at N = 10k, 100k, 1M
    .venv/bin/python -m bench.dedupe --sizes 10000 100000
    .venv/bin/python -m bench.dedupe --backend postgresql --dsn postgresql://.../bench   # both, side by side

The store is pre-filled fast (executemany in one transaction, not through ``accept``) with N messages of
N/4 customers (an email and a phone each, one thread each, rfc822 ids, idempotency keys). Then a mixed
workload is timed inside ``Store.transact`` (so the figure is the engine's SQL, not the fsync): a quarter
new customers, a half follow-ups of known customers (window join), a quarter email replies threaded by
In-Reply-To. For SQLite every statement the engine ran is checked with EXPLAIN QUERY PLAN: each must
search an index (a full table scan fails the run); for PostgreSQL with EXPLAIN: no statement may
sequentially scan a table that grows with N. PostgreSQL is filled with COPY; each engine statement
there is one round trip to the server, which is most of its cost per message.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from core.events import Event
from core.model import CanonicalMessage, Identity
from core.settings import OutboxSettings, StoreSettings
from dedupe.engine import place
from dedupe.policy import PlacementPolicy
from dedupe.tx import Tx
from gateway.store.base import Store
from gateway.store.sqlite import SQLiteStore, SQLiteTx

T0 = datetime(2025, 3, 1, tzinfo=UTC)
POLICY = PlacementPolicy(window=72 * 3600, ticket_ref_pattern=r"\[#TG-(?P<number>\d+)\]")
TENANT, INBOX = "acme", "support"
BATCH = 250  # placements per transaction while timing


def _cid(n: int) -> str:
    return f"cus_{n:032x}"


def _tid(n: int) -> str:
    return f"thr_{n:032x}"


def _rows(n_messages: int, stamp: Callable[[datetime], Any]) -> dict[str, list[tuple[Any, ...]]]:
    customers = max(1, n_messages // 4)
    now = stamp(T0)
    rows: dict[str, list[tuple[Any, ...]]] = {
        "customers": [],
        "identities": [],
        "threads": [],
        "messages": [],
        "idempotency_keys": [],
    }
    for c in range(customers):
        rows["customers"].append((_cid(c), TENANT, f"Customer {c}", now))
        rows["identities"].append((TENANT, "email", f"c{c}@example.com", _cid(c), True, now))
        rows["identities"].append((TENANT, "phone", f"+4179{c:07d}", _cid(c), False, now))
        rows["threads"].append((_tid(c), TENANT, INBOX, _cid(c), f"subject {c}", "open", c + 1, now, 5, now))
    for m in range(n_messages):
        c = m % customers
        message_id = f"msg-{m}"
        rows["messages"].append(
            (message_id, _tid(c), _cid(c), m // customers + 1, "email", f"m{m}@ex", f"m{m}@ex", now)
        )
        rows["idempotency_keys"].append(
            (
                f"{TENANT}/email/{INBOX}/id:m{m}@ex",
                message_id,
                _tid(c),
                _cid(c),
                m // customers + 1,
                m < customers,
                now,
            )
        )
    return rows


_INSERTS = {
    "customers": "INSERT INTO customers (id, tenant, display_name, created_at) VALUES ({})",
    "identities": "INSERT INTO identities (tenant, kind, value, customer_id, verified, created_at)"
    " VALUES ({})",
    "threads": "INSERT INTO threads (id, tenant, inbox, customer_id, subject, status, number, last_activity,"
    " next_sequence, created_at) VALUES ({})",
    "messages": "INSERT INTO messages (message_id, thread_id, customer_id, sequence, channel, external_id,"
    " rfc822_message_id, received_at) VALUES ({})",
    "idempotency_keys": "INSERT INTO idempotency_keys (key, message_id, thread_id, customer_id, sequence,"
    " is_new_thread, created_at) VALUES ({})",
}


def prefill_sqlite(path: Path, n_messages: int) -> None:
    from gateway.store.sqlite import _us

    rows = _rows(n_messages, _us)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    for table, values in rows.items():
        conn.executemany(_INSERTS[table].format(", ".join("?" * len(values[0]))), values)
    conn.execute(
        "INSERT INTO tenant_counters (tenant, next_thread_number) VALUES (?, ?)",
        (TENANT, len(rows["threads"]) + 1),
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()


def prefill_postgres(dsn: str, n_messages: int) -> None:
    """COPY the rows in (executemany would take minutes at 1M), then ANALYZE like a live database."""
    import psycopg

    rows = _rows(n_messages, lambda moment: moment)
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for table, values in rows.items():
            columns = _INSERTS[table].split("(", 1)[1].split(")", 1)[0]
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in values:
                    copy.write_row(row)
        cur.execute(
            "INSERT INTO tenant_counters (tenant, next_thread_number) VALUES (%s, %s)",
            (TENANT, len(rows["threads"]) + 1),
        )
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def workload(n_messages: int, count: int, seed: int = 7) -> list[CanonicalMessage]:
    rng = random.Random(seed)
    customers = max(1, n_messages // 4)
    out: list[CanonicalMessage] = []
    for i in range(count):
        roll = rng.random()
        c = rng.randrange(customers)
        common: dict[str, Any] = {
            "tenant": TENANT,
            "inbox": INBOX,
            "received_at": T0 + timedelta(minutes=1),
            "subject": "Re: order",
            "text": f"Message {i} about order {rng.randrange(10**6)}",
        }
        if roll < 0.25:
            ids: tuple[Identity, ...] = (
                Identity(kind="email", value=f"new{i}@example.org", verified=True),
                Identity(kind="phone", value=f"+4178{i:07d}"),
            )
            out.append(CanonicalMessage(channel="form", external_id=f"f{i}", identities=ids, **common))
        elif roll < 0.75:
            ids = (Identity(kind="phone", value=f"+4179{c:07d}"),)
            out.append(CanonicalMessage(channel="api", external_id=f"a{i}", identities=ids, **common))
        else:
            m = rng.randrange(n_messages)
            ids = (Identity(kind="email", value=f"c{m % customers}@example.com", verified=True),)
            out.append(
                CanonicalMessage(
                    channel="email", external_id=f"r{i}@ex", identities=ids, in_reply_to=f"m{m}@ex", **common
                )
            )
    return out


class _Recorder:
    """A connection proxy that remembers every statement the engine ran (for EXPLAIN QUERY PLAN)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.statements: dict[str, Sequence[Any]] = {}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        self.statements.setdefault(sql, params)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Any) -> sqlite3.Cursor:
        params = list(params)
        if params:
            self.statements.setdefault(sql, params[0])
        return self._conn.executemany(sql, params)


def explain_sqlite(path: Path, messages: Sequence[CanonicalMessage]) -> list[str]:
    """Run placements on a throwaway transaction and return the statements whose plan scans a table."""
    conn = sqlite3.connect(path, isolation_level=None)
    recorder = _Recorder(conn)
    conn.execute("BEGIN")
    tx = SQLiteTx(recorder)  # type: ignore[arg-type]
    for message in messages:
        place(tx, message, POLICY, now=T0 + timedelta(minutes=1))
    bad: list[str] = []
    for sql, params in recorder.statements.items():
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        if any(step.startswith("SCAN") and "USING" not in step for step in plan):
            bad.append(f"{sql}\n    -> {plan}")
    conn.execute("ROLLBACK")
    conn.close()
    return bad


class _PgRecorder:
    """A psycopg connection proxy that remembers every statement the engine ran (for EXPLAIN)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.statements: dict[str, Any] = {}

    def execute(self, sql: str, params: Any = None) -> Any:
        self.statements.setdefault(sql, params)
        return self._conn.execute(sql, params)

    def cursor(self) -> Any:
        return self._conn.cursor()


# A sequential scan is the right plan for a table this small (counters, the still-empty recent texts).
_SMALL_TABLE_ROWS = 1000


def explain_postgres(dsn: str, messages: Sequence[CanonicalMessage]) -> list[str]:
    """Run placements in a rolled-back transaction; the statements whose plan scans a large table."""
    import psycopg

    from gateway.store.postgres import PostgresTx

    bad: list[str] = []
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        recorder = _PgRecorder(conn)
        tx = PostgresTx(recorder)  # type: ignore[arg-type]
        for message in messages:
            place(tx, message, POLICY, now=T0 + timedelta(minutes=1))
        rows: dict[str, float] = dict(
            conn.execute("SELECT relname, reltuples FROM pg_class WHERE relkind = 'r'").fetchall()
        )
        small = {table for table, count in rows.items() if count < _SMALL_TABLE_ROWS}
        for sql, params in recorder.statements.items():
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")):
                continue
            (plan,) = conn.execute(f"EXPLAIN (FORMAT JSON) {sql}", params).fetchone() or (None,)
            scans = sorted(set(_seq_scans(plan))) if plan is not None else []
            if [table for table in scans if table not in small]:
                bad.append(f"{sql}\n    -> Seq Scan on {scans}")
        conn.rollback()
    return bad


def _seq_scans(node: Any) -> list[str]:
    if isinstance(node, list):
        return [t for item in node for t in _seq_scans(item)]
    if not isinstance(node, dict):
        return []
    found = [str(node["Relation Name"])] if node.get("Node Type") == "Seq Scan" else []
    for key in ("Plan", "Plans"):
        if key in node:
            found += _seq_scans(node[key])
    return found


async def measure(store: Store, messages: Sequence[CanonicalMessage]) -> list[float]:
    """Per-message placement time (seconds), batches of BATCH per transaction, commit excluded."""
    timings: list[float] = []
    for start in range(0, len(messages), BATCH):
        batch = messages[start : start + BATCH]

        def work(
            tx: Tx, now: datetime, batch: Sequence[CanonicalMessage] = batch
        ) -> tuple[None, list[Event]]:
            for message in batch:
                began = time.perf_counter()
                place(tx, message, POLICY, now=now)
                timings.append(time.perf_counter() - began)
            return None, []

        await store.transact(work)
    return timings


async def run_size(
    backend: str, n: int, count: int, dsn: str | None, tmp: Path
) -> tuple[float, float, float]:
    outbox = OutboxSettings()
    if backend == "sqlite":
        settings = StoreSettings.model_validate(
            {"path": tmp / f"bench-{n}.db", "blob_dir": tmp / "blobs", "min_free_disk_mb": 0}
        )
        store: Store = SQLiteStore(settings, outbox)
        await store.open()  # migrate
        await store.close()
        began = time.perf_counter()
        prefill_sqlite(settings.path, n)
        fill = time.perf_counter() - began
        bad = explain_sqlite(settings.path, workload(n, 200, seed=1))
        if bad:
            raise SystemExit("statements without an index:\n" + "\n".join(bad))
        store = SQLiteStore(settings, outbox)
    else:
        from gateway.store.postgres import PostgresStore  # the other backend, when present

        settings = StoreSettings.model_validate(
            {"backend": "postgresql", "dsn": dsn, "blob_dir": tmp / "blobs", "min_free_disk_mb": 0}
        )
        store = PostgresStore(settings, outbox)
        await store.open()
        await store.close()
        began = time.perf_counter()
        prefill_postgres(str(dsn), n)
        fill = time.perf_counter() - began
        bad = explain_postgres(str(dsn), workload(n, 200, seed=1))
        if bad:
            raise SystemExit("PostgreSQL statements scanning a table:\n" + "\n".join(bad))
        store = PostgresStore(settings, outbox)
    await store.open()
    try:
        timings = await measure(store, workload(n, count))
    finally:
        await store.close()
    return statistics.mean(timings) * 1000, sorted(timings)[int(len(timings) * 0.99)] * 1000, fill


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--messages", type=int, default=5000, help="placements timed at each size")
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgresql"],
        default="sqlite",
        help="postgresql runs SQLite too and prints both side by side",
    )
    parser.add_argument("--dsn", help="an empty PostgreSQL database (postgresql only); it is filled")
    args = parser.parse_args()
    backends = ["sqlite"] + (["postgresql"] if args.backend == "postgresql" else [])
    if "postgresql" in backends and not args.dsn:
        parser.error("--backend postgresql needs --dsn")
    print(f"{'N stored':>10} " + " ".join(f"{b + ' ms/msg (p99)':>26}" for b in backends) + "   prefill s")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            cells, fills = [], []
            for backend in backends:
                if backend == "postgresql":
                    _reset_postgres(args.dsn)
                mean, p99, fill = await run_size(backend, n, args.messages, args.dsn, Path(tmp))
                cells.append(f"{mean:>14.3f} ({p99:.3f})")
                fills.append(f"{fill:.1f}")
            print(f"{n:>10,} " + " ".join(f"{c:>26}" for c in cells) + "   " + "/".join(fills), flush=True)
    print("every engine statement uses an index (EXPLAIN QUERY PLAN, SQLite)")
    if "postgresql" in backends:
        print("no engine statement scans a large table (EXPLAIN, PostgreSQL)")


def _reset_postgres(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


if __name__ == "__main__":
    asyncio.run(main())
