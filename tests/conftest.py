"""Project-wide fixtures: only RabbitMQ access lives here; packages keep their own conftest files."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

# pytest puts tests/ on sys.path for this file, and tests/gateway, tests/connectors, ... (no
# __init__.py) would then import as *namespace* packages shadowing the real ones, because the editable
# install's finder comes after the path finder. A regular package anywhere on sys.path wins over a
# namespace portion, so the project root must be on it. (``pythonpath = ["."]`` in pyproject would
# say the same thing declaratively.)
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support.rabbitmq import Janitor, broker_address, broker_url, require_broker  # noqa: E402
from tests.support.tcpproxy import TcpProxy  # noqa: E402


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The test broker's URL; fails when it is down (skips only with TICKETGATE_TEST_ALLOW_SKIP=1)."""
    url = broker_url()
    require_broker(url)
    return url


@pytest.fixture
async def amqp_names(amqp_url: str) -> AsyncIterator[Janitor]:
    """Unique exchange/queue names for one test, deleted afterwards."""
    janitor = Janitor(amqp_url)
    yield janitor
    await janitor.clean()


@pytest.fixture
async def broker_proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    """A cuttable TCP proxy in front of the broker (``proxy.url()`` connects through it)."""
    proxy = await TcpProxy(*broker_address(amqp_url)).start()
    yield proxy
    await proxy.close()
