"""SMTP ingest throughput: many concurrent sessions sending 5 KB and 200 KB mails.

    .venv/bin/python bench/smtp_ingest.py [--sessions 32] [--mails 4000] [--sizes 5 200] [--e2e]
                                          [--skip-bare] [--no-normalizer-process]
                                          [--load auto|smtp-source|smtplib]

In one run, for each size, the same load goes to three servers, each in a process of its own (the
load generator and the queue consumer never share the server's interpreter):

- ``bare``: aiosmtpd answering ``250`` at once (the transport's ceiling on this machine);
- ``transport only``: the email connector's listener (limits, smuggling check, routing, trust, the
  envelope) with an ``ingest`` that answers "stored" at once;
- with ``--e2e``: the real gateway as a ``ticketgate run`` child (email normalizer, SQLite store
  with group commit, the outbox relay in its own process, RabbitMQ with confirms); a mail counts
  when its event was consumed from a queue by this process. Needs RabbitMQ
  (``TICKETGATE_TEST_AMQP_URL`` or the local default).

Printed per server: mails/s, the ratio to bare aiosmtpd measured in the same run, and the server's
CPU per mail (its threads and, end to end, the relay child), which is steadier than throughput on
a shared machine.

Load: ``smtp-source`` (Debian's ``postfix`` package) when it is installed, else ``--sessions``
smtplib client processes, each one SMTP session sending its share serially; the output says which
one ran. smtp-source is C and costs the 2-core machine far less CPU, so more of it is left to the
server. Its mails are its own (``From: <customerN@example.com>``, a body of ``X`` lines, a unique
Message-Id per mail); the sessions are split over several smtp-source processes, one sender each,
so the gateway sees several customers. smtplib sends a plain-text customer question ("my parcel
has not arrived") from one of 500 customers. Compare ratios, not absolute figures across runs.

Reading the CPU figures: end to end, the gateway's event loop and its store writer thread share
one GIL, so their CPU per mail added up bounds the rate (1 s / that sum) whatever the sessions.
Mail is parsed and enriched in the gateway's normalizer process (``server.normalizer_process``)
and published by its relay process; each of those has an interpreter of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import smtplib
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import QueueCounter, child_name, children, task_cpu  # noqa: E402

RCPT = "support@bench.localhost"
SMTP_SOURCE_PATHS = ("/usr/sbin/smtp-source", "/usr/bin/smtp-source")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_mail(n: int, size: int, run: str) -> bytes:
    head = (
        f"From: Customer {n % 500} <customer{n % 500}@example.com>\r\n"
        f"To: {RCPT}\r\nSubject: Order {n} question\r\nMessage-ID: <{run}.{n}@bench.example>\r\n"
        "Date: Mon, 02 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()
    line = b"Hello, my parcel has not arrived yet, could you please check the tracking number?\r\n"
    body = line * max(1, (size - len(head)) // len(line) + 1)
    return head + body[: max(0, size - len(head))]


# --- servers, each in a child process -----------------------------------------------------------


def _serve(kind: str, data: str, conn: Connection) -> None:
    """Child process: run one server until the parent says stop (or goes away)."""
    asyncio.run(_serve_async(kind, Path(data), conn))


async def _serve_async(kind: str, data: Path, conn: Connection) -> None:
    from aiohttp import web
    from aiosmtpd.smtp import SMTP, Envelope, Session

    from connectors.email import DESCRIPTOR, EmailConnector
    from core.model import IngestResult, Outcome, Placement, RawEnvelope
    from core.settings import Settings
    from gateway.channels import GatewayContext
    from gateway.metrics import Metrics

    loop = asyncio.get_running_loop()
    if kind == "bare":

        class BareHandler:
            async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
                return "250 OK"

        server = await loop.create_server(
            lambda: SMTP(BareHandler(), loop=loop, hostname="bench", data_size_limit=1 << 26),
            "127.0.0.1",
            0,
        )
        conn.send(int(server.sockets[0].getsockname()[1]))
        await loop.run_in_executor(None, _wait_stop, conn)
        server.close()
        return

    stored = IngestResult(
        outcome=Outcome.ACCEPTED,
        placements=(
            Placement(message_id="m", thread_id="t", customer_id="c", sequence=1, is_new_thread=True),
        ),
    )

    async def ingest(envelope: RawEnvelope, normalize: Callable[..., Any]) -> IngestResult:
        return stored

    port = free_port()
    settings = Settings.model_validate(
        {
            "store": {"path": str(data / "ticketgate.db"), "blob_dir": str(data / "blobs")},
            "tenants": {"bench": {}},
            "inboxes": {"support": {"tenant": "bench"}},
            "channels": {"email": {"smtp": _smtp_table(port), "inboxes": {"support": {"addresses": [RCPT]}}}},
        }
    )
    connector = EmailConnector.from_settings(settings)
    assert connector is not None
    app = web.Application()
    # The daemon's own channel context around the stand-in ingest; the SMTP listener needs no store.
    ctx = GatewayContext(app, DESCRIPTOR, settings=settings, ingest=ingest, store=None, metrics=Metrics())
    connector.setup(ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    conn.send(port)
    await loop.run_in_executor(None, _wait_stop, conn)
    await runner.cleanup()


def _wait_stop(conn: Connection) -> None:
    with suppress(EOFError):
        conn.recv()


def _smtp_table(port: int) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "hostname": "bench",
        "max_connections": 4096,
        "max_connections_per_ip": 4096,
        "max_message_size": 1 << 26,
    }


@contextmanager
def server_process(kind: str, data: Path) -> Iterator[tuple[int, int]]:
    """(port, pid) of a bare or transport-only server running in a spawned child process."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(kind, str(data), child), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError(f"{kind} server did not start")
        yield int(parent.recv()), int(process.pid or 0)
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


# --- CPU accounting -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU (user + system) of a server: its event loop thread, its other threads, its children by
    name (the gateway's relay and normalizer processes)."""
    result = {"event loop": 0.0, "other threads": 0.0}
    for proc in (pid, *children(pid)):
        try:
            tasks = list(Path(f"/proc/{proc}/task").iterdir())
        except OSError:
            continue
        child = child_name(proc) if proc != pid else None
        for task in tasks:
            name = child or ("event loop" if task.name == str(pid) else "other threads")
            with suppress(OSError):
                result[name] = result.get(name, 0.0) + task_cpu(task / "stat")
    return result


@dataclass
class Measured:
    mails: int
    seconds: float
    cpu: dict[str, float]

    @property
    def rate(self) -> float:
        return self.mails / self.seconds

    def cpu_text(self) -> str:
        total = sum(self.cpu.values()) / self.mails * 1e6
        parts = ", ".join(f"{k} {v / self.mails * 1e6:.0f}" for k, v in self.cpu.items() if v > 0)
        return f"server CPU {total:5.0f} us/mail ({parts})"


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


# --- load generators ----------------------------------------------------------------------------


def smtp_source_path() -> str | None:
    return shutil.which("smtp-source") or next((p for p in SMTP_SOURCE_PATHS if os.access(p, os.X_OK)), None)


class SmtpSource:
    """Debian's smtp-source: sessions split over several processes, one sender address each."""

    name = "smtp-source"

    def __init__(self, path: str, sessions: int) -> None:
        self.path = path
        self.sessions = sessions
        # A few sessions per process: each process is one customer (its From) to the gateway.
        self.processes = max(1, min(sessions, (sessions + 3) // 4))

    def describe(self) -> str:
        return f"smtp-source ({self.path}): {self.sessions} sessions in {self.processes} processes"

    async def send(self, port: int, mails: int, size: int, run: str) -> int:
        share, extra = divmod(mails, self.processes)
        per_session, more = divmod(self.sessions, self.processes)
        # smtp-source's own header block is about 150 bytes; -l is the body length.
        body = max(1, size - 150)
        procs = []
        for i in range(self.processes):
            count = share + (i < extra)
            sessions = per_session + (i < more)
            if count == 0:
                continue
            procs.append((count,
                await asyncio.create_subprocess_exec(
                    self.path, "-s", str(sessions), "-m", str(count), "-d", "-l", str(body),
                    "-S", f"Order question {run[:8]}", "-f", f"customer{i}.{run[:6]}@example.com",
                    "-t", RCPT, "-M", "bench", f"127.0.0.1:{port}",
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                ),
            ))  # fmt: skip
        sent = 0
        for count, proc in procs:
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(
                    f"smtp-source exited with {proc.returncode}: {err.decode(errors='replace')}"
                )
            sent += count
        return sent

    def close(self) -> None:
        pass


def _smtplib_client(port: int, first: int, count: int, size: int, run: str) -> int:
    """One SMTP session sending ``count`` mails; returns how many got 250."""
    ok = 0
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for n in range(first, first + count):
            smtp.sendmail("customer@example.com", [RCPT], make_mail(n, size, run))
            ok += 1
    return ok


class SmtplibProcesses:
    """``sessions`` client processes, each one smtplib session sending its share serially."""

    name = "smtplib"

    def __init__(self, sessions: int, why: str) -> None:
        self.sessions = sessions
        self.why = why
        self.pool = ProcessPoolExecutor(max_workers=sessions)

    def describe(self) -> str:
        return f"smtplib: {self.sessions} client processes, one session each ({self.why})"

    async def warm(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.pool, int) for _ in range(self.sessions)))

    async def send(self, port: int, mails: int, size: int, run: str) -> int:
        loop = asyncio.get_running_loop()
        share, extra = divmod(mails, self.sessions)
        counts = [share + (i < extra) for i in range(self.sessions)]
        firsts = [sum(counts[:i]) for i in range(self.sessions)]
        done = await asyncio.gather(
            *(
                loop.run_in_executor(self.pool, _smtplib_client, port, firsts[i], counts[i], size, run)
                for i in range(self.sessions)
                if counts[i]
            )
        )
        return sum(done)

    def close(self) -> None:
        self.pool.shutdown()


Load = SmtpSource | SmtplibProcesses


async def measure(load: Load, port: int, pid: int, mails: int, size: int) -> Measured:
    before = cpu_seconds(pid)
    started = time.perf_counter()
    sent = await load.send(port, mails, size, uuid.uuid4().hex)
    elapsed = time.perf_counter() - started
    return Measured(sent, elapsed, cpu_delta(before, cpu_seconds(pid)))


# --- end to end ---------------------------------------------------------------------------------


@asynccontextmanager
async def gateway(
    data: Path, url: str, *, normalizer_process: bool = True
) -> AsyncIterator[tuple[int, int, QueueCounter, Any]]:
    """``ticketgate run`` on a config with the email channel; yields (smtp port, pid, counter, channel).

    ``normalizer_process=False`` sets ``server.normalizer_process = false``: mail parsed in the loop.
    """
    import aio_pika

    from tests.e2e.harness import GatewayProcess, gateway_config

    exchange, queue = f"bench.{uuid.uuid4().hex[:8]}", f"bench.desk.{uuid.uuid4().hex[:8]}"
    port, smtp_port = free_port(), free_port()
    smtp = _smtp_table(smtp_port)
    extra = (
        "\n[channels.email.smtp]\n"
        + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in smtp.items())
        + f'\n[channels.email.inboxes.demo]\naddresses = ["{RCPT}"]\n'
    )
    config = gateway_config(data, port=port, amqp_url=url, exchange=exchange, queue=queue, extra=extra)
    text = config.read_text().replace('level = "INFO"', 'level = "WARNING"')
    if not normalizer_process:
        text = text.replace("[server]\n", "[server]\nnormalizer_process = false\n", 1)
    config.write_text(text)
    process = GatewayProcess(config=config, port=port, log_path=data / "gateway.log")
    await process.start()
    assert process.proc is not None
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=2000)
        amqp_queue = await channel.get_queue(queue)
        counter = QueueCounter()

        async def on_message(message: Any) -> None:
            counter.seen(message.message_id)

        await amqp_queue.consume(on_message, no_ack=True)
        yield smtp_port, process.proc.pid, counter, channel
        await amqp_queue.delete(if_unused=False, if_empty=False)
        await (await channel.get_exchange(exchange)).delete()
    finally:
        await connection.close()
        await process.stop()


async def measure_e2e(load: Load, args: argparse.Namespace, size: int, data: Path) -> tuple[Measured, float]:
    """(events consumed end to end, SMTP-accepted mails/s) for the whole gateway."""
    url = os.environ.get("TICKETGATE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    async with gateway(data, url, normalizer_process=args.normalizer_process) as (
        port,
        pid,
        counter,
        _channel,
    ):
        # Warm-up: imports, caches, SQLite pages, the relay's connection.
        warm = await load.send(port, args.sessions * 4, size, uuid.uuid4().hex)
        await counter.wait_for(warm, within=60)
        before = len(counter.ids)
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        sent = await load.send(port, args.mails, size, uuid.uuid4().hex)
        accepted = sent / (time.perf_counter() - started)
        await counter.wait_for(before + sent, within=300)
        cpu = cpu_delta(cpu_before, cpu_seconds(pid))
        events = len(counter.ids) - before
        if events < sent:
            print(f"      only {events} of {sent} events arrived")
        return Measured(events, counter.last_at - started, cpu), accepted


def row(size_kb: int, name: str, measured: Measured, bare: Measured | None) -> str:
    ratio = f"/bare {measured.rate / bare.rate:5.2f}" if bare is not None else " " * 11
    return f"{size_kb:>4} KB  {name:<15} {measured.rate:7.0f} mails/s  {ratio}  {measured.cpu_text()}"


async def main(args: argparse.Namespace) -> None:
    path = smtp_source_path() if args.load in {"auto", "smtp-source"} else None
    if args.load == "smtp-source" and path is None:
        raise SystemExit("smtp-source not found (apt-get install postfix)")
    why = "smtp-source not found" if args.load == "auto" else "--load smtplib"
    load: Load = SmtpSource(path, args.sessions) if path is not None else SmtplibProcesses(args.sessions, why)
    print(f"load: {load.describe()}; {args.mails} mails per run; {os.cpu_count()} CPUs")
    try:
        if isinstance(load, SmtplibProcesses):
            await load.warm()  # so process start-up is not measured
        with tempfile.TemporaryDirectory() as tmp:
            for size_kb in args.sizes:
                size = size_kb * 1024
                bare = None
                if not args.skip_bare:
                    with server_process("bare", Path(tmp)) as (port, pid):
                        await load.send(port, args.sessions, size, "warm")
                        bare = await measure(load, port, pid, args.mails, size)
                    data = Path(tmp) / f"t{size_kb}"
                    data.mkdir()
                    with server_process("transport", data) as (port, pid):
                        await load.send(port, args.sessions, size, "warm")
                        ours = await measure(load, port, pid, args.mails, size)
                    print(row(size_kb, "bare aiosmtpd", bare, None))
                    print(row(size_kb, "transport only", ours, bare))
                if args.e2e:
                    data = Path(tmp) / f"e{size_kb}"
                    data.mkdir()
                    e2e, accepted = await measure_e2e(load, args, size, data)
                    print(row(size_kb, "end to end", e2e, bare))
                    print(f"      (events consumed from the queue; SMTP 250s came at {accepted:.0f} mails/s)")
    finally:
        load.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--mails", type=int, default=4000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 200], help="mail sizes in KB")
    parser.add_argument("--e2e", action="store_true", help="also run the whole gateway against RabbitMQ")
    parser.add_argument(
        "--skip-bare", action="store_true", help="end to end only: no bare or transport-only server"
    )
    parser.add_argument(
        "--no-normalizer-process",
        dest="normalizer_process",
        action="store_false",
        help="end to end: parse mail in the gateway's event loop (server.normalizer_process = false)",
    )
    parser.add_argument(
        "--load",
        choices=("auto", "smtp-source", "smtplib"),
        default="auto",
        help="load generator (auto: smtp-source when installed, else smtplib processes)",
    )
    asyncio.run(main(parser.parse_args()))
