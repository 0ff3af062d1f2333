from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from dedupekit import memory_tx

from gateway.store.sqlite import SQLiteTx


@pytest.fixture
def db() -> Iterator[tuple[SQLiteTx, sqlite3.Connection]]:
    yield from memory_tx()


@pytest.fixture
def tx(db: tuple[SQLiteTx, sqlite3.Connection]) -> SQLiteTx:
    return db[0]


@pytest.fixture
def conn(db: tuple[SQLiteTx, sqlite3.Connection]) -> sqlite3.Connection:
    return db[1]
