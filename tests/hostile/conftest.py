"""Fixtures of the hostile-input suite: the whole gateway on SQLite, and on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.hostile.kit import Gateway, running
from tests.support.postgres import store_table


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The ``[store]`` table of each backend; PostgreSQL gets a fresh database per test."""
    with store_table(str(request.param)) as table:
        yield table


@pytest.fixture
async def gateway(tmp_path: Path, store: dict[str, str]) -> AsyncIterator[Gateway]:
    """The gateway on each store in turn."""
    async with running(tmp_path, store) as instance:
        yield instance


@pytest.fixture
async def sqlite_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """The gateway on SQLite, for what does not depend on the store (authentication, headers)."""
    async with running(tmp_path, {}) as instance:
        yield instance
