"""Reaching the test broker: the URL, a reachability probe, unique names."""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
ALLOW_SKIP_ENV = "TICKETGATE_TEST_ALLOW_SKIP"
URL_ENV = "TICKETGATE_TEST_AMQP_URL"


def broker_url() -> str:
    return os.environ.get(URL_ENV, DEFAULT_URL)


def broker_address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


def require_broker(url: str) -> None:
    """Fail loudly when the broker is unreachable, unless skipping was allowed explicitly.

    CI must never turn a missing broker into a green run, so a skip needs ``TICKETGATE_TEST_ALLOW_SKIP=1``.
    """
    host, port = broker_address(url)
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return
    except OSError as exc:
        message = f"RabbitMQ not reachable at {host}:{port} ({exc}); set {URL_ENV} or start a broker"
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (set {ALLOW_SKIP_ENV}=1 to skip instead)", pytrace=False)


def unique(prefix: str) -> str:
    """A broker object name no other test (or a parallel run) uses."""
    return f"test.{prefix}.{uuid.uuid4().hex[:12]}"


class Janitor:
    """Deletes the exchanges and queues a test registered, after the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.exchanges: list[str] = []
        self.queues: list[str] = []

    def exchange(self, prefix: str = "ex") -> str:
        name = unique(prefix)
        self.exchanges.append(name)
        return name

    def queue(self, prefix: str = "q") -> str:
        name = unique(prefix)
        self.queues.append(name)
        return name

    async def clean(self) -> None:
        import aio_pika  # imported late: unit tests that never touch the broker need not load it

        connection = await aio_pika.connect(self.url)
        async with connection:
            for name in self.queues:
                channel = await connection.channel()
                await channel.queue_delete(name)
            for name in self.exchanges:
                channel = await connection.channel()
                await channel.exchange_delete(name)
