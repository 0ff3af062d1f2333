"""PostgreSQL store: the writes of a placement held and sent as one statement (no database needed)."""

from __future__ import annotations

from typing import Any

from gateway.store.postgres import _RECENT_TEXT, _FoldedWrites


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    def execute(self, sql: str, params: Any = ()) -> str:
        self.sent.append((sql, list(params)))
        return "cursor"

    def cursor(self) -> str:
        return "a cursor"


def test_writes_wait_for_the_next_read_and_go_as_one_statement() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    folded.execute("INSERT INTO customers (id) VALUES (%s)", ["c1"])
    folded.execute("INSERT INTO identities (customer_id, value) VALUES (%s, %s)", ["c1", "a"])
    folded.execute("INSERT INTO identities (customer_id, value) VALUES (%s, %s)", ["c1", "b"])
    assert conn.sent == []

    assert folded.execute("SELECT 1 FROM threads WHERE customer_id = %s", ["c1"]) == "cursor"
    assert conn.sent == [
        (
            "WITH _w0 AS (INSERT INTO customers (id) VALUES (%s)),"
            " _w1 AS (INSERT INTO identities (customer_id, value) VALUES (%s, %s))"
            " INSERT INTO identities (customer_id, value) VALUES (%s, %s)",
            ["c1", "c1", "a", "c1", "b"],
        ),
        ("SELECT 1 FROM threads WHERE customer_id = %s", ["c1"]),
    ]


def test_a_write_meeting_a_held_one_on_its_table_waits_for_it() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    folded.execute("INSERT INTO threads (id) VALUES (%s)", ["t1"])
    folded.execute("UPDATE threads SET status = 'closed' WHERE id = %s", ["t1"])  # must see t1
    folded.execute("INSERT INTO messages (id) VALUES (%s)", ["m1"])
    folded.execute("INSERT INTO outbox (id) SELECT %s FROM messages", ["e1"])  # reads messages
    folded.flush()
    assert [sql.split(" (")[0] for sql, _ in conn.sent] == [
        "INSERT INTO threads",
        "WITH _w0 AS",  # the update and the message
        "INSERT INTO outbox",
    ]
    assert conn.sent[1][1] == ["t1", "m1"]


def test_what_returns_rows_is_never_held_and_a_with_of_its_own_ends_the_statement() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    folded.execute("INSERT INTO messages (id) VALUES (%s)", ["m1"])
    folded.execute("UPDATE threads SET n = n + 1 WHERE id = %s RETURNING n", ["t1"])
    folded.execute("INSERT INTO idempotency_keys (key) VALUES (%s)", ["k"])
    folded.execute(_RECENT_TEXT, list(range(11)))
    assert [sql[:20] for sql, _ in conn.sent] == [
        "INSERT INTO messages",
        "UPDATE threads SET n",
        "WITH _w0 AS (INSERT ",
    ]
    assert conn.sent[2][0].startswith(
        "WITH _w0 AS (INSERT INTO idempotency_keys (key) VALUES (%s)), capped AS ("
    )
    assert conn.sent[2][1] == ["k", *range(11)]
    assert folded.cursor() == "a cursor"


def test_an_upsert_meeting_one_on_its_table_waits_for_it() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    upsert = "INSERT INTO blob_files (sha256) VALUES (%s) ON CONFLICT (sha256) DO UPDATE SET used_at = now()"
    folded.execute(upsert, ["a"])
    folded.execute(upsert, ["a"])  # one statement could not change the row twice
    folded.flush()
    assert conn.sent == [(upsert, ["a"]), (upsert, ["a"])]
