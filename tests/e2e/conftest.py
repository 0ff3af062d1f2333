"""End-to-end fixtures: the real gateway process, publishing to the real RabbitMQ."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.harness import GatewayProcess, free_port, gateway_config
from tests.support.consumer import Consumer
from tests.support.rabbitmq import Janitor


@dataclass
class Deployment:
    """One gateway with its own exchange, desk queue and data directory, and a consumer on the queue."""

    gateway: GatewayProcess
    consumer: Consumer
    exchange: str
    queue: str


MakeDeployment = Callable[..., Awaitable[Deployment]]


@pytest.fixture
async def deploy(tmp_path: Path, amqp_url: str, amqp_names: Janitor) -> AsyncIterator[MakeDeployment]:
    """Build and start a deployment; ``broker_url`` lets a test put a proxy in front of the broker,
    ``store`` replaces the ``[store]`` table."""
    made: list[Deployment] = []

    async def make(
        *,
        broker_url: str | None = None,
        extra: str = "",
        start: bool = True,
        env: dict[str, str] | None = None,
        store: str | None = None,
    ) -> Deployment:
        exchange, queue = amqp_names.exchange("e2e"), amqp_names.queue("desk")
        port = free_port()
        config = gateway_config(
            tmp_path,
            port=port,
            amqp_url=broker_url or amqp_url,
            exchange=exchange,
            queue=queue,
            extra=extra,
            store=store,
        )
        # ``env``: settings overrides (TICKETGATE__SECTION__KEY) for this gateway only.
        gateway = GatewayProcess(config=config, port=port, log_path=tmp_path / "gateway.log", env=env or {})
        # The consumer declares the exchange and binds its own queue, so it sees events even while
        # the gateway cannot reach the broker to declare the desk queue.
        consumer = await Consumer(amqp_url, exchange).start()
        deployment = Deployment(gateway=gateway, consumer=consumer, exchange=exchange, queue=queue)
        made.append(deployment)
        if start:
            await gateway.start()
        return deployment

    yield make
    for deployment in made:
        await deployment.gateway.stop()
        await deployment.consumer.close()
