"""Run the real gateway as a child process on a temporary config (for kill, restart and browser tests)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_config(
    tmp: Path,
    *,
    port: int,
    amqp_url: str,
    exchange: str,
    queue: str,
    extra: str = "",
    store: str | None = None,
    name: str = "ticketgate",
) -> Path:
    """A config like the dev one, on its own port, data directory, exchange and desk queue.

    ``store`` replaces the ``[store]`` table (e.g. a shared PostgreSQL); ``name`` names the file,
    so several instances can share ``tmp``.
    """
    store = (
        store
        or f"""[store]
path = "{tmp / "data" / "ticketgate.db"}"
blob_dir = "{tmp / "data" / "blobs"}"
"""
    )
    text = f"""
[server]
host = "127.0.0.1"
port = {port}
public_url = "http://127.0.0.1:{port}"
shutdown_timeout = 5

[log]
level = "INFO"
format = "json"

{store}
[broker]
url = "{amqp_url}"
exchange = "{exchange}"
publish_timeout = 2
reconnect_interval = 0.2

[[broker.queues]]
name = "{queue}"
bindings = ["#"]

[outbox]
poll_interval = 0.2
drain_timeout = 3

[tenants.demo]
name = "Demo Inc."

[inboxes.demo]
tenant = "demo"

[channels.form.inboxes.demo]
allowed_origins = ["http://127.0.0.1:{port}"]

[channels.api]
# Load tests come from one address: the per-client limit is not under test here.
rate_limit_per_minute = 600000
rate_limit_burst = 10000

[channels.api.inboxes.demo]
keys = ["e2e-test-key-0001"]

[[routing.rules]]
name = "complaints"
keywords = ["投诉", "refund"]
priority = "high"
tags = ["complaint"]
{extra}
"""
    path = tmp / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@dataclass
class GatewayProcess:
    config: Path
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        log.close()
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    async with session.get(f"{self.url}/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gateway did not answer /healthz:\n{self.log()}")
                await asyncio.sleep(0.05)  # polling another process, not a task of ours

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await self.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
