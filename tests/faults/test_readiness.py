"""/readyz must say "not ready" when the gateway cannot take messages: a full disk, a stalled broker."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.faults.conftest import Ledger, MakeDeployment, send_message, settle
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


async def readyz(url: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"{url}/readyz") as resp,
    ):
        return resp.status, await resp.json()


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real ENOSPC, not a simulated one. Needs root (mount); skipped otherwise."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(directory: Path) -> Path:
    """Write until the file system refuses with ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler


async def test_readyz_fails_on_a_full_disk(
    deploy: MakeDeployment, tiny_filesystem: Path, ledger: Ledger
) -> None:
    case = ledger.case("disk full")
    data = tiny_filesystem / "data"
    # min_free_disk_mb = 0: the free-space floor is not what is under test, the write probe is.
    store = (
        f'[store]\npath = "{data / "ticketgate.db"}"\nblob_dir = "{data / "blobs"}"\nmin_free_disk_mb = 0\n'
    )
    g = await deploy(store=store, env={"TICKETGATE__OUTBOX__RELAY": "inline"})
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            assert await send_message(session, g.gateway.url, case, note=str(i)) == 202
        await settle(case, g.consumer)
        assert (await readyz(g.gateway.url))[0] == 200
        filler = fill(tiny_filesystem)
        status, body = await readyz(g.gateway.url)
        assert status == 503, body
        assert any(p.startswith("store:") for p in body["problems"]), body
        # Nothing is acknowledged that was not stored: refusals are temporary, acks are delivered.
        for i in range(5):
            await send_message(session, g.gateway.url, case, note=f"full {i}")
        filler.unlink()
        status, body = await readyz(g.gateway.url)
        assert status == 200, body
        for i in range(5):
            assert await send_message(session, g.gateway.url, case, note=f"after {i}") == 202
    await settle(case, g.consumer)


async def test_readyz_fails_when_the_broker_stalls_and_the_backlog_is_full(
    deploy: MakeDeployment, broker_proxy: TcpProxy, ledger: Ledger
) -> None:
    case = ledger.case("stalled broker, backlog at its bound")
    g = await deploy(broker_url=broker_proxy.url(), env={"TICKETGATE__OUTBOX__MAX_BACKLOG": "5"})
    async with aiohttp.ClientSession() as session:
        assert await send_message(session, g.gateway.url, case, note="before") == 202
        await settle(case, g.consumer)
        broker_proxy.stall()
        statuses = [await send_message(session, g.gateway.url, case, note=str(i)) for i in range(8)]
        assert 503 in statuses, statuses  # the backlog reached its bound
        # The relay notices the stall within publish_timeout (2 s in the test config) plus a status
        # report; /readyz must then say so.
        async with asyncio.timeout(15):
            while True:
                status, body = await readyz(g.gateway.url)
                if status != 200:
                    break
                await asyncio.sleep(0.2)  # polling another process's state
        assert status == 503, body
        assert body["broker_connected"] is False, body
        broker_proxy.restore()
    await settle(case, g.consumer, within=30)
