"""The outbox relay in its own process.

The gateway is one Python process, so everything it does shares one GIL, and publishing (AMQP
framing, confirms, the relay's reads and marks) takes about a quarter of the event loop's time.
Running the relay in a child process gives it its own interpreter and core; the outbox in the
store is the only thing the two share, so the hand-over is as durable as before: the parent commits,
the child publishes what is committed.

The parent keeps a :class:`RelayProcess` with the surface the application uses from an in-process
:class:`~gateway.relay.OutboxRelay` (``start``, ``wake``, ``drain``, ``status``). It supervises the
child and restarts it with backoff when it dies (nothing is lost meanwhile: events wait in the
outbox). They talk over a socket pair, one JSON object per line:

- parent to child: ``{"op": "wake"}`` after commits, ``{"op": "drain", "timeout": s}`` on shutdown,
  ``{"op": "marked" | "unmarked", "positions": [...]}`` for the child's marks;
- child to parent: ``{"op": "ready"}``, ``{"op": "status", ...}`` twice a second,
  ``{"op": "mark", "positions": [...]}``, ``{"op": "waiting"}``, ``{"op": "drained", "emptied": bool}``.

A wake-up goes only to a child that said it is ``waiting`` (it has published everything it read
and waits for work); commits made while it works are caught by its next round, or, when they came
after that round's read, by a wake-up sent when it says ``waiting`` again. Under load the child
never waits and the parent writes nothing per commit.

When the parent dies, the child reads end-of-file and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson

from core.settings import Settings
from gateway.metrics import Metrics
from gateway.relay import RelayStatus
from gateway.store.base import OutboxRow, OutboxStatus, Store

logger = logging.getLogger(__name__)

_STATUS_INTERVAL = 0.5
_READY_TIMEOUT = 30.0
_RESTART_MAX = 30.0
# Wake-ups are hints (the child also polls): drop them rather than buffer without bound.
_MAX_PENDING_WRITE = 64 * 1024
# How long a committed mark's reply may wait for a wake-up to go with (every write wakes the child).
_MARKED_DELAY = 0.05


class RelayProcess:
    """Parent side: starts, wakes, drains and watches the relay child process."""

    def __init__(self, settings: Settings, metrics: Metrics, store: Store) -> None:
        self._settings = settings
        self._metrics = metrics
        self._store = store
        # Confirmations from the child wait here while the previous ones are being committed, and
        # then go to the writer as one job: one job per commit, not one per relay round.
        self._to_mark: list[int] = []
        self._marker: asyncio.Task[None] | None = None
        # Lines for the child, written together once per loop iteration (a write to the socket
        # wakes the child: each one cost the event loop more than the line itself).
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._marked: list[int] = []
        self._marked_timer: asyncio.TimerHandle | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._drained = asyncio.Event()
        self._emptied = False
        self._stopping = asyncio.Event()
        self._wake_queued = False
        # The child waits for a wake-up (True), or works and will read what is committed meanwhile
        # unless it started its last read before (``_missed``: wake it when it says it waits).
        self._child_waiting = True
        self._missed = False
        self._status = RelayStatus(
            running=False,
            connected=False,
            published_total=0,
            last_error=None,
            last_error_at=None,
            backlog=None,
            oldest_age=None,
            retry_in=None,
        )

    @property
    def status(self) -> RelayStatus:
        return self._status

    async def start(self) -> None:
        """Start the child and wait until it runs (it keeps connecting to the broker on its own)."""
        self._supervisor = asyncio.create_task(self._supervise(), name="ticketgate-relay-supervisor")
        try:
            async with asyncio.timeout(_READY_TIMEOUT):
                await self._ready.wait()
        except TimeoutError:
            logger.error("relay process not ready after %.0fs; events wait in the outbox", _READY_TIMEOUT)

    def wake(self) -> None:
        """Something was committed: tell a waiting child, at most once per loop iteration."""
        if self._writer is None:
            return
        if not self._child_waiting:
            self._missed = True
        elif not self._wake_queued:
            self._wake_queued = True
            self._schedule_flush()

    def _send(self, line: bytes) -> None:
        self._outgoing.append(line)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Write what this loop iteration has for the child, a wake-up included, in one write."""
        self._flush_scheduled = False
        lines, self._outgoing = self._outgoing, []
        if self._marked:
            lines.append(orjson.dumps({"op": "marked", "positions": self._marked}) + b"\n")
            self._marked = []
        if self._marked_timer is not None:
            self._marked_timer.cancel()
            self._marked_timer = None
        writer = self._writer
        if writer is None or writer.is_closing():
            self._wake_queued = False
            return
        if self._wake_queued and writer.transport.get_write_buffer_size() < _MAX_PENDING_WRITE:
            lines.append(b'{"op":"wake"}\n')
            self._child_waiting = self._missed = False
        self._wake_queued = False
        if lines:
            writer.write(b"".join(lines))

    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - the relay's API
        """Let the child publish for up to ``timeout`` seconds, then stop it. True when emptied."""
        limit = self._settings.outbox.drain_timeout if timeout is None else timeout
        self._stopping.set()
        writer, process = self._writer, self._process
        if writer is not None and not writer.is_closing():
            self._send(orjson.dumps({"op": "drain", "timeout": limit}) + b"\n")
            self._flush()  # now, after what was queued before it
            with contextlib.suppress(TimeoutError, ConnectionError):
                async with asyncio.timeout(limit + 5.0):
                    await self._drained.wait()
        # The child's last confirmations must be committed before the store closes after us.
        if self._marker is not None:
            await asyncio.gather(self._marker, return_exceptions=True)
        if process is not None:
            await asyncio.to_thread(process.join, 5.0)
            if process.is_alive():
                logger.warning("relay process did not stop; killing it")
                process.kill()
                await asyncio.to_thread(process.join)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        return self._emptied

    # -- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            started = asyncio.get_running_loop().time()
            try:
                code = await self._run_child()
            except Exception:
                # The supervisor must outlive anything a child does to it.
                logger.exception("relay process supervision failed")
                code = None
            if self._stopping.is_set():
                return
            self._status = replace(self._status, running=False, connected=False)
            if asyncio.get_running_loop().time() - started > 60:
                backoff = 1.0
            logger.error("relay process exited (code %s); restarting in %.0fs", code, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_MAX)

    async def _run_child(self) -> int | None:
        parent_sock, child_sock = socket.socketpair()
        context = multiprocessing.get_context("spawn")
        process = context.Process(
            target=child_main, args=(self._settings, child_sock), name="ticketgate-relay", daemon=True
        )
        # Spawning starts an interpreter and pickles the settings: keep it off the event loop.
        await asyncio.to_thread(process.start)
        child_sock.close()
        self._process = process
        reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
        self._writer = writer
        self._child_waiting, self._missed = True, False
        try:
            # A write to a dead child (a wake-up) fails the transport: the reader then raises
            # instead of returning end-of-file. Both mean the child is gone.
            with contextlib.suppress(ConnectionError):
                while line := await reader.readline():
                    self._handle(orjson.loads(line))
        finally:
            self._writer = None
            writer.close()
        await asyncio.to_thread(process.join)
        return process.exitcode

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op == "mark":
            self._to_mark.extend(int(p) for p in message["positions"])
            if self._marker is None:
                self._marker = asyncio.create_task(self._mark_waiting())
        elif op == "waiting":
            self._child_waiting = True
            if self._missed:
                self.wake()
        elif op == "status":
            self._apply_status(message)
        elif op == "ready":
            self._ready.set()
            logger.info("relay process %s running", self._process.pid if self._process else "?")
        elif op == "drained":
            self._emptied = bool(message.get("emptied"))
            self._drained.set()

    async def _mark_waiting(self) -> None:
        """Commit the waiting confirmations, and those that arrive meanwhile, until none wait."""
        try:
            while self._to_mark:
                positions, self._to_mark = self._to_mark, []
                await self._mark(positions)
        finally:
            self._marker = None

    async def _mark(self, positions: list[int]) -> None:
        """Commit the child's confirmations through this process's writer (SQLite has one writer)."""
        try:
            await self._store.outbox_mark_published(positions)
        except Exception as exc:
            # Unmarked rows are published again: a repeat, never a loss.
            logger.warning("could not mark %d published events: %s", len(positions), exc)
            self._send(orjson.dumps({"op": "unmarked", "positions": positions}) + b"\n")
        else:
            # The child only stops hiding these rows when told (they are published, so hiding them
            # meanwhile is right): the reply rides along with the next wake-up, or leaves after
            # _MARKED_DELAY, rather than waking the child once per mark.
            self._marked.extend(positions)
            if self._marked_timer is None:
                loop = asyncio.get_running_loop()
                self._marked_timer = loop.call_later(_MARKED_DELAY, self._schedule_flush)

    def _apply_status(self, message: dict[str, Any]) -> None:
        last_error_at = message.get("last_error_at")
        self._status = RelayStatus(
            running=bool(message["running"]),
            connected=bool(message["connected"]),
            published_total=int(message["published_total"]),
            last_error=message.get("last_error"),
            last_error_at=datetime.fromisoformat(last_error_at) if last_error_at else None,
            backlog=message.get("backlog"),
            oldest_age=message.get("oldest_age"),
            retry_in=message.get("retry_in"),
        )
        if confirmed := int(message.get("confirmed", 0)):
            self._metrics.publish_confirmed(confirmed)
        for reason, count in dict(message.get("failed", {})).items():
            for _ in range(int(count)):
                self._metrics.publish_failed(str(reason))
        if self._status.backlog is not None:
            self._metrics.outbox_status(self._status.backlog, self._status.oldest_age)


# -- child side --------------------------------------------------------------------------------


class _Counts:
    """The relay's metrics in the child: counted here, sent to the parent with each status."""

    def __init__(self) -> None:
        self.confirmed = 0
        self.failed: Counter[str] = Counter()

    def publish_confirmed(self, n: int) -> None:
        self.confirmed += n

    def publish_failed(self, reason: str) -> None:
        self.failed[reason] += 1

    def outbox_status(self, backlog: int, oldest_age: float | None) -> None:
        pass  # read from the relay's status instead

    def take(self) -> dict[str, Any]:
        taken = {"confirmed": self.confirmed, "failed": dict(self.failed)}
        self.confirmed = 0
        self.failed.clear()
        return taken


class MarkThroughParent:
    """The relay's view of the outbox in the child when the store is SQLite.

    Reads go to the child's own read connection. Confirmations are sent to the parent, whose
    writer commits them with its own group commits, instead of competing for SQLite's single write
    lock. Until the parent reports them committed, their rows are hidden from the next fetch.

    Fetches start after a floor below which every row is published or waiting for its mark, so a
    round does not read the previous round's rows (bodies and all) again while the parent commits
    their marks. Positions are given in commit order (one writer, AUTOINCREMENT), so a read sees
    every unpublished row above where it starts, up to the last row it returns.
    """

    def __init__(self, store: Store, send: Callable[[dict[str, Any]], None]) -> None:
        self._store = store
        self._send = send
        self._pending: set[int] = set()
        self._floor = 0
        # The last read: where it started, and each row it saw with whether it was hidden.
        self._read: tuple[int, list[tuple[int, bool]]] = (0, [])

    async def outbox_fetch(self, limit: int, after: int = 0) -> list[OutboxRow]:
        start = max(after, self._floor)
        # Hide what was pending when the read started, even if the parent's "marked" arrives while
        # it runs: the read may predate the parent's commit and still show those rows unpublished.
        hidden = {position for position in self._pending if position > start}
        rows = await self._store.outbox_fetch(limit + len(hidden), start)
        hidden |= self._pending
        self._read = (start, [(row.position, row.position in hidden) for row in rows])
        return [row for row in rows if row.position not in hidden][:limit]

    async def outbox_mark_published(self, positions: Sequence[int]) -> None:
        self._pending.update(positions)
        self._raise_floor()
        self._send({"op": "mark", "positions": list(positions)})

    def _raise_floor(self) -> None:
        """Move the floor over the last read's rows that are now published or being marked: those
        hidden then (pending; one that fails lowers the floor again) and those marked since."""
        start, seen = self._read
        if start != self._floor:
            return  # a failed mark lowered the floor since that read: it must be read again
        floor = start
        for position, hidden in seen:
            if not (hidden or position in self._pending):
                break  # not confirmed, or not handed to the relay: fetched again next round
            floor = position
        self._floor = floor

    async def outbox_status(self) -> OutboxStatus:
        return await self._store.outbox_status()

    def settled(self, positions: Sequence[int], *, published: bool = False) -> None:
        """The parent committed (``published``) or gave up on these marks; an unmarked row is
        fetched again."""
        self._pending.difference_update(positions)
        if not published and positions:
            self._floor = min(self._floor, min(positions) - 1)


def child_main(settings: Settings, sock: socket.socket) -> None:
    """Entry point of the relay process."""
    from gateway.logs import configure_logging
    from gateway.process import name_process, new_event_loop

    name_process("tg-relay")
    # A terminal's Ctrl-C (and systemd's SIGTERM to the whole group) reaches us too; the parent
    # decides when to stop and asks us to drain first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log)
    loop = new_event_loop()
    try:
        loop.run_until_complete(_child(settings, sock))
    finally:
        loop.close()


async def _child(settings: Settings, sock: socket.socket) -> None:
    from gateway.publisher import AmqpPublisher
    from gateway.relay import OutboxRelay
    from gateway.store import build_store

    reader, writer = await asyncio.open_unix_connection(sock=sock)
    outgoing: list[bytes] = []

    def flush() -> None:
        if outgoing and not writer.is_closing():
            writer.write(b"".join(outgoing))
        outgoing.clear()

    def send(message: dict[str, Any]) -> None:
        # What one loop iteration sends (a mark, then "waiting") leaves in one write.
        if not outgoing:
            asyncio.get_running_loop().call_soon(flush)
        outgoing.append(orjson.dumps(message, default=str) + b"\n")

    # On SQLite this process only reads: its marks go through the gateway's writer (MarkThroughParent).
    store = build_store(settings, reads_only=True)
    await store.open()
    publisher = AmqpPublisher(settings.broker, connection_name="ticketgate relay")
    counts = _Counts()
    marker = MarkThroughParent(store, send) if settings.store.backend == "sqlite" else None
    relay = OutboxRelay(
        marker or store, publisher, settings.outbox, counts, on_wait=lambda: send({"op": "waiting"})
    )
    reporter: asyncio.Task[None] | None = None
    try:
        await publisher.start()
        await relay.start()

        async def report() -> None:
            while True:
                status = relay.status
                send(
                    {
                        "op": "status",
                        "running": status.running,
                        "connected": status.connected,
                        "published_total": status.published_total,
                        "last_error": status.last_error,
                        "last_error_at": status.last_error_at.astimezone(UTC).isoformat()
                        if status.last_error_at
                        else None,
                        "backlog": status.backlog,
                        "oldest_age": status.oldest_age,
                        "retry_in": status.retry_in,
                        **counts.take(),
                    }
                )
                flush()
                await writer.drain()
                await asyncio.sleep(_STATUS_INTERVAL)

        reporter = asyncio.create_task(report(), name="relay-status")
        send({"op": "ready"})
        while line := await reader.readline():
            message = orjson.loads(line)
            if message["op"] == "wake":
                relay.wake()
            elif message["op"] in ("marked", "unmarked") and marker is not None:
                positions = [int(p) for p in message["positions"]]
                marker.settled(positions, published=message["op"] == "marked")
            elif message["op"] == "drain":
                emptied = await relay.drain(float(message["timeout"]))
                send({"op": "drained", "emptied": emptied})
                flush()
                await writer.drain()
                break
        else:
            logger.warning("relay process: the gateway went away; stopping")
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        await relay.stop()
        await publisher.close()
        await store.close()
        writer.close()
