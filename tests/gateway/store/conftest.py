"""Fixtures of the store tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import admin_dsn, fresh_database, require_postgres


@pytest.fixture
def dsn() -> Iterator[str]:
    """An empty database on the local PostgreSQL, dropped after the test."""
    admin = admin_dsn()
    require_postgres(admin)
    with fresh_database(admin) as database:
        yield database
