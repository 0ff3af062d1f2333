"""Process-level helpers shared by the daemon and the child processes it spawns."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (it is a dependency on Linux): a cheaper loop for the same code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop wheels
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def name_process(name: str) -> None:
    """Show ``name`` for this process in ps, top and /proc (the spawned children all look alike)."""
    with contextlib.suppress(OSError):  # Linux only; the name is a convenience
        Path("/proc/self/comm").write_text(name[:15])
