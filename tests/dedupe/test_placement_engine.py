"""The placement engine against the SQLite store's Tx on an in-memory database."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import timedelta

import pytest
from dedupekit import POLICY, T0, msg, types

from core.model import Identity
from dedupe.engine import new_id, place
from gateway.store.sqlite import SQLiteTx

EMAIL = Identity(kind="email", value="ada@example.com", verified=True)
PHONE = Identity(kind="phone", value="+41790000001")


def owner(conn: sqlite3.Connection, kind: str, value: str) -> str:
    return str(
        conn.execute(
            "SELECT customer_id FROM identities WHERE kind = ? AND value = ?", (kind, value)
        ).fetchone()[0]
    )


def test_first_message_creates_customer_thread_and_sequence_one(
    tx: SQLiteTx, conn: sqlite3.Connection
) -> None:
    placed = place(tx, msg("<a@x>", EMAIL, PHONE, name="Ada"), POLICY, now=T0)

    p = placed.placement
    assert (p.sequence, p.is_new_thread, p.duplicate, p.duplicate_of) == (1, True, False, None)
    assert p.customer_id.startswith("cus_")
    assert p.thread_id.startswith("thr_")
    assert placed.customer is not None
    assert placed.customer.display_name == "Ada"
    assert set(placed.customer.identities) == {EMAIL, PHONE}
    assert placed.thread_subject == "subject of <a@x>"
    assert placed.events == ()
    thread = tx.get_thread(p.thread_id)
    assert thread is not None
    assert thread.number == 1
    assert conn.execute("SELECT rfc822_message_id FROM messages").fetchall() == [("<a@x>",)]


def test_a_new_customer_is_not_searched_for_recent_texts_threads_or_identities(
    tx: SQLiteTx, monkeypatch: pytest.MonkeyPatch
) -> None:
    def none_yet(*args: object, **kwargs: object) -> None:
        raise AssertionError("a customer created by this placement has none")

    for read in ("recent_texts", "open_threads", "customer_thread_ids", "customer_identities"):
        monkeypatch.setattr(tx, read, none_yet)
    text = "My parcel has not arrived and the tracking page shows nothing at all."

    placed = place(tx, msg("<a@x>", PHONE, EMAIL, text=text), POLICY, now=T0)

    assert (placed.placement.sequence, placed.placement.is_new_thread) == (1, True)
    assert placed.customer is not None
    assert placed.customer.identities == (EMAIL, PHONE)  # as read back: by kind, then value
    monkeypatch.undo()
    assert tx.customer_identities(placed.placement.customer_id) == placed.customer.identities


def test_repeat_returns_first_placement_as_duplicate(tx: SQLiteTx, conn: sqlite3.Connection) -> None:
    first = place(tx, msg("<a@x>", EMAIL), POLICY, now=T0).placement
    again = place(tx, msg("<a@x>", EMAIL), POLICY, now=T0 + timedelta(seconds=5))

    assert again.placement == dataclasses.replace(first, duplicate=True)
    assert again.customer is None
    assert conn.execute("SELECT count(*) FROM messages").fetchone() == (1,)


def test_known_identity_resolves_customer_and_attaches_new_ones(tx: SQLiteTx) -> None:
    first = place(tx, msg("1", PHONE, name="Ada"), POLICY, now=T0).placement
    second = place(tx, msg("2", PHONE, EMAIL, name="Someone else"), POLICY, now=T0)

    assert second.placement.customer_id == first.customer_id
    assert second.customer is not None
    assert second.customer.display_name == "Ada"
    assert set(second.customer.identities) == {PHONE, EMAIL}


def test_display_name_is_filled_when_missing(tx: SQLiteTx) -> None:
    place(tx, msg("1", PHONE), POLICY, now=T0)
    second = place(tx, msg("2", PHONE, name="Ada"), POLICY, now=T0)

    assert second.customer is not None
    assert second.customer.display_name == "Ada"


def test_claimed_identity_becomes_verified_when_proved(tx: SQLiteTx) -> None:
    claimed = Identity(kind="email", value="ada@example.com", verified=False)
    place(tx, msg("1", claimed), POLICY, now=T0)
    second = place(tx, msg("2", EMAIL), POLICY, now=T0)

    assert second.customer is not None
    assert second.customer.identities == (EMAIL,)


def test_identities_are_normalised_before_matching(tx: SQLiteTx) -> None:
    first = place(tx, msg("1", Identity(kind="email", value="Ada@Bücher.DE", verified=True)), POLICY, now=T0)
    second = place(
        tx, msg("2", Identity(kind="email", value="ada@xn--bcher-kva.de", verified=True)), POLICY, now=T0
    )

    assert second.placement.customer_id == first.placement.customer_id
    assert second.customer is not None
    assert [i.value for i in second.customer.identities] == ["ada@bücher.de"]


def test_whatsapp_id_links_the_phone_customer(tx: SQLiteTx) -> None:
    called = place(tx, msg("1", Identity(kind="phone", value="+41790000001")), POLICY, now=T0).placement
    wa = place(
        tx,
        msg("2", Identity(kind="whatsapp", value="41790000001", verified=True), channel="whatsapp"),
        POLICY,
        now=T0,
    )

    assert wa.placement.customer_id == called.customer_id


def test_message_without_identities_gets_its_own_customer(tx: SQLiteTx) -> None:
    a = place(tx, msg("1"), POLICY, now=T0).placement
    b = place(tx, msg("2"), POLICY, now=T0).placement

    assert a.customer_id != b.customer_id


def test_same_display_name_never_links_customers(tx: SQLiteTx) -> None:
    a = place(
        tx,
        msg("1", Identity(kind="email", value="wang@a.cn", verified=True), name="Wang Wei"),
        POLICY,
        now=T0,
    )
    b = place(
        tx,
        msg("2", Identity(kind="email", value="wang@b.cn", verified=True), name="Wang Wei"),
        POLICY,
        now=T0,
    )

    assert a.placement.customer_id != b.placement.customer_id
    assert a.placement.thread_id != b.placement.thread_id


def test_new_ids_are_prefixed_and_time_ordered() -> None:
    ids = [new_id("thr") for _ in range(100)]

    assert ids == sorted(ids)
    assert all(i.startswith("thr_") and len(i) == 36 for i in ids)


def test_no_merge_events_on_plain_placement(tx: SQLiteTx) -> None:
    place(tx, msg("1", EMAIL), POLICY, now=T0)
    assert types(place(tx, msg("2", EMAIL), POLICY, now=T0).events) == []
