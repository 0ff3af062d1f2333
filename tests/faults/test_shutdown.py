"""SIGTERM must end the gateway within its bound whatever the broker does."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from core.settings import load_settings
from gateway.serve import shutdown_bound
from tests.e2e.harness import GatewayProcess
from tests.faults.conftest import Ledger, MakeDeployment, send_message, settle
from tests.support.rabbitmq import broker_address
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration


class SilentBroker:
    """Accepts TCP connections and never says a word (a hung broker, a black-holing firewall)."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.two_connected = asyncio.Event()  # the relay's and the control consumer's

    async def start(self) -> SilentBroker:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        if self.accepted >= 2:
            self.two_connected.set()

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def silent_broker() -> AsyncIterator[SilentBroker]:
    broker = await SilentBroker().start()
    yield broker
    await broker.close()


async def stop_within_bound(process: GatewayProcess) -> tuple[int, float, float]:
    """SIGTERM; the exit code, the seconds it took and the configured bound."""
    bound = shutdown_bound(load_settings(process.config, environ=process.env))
    started = time.monotonic()
    process.signal(signal.SIGTERM)
    try:
        code = await process.wait(timeout=bound + 5.0)
    except Exception as exc:
        log = process.log()[-3000:]
        raise AssertionError(f"no exit within {bound + 5.0:.0f}s of SIGTERM:\n{log}") from exc
    return code, time.monotonic() - started, bound


def assert_clean_log(process: GatewayProcess) -> None:
    log = process.log()
    for sign in ("Task was destroyed but it is pending", "was never awaited", "Traceback"):
        assert sign not in log, f"{sign!r} in the gateway's log:\n{log[-3000:]}"


async def test_sigterm_with_a_broker_that_never_answers(
    deploy: MakeDeployment, silent_broker: SilentBroker, amqp_url: str, ledger: Ledger
) -> None:
    case = ledger.case("SIGTERM, silent broker, restart")
    g = await deploy(broker_url=f"amqp://guest:guest@127.0.0.1:{silent_broker.port}/")
    async with aiohttp.ClientSession() as session:
        for i in range(10):
            assert await send_message(session, g.gateway.url, case, note=str(i)) == 202
    # Let the relay and the control consumer be in the middle of connecting to the silent broker.
    async with asyncio.timeout(10):
        await silent_broker.two_connected.wait()
    code, took, bound = await stop_within_bound(g.gateway)
    assert code == 0, f"exit {code} after {took:.1f}s (bound {bound:.0f}s):\n{g.gateway.log()[-3000:]}"
    assert took <= bound
    assert_clean_log(g.gateway)
    # What was acknowledged waited in the outbox: a restart on a working broker publishes it.
    host, port = broker_address(amqp_url)
    config = g.gateway.config
    config.write_text(config.read_text().replace(f"127.0.0.1:{silent_broker.port}", f"{host}:{port}"))
    await g.gateway.start()
    await settle(case, g.consumer)


async def test_sigterm_with_a_broker_that_stalls(
    deploy: MakeDeployment, broker_proxy: TcpProxy, ledger: Ledger
) -> None:
    case = ledger.case("SIGTERM, stalled broker")
    g = await deploy(broker_url=broker_proxy.url())
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            assert await send_message(session, g.gateway.url, case, note=str(i)) == 202
        await settle(case, g.consumer)
        broker_proxy.stall()
        for i in range(5):
            assert await send_message(session, g.gateway.url, case, note=f"stalled {i}") == 202
    code, took, bound = await stop_within_bound(g.gateway)
    assert code in (0, 1), f"exit {code} after {took:.1f}s"
    assert took <= bound, f"exit after {took:.1f}s (bound {bound:.0f}s)"
    broker_proxy.restore()
    await g.gateway.start()
    await settle(case, g.consumer)
