"""Held connections: clients that send half a request and wait must not take the gateway down.

Real sockets on loopback against the real gateway process, bounded in count (a few hundred) and in
time (every wait has a deadline).
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from tests.faults.conftest import Ledger, MakeDeployment, send_message, settle

pytestmark = pytest.mark.integration

HALF_REQUEST = b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"
LIMIT = 40
HELD = 300


async def hold(port: int, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Open ``n`` connections that each send half a request head, then wait."""
    held = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HALF_REQUEST)
        held.append((reader, writer))
    return held


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    """True when the server closed the connection (EOF or reset) within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def release(held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in held:
        writer.close()
    for _, writer in held:
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_connection_limit_sheds_held_connections_and_keeps_serving(
    deploy: MakeDeployment, ledger: Ledger
) -> None:
    case = ledger.case("held connections at the limit")
    g = await deploy(env={"TICKETGATE__SERVER__MAX_CONNECTIONS": str(LIMIT)})
    held = await hold(g.gateway.port, HELD)
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(f"{g.gateway.url}/healthz") as resp:
                assert resp.status == 200
            statuses = [await send_message(session, g.gateway.url, case, note=str(i)) for i in range(20)]
        assert statuses == [202] * 20
        # The limit holds: all but at most LIMIT of the held connections were closed by the server.
        closed = await asyncio.gather(*(closed_by_server(reader, within=5.0) for reader, _ in held))
        assert sum(closed) >= HELD - LIMIT, f"only {sum(closed)} of {HELD} held connections were shed"
    finally:
        await release(held)
    await settle(case, g.consumer)
    sheds = [line for line in g.gateway.log().splitlines() if "server.max_connections" in line]
    assert sheds, "shedding was not logged"
    assert len(sheds) <= 3, f"{len(sheds)} shed lines for {HELD} connections: the log is not rate-limited"


async def test_idle_and_half_sent_requests_time_out(deploy: MakeDeployment, ledger: Ledger) -> None:
    case = ledger.case("slow headers and slow bodies")
    g = await deploy(
        env={"TICKETGATE__SERVER__IDLE_TIMEOUT": "1", "TICKETGATE__SERVER__REQUEST_TIMEOUT": "2"}
    )
    held = await hold(g.gateway.port, 20)
    idle = [await asyncio.open_connection("127.0.0.1", g.gateway.port) for _ in range(5)]
    # Headers complete, body promised but only partly sent.
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", g.gateway.port)
    slow_writer.write(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer e2e-test-key-0001\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"cust"
    )
    # The same, saying it wants a WebSocket: only a bodiless GET handshake escapes the request bound.
    sly_reader, sly_writer = await asyncio.open_connection("127.0.0.1", g.gateway.port)
    sly_writer.write(
        b"POST /api/v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer e2e-test-key-0001\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"cust"
    )
    try:
        closed = await asyncio.gather(
            *(closed_by_server(reader, within=10.0) for reader, _ in [*held, *idle])
        )
        assert all(closed), f"{closed.count(False)} idle or half-sent connections still open"
        async with asyncio.timeout(10):
            status_line = await slow_reader.readline()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        async with asyncio.timeout(10):
            status_line = await sly_reader.readline()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        async with aiohttp.ClientSession() as session:
            assert await send_message(session, g.gateway.url, case) == 202
    finally:
        await release([*held, *idle, (slow_reader, slow_writer), (sly_reader, sly_writer)])
    await settle(case, g.consumer)
