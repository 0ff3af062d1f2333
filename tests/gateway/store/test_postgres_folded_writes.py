"""PostgreSQL store: the writes of a placement held and sent as one statement (no database needed)."""

from __future__ import annotations

from typing import Any

from gateway.store.postgres import _RECENT_TEXT, _FoldedWrites, _numbered


class Recorder:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[Any]]] = []

    def execute(self, sql: str, params: Any = ()) -> str:
        self.sent.append((sql, list(params)))
        return "cursor"

    def cursor(self) -> str:
        return "a cursor"


def test_writes_wait_for_the_next_read_and_go_with_it() -> None:
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
            " _w1 AS (INSERT INTO identities (customer_id, value) VALUES (%s, %s)),"
            " _w2 AS (INSERT INTO identities (customer_id, value) VALUES (%s, %s))"
            " SELECT 1 FROM threads WHERE customer_id = %s",
            ["c1", "c1", "a", "c1", "b", "c1"],
        ),
    ]


def test_a_read_of_a_held_writes_table_or_one_that_locks_goes_after_them() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    folded.execute("INSERT INTO customers (id) VALUES (%s)", ["c1"])
    folded.execute("SELECT id FROM customers WHERE id = %s", ["c1"])  # must see c1
    folded.execute("INSERT INTO threads (id) VALUES (%s)", ["t1"])
    folded.execute("SELECT id FROM customers WHERE id = %s FOR UPDATE", ["c1"])  # may wait for a lock
    assert conn.sent == [
        ("INSERT INTO customers (id) VALUES (%s)", ["c1"]),
        ("SELECT id FROM customers WHERE id = %s", ["c1"]),
        ("INSERT INTO threads (id) VALUES (%s)", ["t1"]),
        ("SELECT id FROM customers WHERE id = %s FOR UPDATE", ["c1"]),
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


def test_what_returns_rows_is_never_held_and_a_recent_texts_with_goes_with_the_others() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    folded.execute("INSERT INTO messages (id) VALUES (%s)", ["m1"])
    folded.execute("UPDATE threads SET n = n + 1 WHERE id = %s RETURNING n", ["t1"])
    folded.execute(_RECENT_TEXT, list(range(11)))
    folded.execute("INSERT INTO idempotency_keys (key) VALUES (%s)", ["k"])
    assert [sql[:40] for sql, _ in conn.sent] == ["WITH _w0 AS (INSERT INTO messages (id) V"]
    assert conn.sent[0][0].endswith(") UPDATE threads SET n = n + 1 WHERE id = %s RETURNING n")
    assert folded.cursor() == "a cursor"
    assert conn.sent[1][0].startswith("WITH capped AS (DELETE FROM recent_texts WHERE ")
    assert ", _w0 AS (INSERT INTO recent_texts " in conn.sent[1][0]
    assert conn.sent[1][0].endswith(") INSERT INTO idempotency_keys (key) VALUES (%s)")
    assert conn.sent[1][1] == [*range(11), "k"]


def test_an_upsert_meeting_one_on_its_table_waits_for_it() -> None:
    conn = Recorder()
    folded = _FoldedWrites(conn)
    upsert = "INSERT INTO blob_files (sha256) VALUES (%s) ON CONFLICT (sha256) DO UPDATE SET used_at = now()"
    folded.execute(upsert, ["a"])
    folded.execute(upsert, ["a"])  # one statement could not change the row twice
    folded.flush()
    assert conn.sent == [(upsert, ["a"]), (upsert, ["a"])]


def test_a_statement_of_several_parts_goes_with_postgresqls_own_placeholders() -> None:
    # Sent through psycopg's raw cursor, which does not parse it (psycopg would, every time).
    assert _numbered("WITH _w0 AS (INSERT INTO t (a, b) VALUES (%s, %s)) SELECT '100%%', %s") == (
        "WITH _w0 AS (INSERT INTO t (a, b) VALUES ($1, $2)) SELECT '100%', $3"
    )


def test_two_events_never_go_in_one_statement() -> None:
    # The parts of a statement run in no set order: the second event could take the earlier
    # outbox position.
    conn = Recorder()
    folded = _FoldedWrites(conn)
    folded.execute("INSERT INTO outbox (event_id) VALUES (%s)", ["e1"])
    folded.execute("INSERT INTO outbox (event_id) VALUES (%s)", ["e2"])
    folded.execute("INSERT INTO messages (id) VALUES (%s)", ["m1"])
    folded.flush()
    assert conn.sent == [
        ("INSERT INTO outbox (event_id) VALUES (%s)", ["e1"]),
        (
            "WITH _w0 AS (INSERT INTO outbox (event_id) VALUES (%s)) INSERT INTO messages (id) VALUES (%s)",
            ["e2", "m1"],
        ),
    ]
