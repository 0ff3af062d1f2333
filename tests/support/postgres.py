"""Reaching the test PostgreSQL: a reachability probe and a fresh database per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.support.rabbitmq import ALLOW_SKIP_ENV

DSN_ENV = "TICKETGATE_TEST_PG_DSN"
# An administrative connection: it must be allowed to CREATE and DROP DATABASE.
DEFAULT_DSN = "postgresql://root@127.0.0.1:5432/postgres"


def admin_dsn() -> str:
    return os.environ.get(DSN_ENV, DEFAULT_DSN)


def require_postgres(dsn: str) -> None:
    """Fail loudly when PostgreSQL is unreachable, unless skipping was allowed explicitly."""
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
            return
    except psycopg.Error as exc:
        message = f"PostgreSQL not reachable at {_where(dsn)} ({exc}); set {DSN_ENV} or start a server"
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(f"{message} (set {ALLOW_SKIP_ENV}=1 to skip instead)", pytrace=False)


@contextmanager
def fresh_database(dsn: str, prefix: str = "ticketgate_test") -> Iterator[str]:
    """Create an empty database, yield its DSN, drop it (closing whatever still uses it) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_conninfo(dsn, dbname=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _where(dsn: str) -> str:
    parts = conninfo_to_dict(dsn)
    return f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"


@contextmanager
def store_table(backend: str) -> Iterator[dict[str, str]]:
    """What a ``[store]`` table needs for ``backend`` besides tmp paths: PostgreSQL gets a fresh
    database (dropped afterwards), SQLite nothing."""
    if backend != "postgresql":
        yield {}
        return
    dsn = admin_dsn()
    require_postgres(dsn)
    with fresh_database(dsn) as database:
        yield {"backend": "postgresql", "dsn": database}
