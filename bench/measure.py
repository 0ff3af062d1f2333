"""What the end-to-end benches share: counting events on a queue, and CPU time read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path


class QueueCounter:
    """Distinct events consumed (delivery is at-least-once), and when the first and last arrived."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.first_at: float | None = None
        self.last_at = 0.0
        self.changed = asyncio.Event()

    def seen(self, message_id: str | None) -> None:
        """Count one delivery, by its AMQP message_id."""
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        if message_id:
            self.ids.add(message_id)
        self.changed.set()

    async def wait_for(self, count: int, within: float) -> None:
        """Until ``count`` distinct events have arrived, or ``within`` seconds have passed."""
        deadline = time.perf_counter() + within
        while len(self.ids) < count and time.perf_counter() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                break


def task_cpu(stat: Path) -> float:
    """User + system CPU seconds from a /proc/.../stat file (the name may hold spaces and ')')."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (by the parent field of every process's stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


# The gateway's children name themselves (gateway.process.name_process); anything else is "other".
_CHILD_NAMES = {"tg-relay": "relay process", "tg-normalize": "normalizer process"}


def child_name(pid: int) -> str:
    """What a child process of the gateway is, by the name it gave itself."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "other children"
    return _CHILD_NAMES.get(comm, "other children")
