"""Retention and erasure: the SQL both backends run to forget stored content.

Two ways content leaves the store:

- **Retention** (:func:`oldest` and :func:`purge_batch`): rows older than a setting go, oldest
  first, a bounded batch per transaction, so ingest commits between batches. What threading and
  idempotency need stays: idempotency keys have their own retention (``store.idempotency_retention``),
  thread records and customers are kept (small, no message text).
- **Erasure** (:func:`erase_scan` and :func:`erase`): everything a customer said and everything that
  names them (messages, raw bodies, attachment and media files no other customer's message
  needs, identities, merge records, claimed links, recent texts, the outbox events that carry
  them, media fetch records); thread records and the customer row stay as small tombstones
  without text. Idempotency keys become tombstones too: the key is replaced by its SHA-256, so a
  provider's retry of an erased message is still recognised as a repeat and does not bring the
  message back. An audit row keeps who asked, when, the counts and a digest of what went.

The job functions here run inside a store transaction (``conn`` is in one); the backends' store
classes call them and remove blob files after the commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from core.events import MESSAGE_EDITED, MESSAGE_RECEIVED, media_path
from core.model import CanonicalMessage, Placement
from gateway.store.blobs import parse_raw_ref, raw_ref


class Connection(Protocol):
    """The part of a DB-API connection used here (:class:`gateway.store.engine.Connection`)."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def cursor(self) -> Any: ...


class Dialect(Protocol):
    """The part of :class:`gateway.store.engine.Dialect` used here (the engine imports this module)."""

    @property
    def placeholder(self) -> str: ...

    @property
    def serialized(self) -> bool: ...

    @property
    def words(self) -> Mapping[str, str]: ...

    @property
    def oldest_sql(self) -> Mapping[str, str]: ...

    def sql(self, text: str) -> str: ...

    def for_each(self, conn: Any, sql: str, head: Sequence[Any], values: Sequence[Any]) -> int: ...

    def erase_merges(self, conn: Any, customer_ids: Sequence[str]) -> int: ...

    def lock_customers(self, conn: Any, customer_ids: Sequence[str]) -> None: ...

ERASED_KEY_PREFIX = "erased:"
# What retention can remove; "keys" are idempotency keys (store.idempotency_retention).
RetainedKind = Literal["keys", "events", "messages", "raw_bodies", "blobs"]
RETAINED_KINDS: tuple[RetainedKind, ...] = ("keys", "events", "messages", "raw_bodies", "blobs")
_CHUNK = 500  # values per IN list


def erased_key(key: str) -> str:
    """The tombstone an idempotency key becomes when its customer is erased."""
    return ERASED_KEY_PREFIX + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _in(d: Dialect, conn: Connection, sql: str, values: Sequence[Any], head: Sequence[Any] = ()) -> list[Any]:
    """Rows of ``sql`` whose ``(__IN__)`` is the list ``values`` (run in chunks); ``head`` binds first."""
    rows: list[Any] = []
    for start in range(0, len(values), _CHUNK):
        chunk = list(values[start : start + _CHUNK])
        marks = "(" + ", ".join([d.placeholder] * len(chunk)) + ")"
        text = d.sql(sql.replace("(__IN__)", "(?)")).replace(f"({d.placeholder})", marks, 1)
        rows += conn.execute(text, [*head, *chunk]).fetchall()
    return rows


def _delete_in(d: Dialect, conn: Connection, sql: str, values: Sequence[Any]) -> int:
    """Run ``DELETE ... WHERE col {each}`` for ``values``; rows deleted."""
    return d.for_each(conn, sql, (), list(values)) if values else 0


# -- recording what a message's content is ---------------------------------------------------------


def record_content(
    d: Dialect, conn: Connection, message: CanonicalMessage, placement: Placement, raw_digest: str
) -> None:
    """Name a newly placed message's raw body, attachments and media (``message_content``)."""
    rows = [(placement.message_id, "raw", raw_digest)]
    rows += [(placement.message_id, "blob", a.sha256) for a in message.attachments]
    rows += [
        (placement.message_id, "media", media_path(message.channel, message.inbox, m.ref))
        for m in message.media
    ]
    sql = d.sql("INSERT INTO message_content (message_id, kind, ref) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
    if len(rows) == 1:
        # The usual case (a message with no attachment or media): no cursor of its own.
        conn.execute(sql, rows[0])
        return
    cur = conn.cursor()
    try:
        cur.executemany(sql, rows)
    finally:
        cur.close()


# -- retention -----------------------------------------------------------------------------------


def oldest(d: Dialect, conn: Connection, kind: str, before: Any, limit: int) -> list[Any]:
    """Keys of up to ``limit`` rows of ``kind`` older than ``before`` (a stored time), oldest first
    (``raw_bodies_files``: raw bodies kept as files)."""
    return [row[0] for row in conn.execute(d.sql(d.oldest_sql[kind]), (before, limit)).fetchall()]


@dataclass(slots=True)
class Purged:
    """One retention batch: rows removed, and the blob files to remove once it is committed."""

    rows: int = 0
    files: list[str] = field(default_factory=list)


def purge_batch(d: Dialect, conn: Connection, kind: RetainedKind, before: Any, limit: int) -> Purged:
    """Remove one batch of ``kind`` older than ``before``; see :class:`Purged`."""
    purged = Purged()
    if kind == "keys":
        purged.rows = _delete_in(
            d, conn, "DELETE FROM idempotency_keys WHERE key {each}", oldest(d, conn, kind, before, limit)
        )
    elif kind == "events":
        positions = oldest(d, conn, kind, before, limit)
        purged.rows = _delete_in(
            d, conn, "DELETE FROM outbox WHERE published_at IS NOT NULL AND position {each}", positions
        )
    elif kind == "messages":
        ids = oldest(d, conn, kind, before, limit)
        _delete_in(d, conn, "DELETE FROM message_content WHERE message_id {each}", ids)
        # What answering a message needs (gateway.store.replies) goes with the message.
        _delete_in(d, conn, "DELETE FROM reply_routes WHERE message_id {each}", ids)
        purged.rows = _delete_in(d, conn, "DELETE FROM messages WHERE message_id {each}", ids)
        # Replies sent or failed for good as long ago, with their delivery reports.
        done = oldest(d, conn, "replies", before, limit)
        _delete_in(d, conn, "DELETE FROM reply_reports WHERE reply_id {each}", done)
        purged.rows += _delete_in(d, conn, "DELETE FROM replies WHERE id {each}", done)
    elif kind == "raw_bodies":
        inline = _unquarantined(d, conn, oldest(d, conn, kind, before, limit))
        purged.rows = _delete_in(d, conn, "DELETE FROM raw_archive WHERE sha256 {each}", inline)
        files = _unquarantined(d, conn, oldest(d, conn, "raw_bodies_files", before, limit))
        purged.rows += _delete_in(d, conn, "DELETE FROM blob_files WHERE sha256 {each}", files)
        purged.files = files
    elif kind == "blobs":
        files = oldest(d, conn, kind, before, limit)
        purged.rows = _delete_in(d, conn, "DELETE FROM blob_files WHERE sha256 {each}", files)
        _delete_in(d, conn, "DELETE FROM media WHERE sha256 {each}", files)
        if len(files) < limit:  # the last batch: fetches that failed for good, as old
            conn.execute(d.sql("DELETE FROM media WHERE state = 'failed' AND created_at < ?"), (before,))
        purged.files = files
    else:  # pragma: no cover - typed
        raise ValueError(kind)
    return purged


def _unquarantined(d: Dialect, conn: Connection, digests: Sequence[str]) -> list[str]:
    """``digests`` without those a quarantined envelope still needs (replay reads them)."""
    if not digests:
        return []
    held = {
        parse_raw_ref(r[0])
        for r in _in(
            d, conn, "SELECT raw_ref FROM quarantine WHERE raw_ref IN (__IN__)", [raw_ref(x) for x in digests]
        )
    }
    return [x for x in digests if x not in held]


# -- erasure -------------------------------------------------------------------------------------


@dataclass(slots=True)
class Scope:
    """Whom an erasure covers and what names them; found again inside the erasing transaction."""

    tenant: str
    customer_id: str  # the surviving customer (merges followed)
    customers: list[str]  # it and every customer merged into it
    threads: list[str]
    needles: list[bytes]  # byte strings whose presence in an outbox event names the customer
    values: list[str] = field(default_factory=list)  # identity values

    def same(self, other: Scope) -> bool:
        return (self.customers, self.threads, self.needles) == (other.customers, other.threads, other.needles)


@dataclass(slots=True)
class Scan:
    """What the read-only pass found (outbox rows and keys are found by scanning, off the writer)."""

    scope: Scope
    outbox_until: int  # outbox positions up to here were scanned
    positions: list[int]
    keys: list[str]
    scanned_at: Any  # a stored time: keys claimed since are looked for again


def find_scope(d: Dialect, conn: Connection, customer_id: str, tenant: str | None) -> Scope | None:
    """The customer (followed to the one it was merged into), within ``tenant`` when given."""
    current = customer_id
    for _ in range(64):  # merge chains are short; a cycle would be a bug, not a reason to hang
        row = conn.execute(
            d.sql("SELECT tenant, merged_into FROM customers WHERE id = ?"), (current,)
        ).fetchone()
        if row is None or (tenant is not None and row[0] != tenant):
            return None
        if row[1] is None:
            break
        current = row[1]
    customers = [current]
    frontier = [current]
    while frontier:
        found = [
            r[0] for r in _in(d, conn, "SELECT id FROM customers WHERE merged_into IN (__IN__)", frontier)
        ]
        frontier = [c for c in found if c not in customers]
        customers += frontier
    customers.sort()
    threads = sorted(
        r[0] for r in _in(d, conn, "SELECT id FROM threads WHERE customer_id IN (__IN__)", customers)
    )
    values = sorted(
        {r[0] for r in _in(d, conn, "SELECT value FROM identities WHERE customer_id IN (__IN__)", customers)}
    )
    # As the values appear inside a JSON event body (orjson writes UTF-8, escapes quotes).
    needles = [c.encode() for c in customers] + [orjson.dumps(v)[1:-1] for v in values if len(v) >= 3]
    return Scope(
        tenant=str(row[0]), customer_id=current, customers=customers, threads=threads, needles=needles,
        values=values,
    )  # fmt: skip


def _outbox_matches(d: Dialect, conn: Connection, scope: Scope, after: int) -> tuple[list[int], int]:
    """Outbox positions after ``after`` whose event belongs to the scope's threads or names it; and
    the last position looked at."""
    (until,) = conn.execute(d.sql("SELECT coalesce(max(position), 0) FROM outbox")).fetchone()
    found: set[int] = set()
    if scope.threads:
        found |= {
            r[0]
            for r in _in(
                d,
                conn,
                "SELECT position FROM outbox WHERE position > ? AND position <= ? AND thread_id IN (__IN__)",
                scope.threads,
                (after, until),
            )
        }
    # Events of no thread (merges, unmerges) that name them. Another customer's message that merely
    # mentions their address is that customer's message: it is neither withheld nor changed.
    for start in range(0, len(scope.needles), 50):
        needles = scope.needles[start : start + 50]
        test = " OR ".join([d.words["contains"]] * len(needles))
        sql = d.sql(
            "SELECT position FROM outbox WHERE position > ? AND position <= ? AND thread_id IS NULL"  # noqa: S608
            f" AND ({test})"
        )
        found |= {r[0] for r in conn.execute(sql, [after, until, *needles]).fetchall()}
    return sorted(found), int(until)


def erase_scan(d: Dialect, conn: Connection, customer_id: str, tenant: str | None, now: Any) -> Scan | None:
    """The read-only pass of an erasure: scans the outbox and the idempotency keys."""
    scope = find_scope(d, conn, customer_id, tenant)
    if scope is None:
        return None
    positions, until = _outbox_matches(d, conn, scope, 0)
    keys = [
        r[0]
        for r in _in(
            d, conn, "SELECT key FROM idempotency_keys WHERE customer_id IN (__IN__)", scope.customers
        )
    ]
    return Scan(scope=scope, outbox_until=until, positions=positions, keys=keys, scanned_at=now)


@dataclass(slots=True)
class Erased:
    """What the erasing transaction removed: counts, the manifest's digest, files to remove."""

    scope: Scope
    counts: dict[str, int]
    digest: str
    files: list[str]
    unpublished: int  # unpublished outbox rows removed (the backlog count falls by as many)


def erase(d: Dialect, conn: Connection, scan: Scan, now: Any) -> Erased:
    """Erase inside one transaction; ``scan`` is the read-only pass (redone here if a merge changed
    whom it covers meanwhile)."""
    # Placements lock their customers (dedupe.tx): holding the locks, no message of this customer
    # commits meanwhile, and one that committed before is seen by every statement below.
    d.lock_customers(conn, scan.scope.customers)
    scope = find_scope(d, conn, scan.scope.customer_id, scan.scope.tenant)
    if scope is None:  # pragma: no cover - customers are never deleted
        scope = scan.scope
    joined = [c for c in scope.customers if c not in scan.scope.customers]
    if joined:
        d.lock_customers(conn, joined)
    if not scope.same(scan.scope):
        scan = erase_scan(d, conn, scope.customer_id, scope.tenant, scan.scanned_at) or scan
        scope = scan.scope
    # Only the rows added since the scan, when one writer commits them in position order (SQLite);
    # with concurrent writers (PostgreSQL) a lower position may have committed after the scan.
    later, _ = _outbox_matches(d, conn, scope, scan.outbox_until if d.serialized else 0)
    positions = sorted(set(scan.positions) | set(later))
    keys = set(scan.keys) | {
        r[0]
        for r in _in(
            d,
            conn,
            "SELECT key FROM idempotency_keys WHERE created_at >= ? AND customer_id IN (__IN__)",
            scope.customers,
            (scan.scanned_at,),
        )
    }
    if not d.serialized:  # a claim that began before the scan may have committed after it
        sql = "SELECT key FROM idempotency_keys WHERE customer_id IN (__IN__)"
        keys |= {r[0] for r in _in(d, conn, sql, scope.customers)}
    keys = {k for k in keys if not k.startswith(ERASED_KEY_PREFIX)}

    messages = sorted(
        r[0]
        for r in _in(d, conn, "SELECT message_id FROM messages WHERE thread_id IN (__IN__)", scope.threads)
    )
    content = {
        (r[0], r[1])
        for r in _in(d, conn, "SELECT kind, ref FROM message_content WHERE message_id IN (__IN__)", messages)
    }
    # Messages stored before message_content existed: their events name their content.
    bodies = _in(d, conn, "SELECT type, body FROM outbox WHERE position IN (__IN__)", positions)
    for event_type, body in bodies:
        if event_type in (MESSAGE_RECEIVED, MESSAGE_EDITED):
            content |= _content_of_event(bytes(body))
    media_keys = sorted(ref for kind, ref in content if kind == "media")
    digests = {ref for kind, ref in content if kind != "media"}
    digests |= {
        r[0]
        for r in _in(
            d, conn, "SELECT sha256 FROM media WHERE sha256 IS NOT NULL AND key IN (__IN__)", media_keys
        )
    }
    shared = _still_needed(d, conn, sorted(digests), messages, media_keys)
    gone = sorted(digests - shared)

    counts: dict[str, int] = {}
    unpublished = len(
        _in(
            d,
            conn,
            "SELECT position FROM outbox WHERE published_at IS NULL AND position IN (__IN__)",
            positions,
        )
    )
    counts["events"] = _delete_in(d, conn, "DELETE FROM outbox WHERE position {each}", positions)
    counts["raw_bodies"] = _delete_in(d, conn, "DELETE FROM raw_archive WHERE sha256 {each}", gone)
    files = [r[0] for r in _in(d, conn, "SELECT sha256 FROM blob_files WHERE sha256 IN (__IN__)", gone)]
    counts["files"] = _delete_in(d, conn, "DELETE FROM blob_files WHERE sha256 {each}", files)
    counts["media"] = _delete_in(d, conn, "DELETE FROM media WHERE key {each}", media_keys)
    _delete_in(d, conn, "DELETE FROM message_content WHERE message_id {each}", messages)
    counts["messages"] = _delete_in(d, conn, "DELETE FROM messages WHERE message_id {each}", messages)
    counts["identities"] = _delete_in(
        d, conn, "DELETE FROM identities WHERE customer_id {each}", scope.customers
    )
    counts["recent_texts"] = _delete_in(
        d, conn, "DELETE FROM recent_texts WHERE customer_id {each}", scope.customers
    )
    _delete_in(d, conn, "DELETE FROM thread_keys WHERE thread_id {each}", scope.threads)
    # The reply ledger: routes (identities), commands (the desk's text to the customer, pending ones
    # included: nothing is sent to an erased customer) and providers' reports.
    _delete_in(d, conn, "DELETE FROM reply_routes WHERE customer_id {each}", scope.customers)
    _delete_in(d, conn, "DELETE FROM reply_routes WHERE thread_id {each}", scope.threads)
    replies = sorted(
        {r[0] for r in _in(d, conn, "SELECT id FROM replies WHERE customer_id IN (__IN__)", scope.customers)}
        | {r[0] for r in _in(d, conn, "SELECT id FROM replies WHERE thread_id IN (__IN__)", scope.threads)}
    )
    _delete_in(d, conn, "DELETE FROM reply_reports WHERE reply_id {each}", replies)
    counts["replies"] = _delete_in(d, conn, "DELETE FROM replies WHERE id {each}", replies)
    counts["threads"] = (
        d.for_each(
            conn, "UPDATE threads SET subject = NULL, status = 'closed' WHERE id {each}", (), scope.threads
        )
        if scope.threads
        else 0
    )
    counts["merges"] = d.erase_merges(conn, scope.customers)
    counts["state"] = _erase_state(d, conn, scope)
    counts["links"] = _delete_in(
        d, conn, "DELETE FROM claimed_links WHERE customer_id {each}", scope.customers
    )
    counts["links"] += _delete_in(
        d, conn, "DELETE FROM claimed_links WHERE other_customer_id {each}", scope.customers
    )
    for key in sorted(keys):
        conn.execute(
            d.sql("UPDATE idempotency_keys SET key = ?, fingerprint = NULL WHERE key = ?"),
            (erased_key(key), key),
        )
    counts["keys"] = len(keys)
    d.for_each(
        conn,
        "UPDATE customers SET display_name = NULL, erased_at = ? WHERE id {each}",
        (now,),
        scope.customers,
    )
    counts["customers"] = len(scope.customers)
    manifest = orjson.dumps(
        {"customers": scope.customers, "threads": scope.threads, "messages": messages, "blobs": gone,
         "media": media_keys, "events": positions, "replies": replies,
         "keys": sorted(erased_key(k) for k in keys)}
    )  # fmt: skip
    return Erased(
        scope=scope,
        counts=counts,
        digest=hashlib.sha256(manifest).hexdigest(),
        files=files,
        unpublished=unpublished,
    )


def _state_names(scope: Scope) -> list[str]:
    """What marks a connector-state key as this customer's: their ids and thread ids (opaque, so
    exact), their identity values and, for values such as ``app_id:openid``, the part after the
    colon (connectors key by it: ``unionid/{app_id}/{openid}``) when long enough not to be common."""
    names = {*scope.customers, *scope.threads}
    for value in scope.values:
        names.add(value)
        tail = value.split(":", 1)[-1]
        if len(tail) >= 8:
            names.add(tail)
    return sorted(n for n in names if len(n) >= 8)


def _erase_state(d: Dialect, conn: Connection, scope: Scope) -> int:
    """Delete connector state keyed by the customer (a web-chat visitor's held replies, a WeChat
    unionid lookup, a reply's send record); state shared by many customers is the channel's."""
    keys = [r[0] for r in conn.execute(d.sql("SELECT key FROM state")).fetchall()]
    names = _state_names(scope)
    theirs = [k for k in keys if any(n in k for n in names)]
    return _delete_in(d, conn, "DELETE FROM state WHERE key {each}", theirs)


def _content_of_event(body: bytes) -> set[tuple[str, str]]:
    """(kind, ref) of the raw body, attachments and media a message event names."""
    try:
        event = orjson.loads(body)
        message = event["message"]
        found: set[tuple[str, str]] = set()
        digest = parse_raw_ref(str((event.get("provenance") or {}).get("raw_ref") or ""))
        if digest is not None:
            found.add(("raw", digest))
        for attachment in message.get("attachments") or ():
            found.add(("blob", str(attachment["sha256"])))
        for media in message.get("media") or ():
            found.add(
                ("media", media_path(str(message["channel"]), str(message["inbox"]), str(media["ref"])))
            )
        return found
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return set()


def _still_needed(
    d: Dialect, conn: Connection, digests: Sequence[str], messages: Sequence[str], media_keys: Sequence[str]
) -> set[str]:
    """Those of ``digests`` another message, another media record or a quarantined envelope names."""
    mine = set(messages)
    needed = {
        r[0]
        for r in _in(d, conn, "SELECT ref, message_id FROM message_content WHERE ref IN (__IN__)", digests)
        if r[1] not in mine
    }
    own_media = set(media_keys)
    needed |= {
        r[0]
        for r in _in(d, conn, "SELECT sha256, key FROM media WHERE sha256 IN (__IN__)", digests)
        if r[1] not in own_media
    }
    needed |= {
        d_
        for r in _in(
            d, conn, "SELECT raw_ref FROM quarantine WHERE raw_ref IN (__IN__)", [raw_ref(x) for x in digests]
        )
        if (d_ := parse_raw_ref(r[0])) is not None
    }
    return needed


def audit_row(erased: Erased, erasure_id: str, requested_by: str | None) -> tuple[Any, ...]:
    """The erasures row's values but the time: id, tenant, customer, requested_by, counts, digest."""
    return (
        erasure_id,
        erased.scope.tenant,
        erased.scope.customer_id,
        requested_by,
        orjson.dumps(erased.counts).decode(),
        erased.digest,
    )
