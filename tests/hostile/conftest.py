"""Fixtures of the hostile-input suite: the whole gateway on SQLite, and on both stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.hostile.kit import Gateway, running
from tests.support.postgres import admin_dsn, fresh_database, require_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def store_table(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The ``[store]`` table of each backend; PostgreSQL gets a fresh database per test."""
    if request.param == "sqlite":
        yield {}
        return
    dsn = admin_dsn()
    require_postgres(dsn)
    with fresh_database(dsn) as database:
        yield {"backend": "postgresql", "dsn": database}


@pytest.fixture
async def gateway(tmp_path: Path, store_table: dict[str, Any]) -> AsyncIterator[Gateway]:
    """The gateway on each store in turn."""
    async with running(tmp_path, store_table) as instance:
        yield instance


@pytest.fixture
async def sqlite_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    """The gateway on SQLite, for what does not depend on the store (authentication, headers)."""
    async with running(tmp_path, {}) as instance:
        yield instance
