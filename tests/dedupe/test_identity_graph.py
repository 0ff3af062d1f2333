"""Identity linking: one message's evidence links identities; only verified evidence merges customers."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import orjson
import pytest
from dedupekit import POLICY, T0, msg, types

from core.model import Identity
from dedupe import graph
from dedupe.engine import place
from dedupe.tx import TxWork
from gateway.store.sqlite import SQLiteTx

MAIL = Identity(kind="email", value="ada@example.com", verified=True)
OPENID = Identity(kind="wechat_openid", value="wx1:o-ada", verified=True)
UNIONID = Identity(kind="wechat_unionid", value="u-ada", verified=True)
OPENID2 = Identity(kind="wechat_openid", value="wx2:o-ada", verified=True)


def run(tx: SQLiteTx, work: TxWork[object], now=T0):  # type: ignore[no-untyped-def]
    value, events = work(tx, now)
    return value, list(events)


def test_verified_evidence_merges_existing_customers_into_the_oldest(tx: SQLiteTx) -> None:
    a = place(tx, msg("1", OPENID, UNIONID, channel="wechat"), POLICY, now=T0).placement
    b = place(tx, msg("2", OPENID2, channel="wechat", inbox="other"), POLICY, now=T0).placement
    assert a.customer_id != b.customer_id

    linked = place(tx, msg("3", OPENID2, UNIONID, channel="wechat", inbox="other"), POLICY, now=T0)

    assert linked.placement.customer_id == a.customer_id
    assert types(linked.events) == ["customer.merged"]
    body = orjson.loads(linked.events[0].body)
    assert body["customer"] == {"id": a.customer_id, "merged": [b.customer_id]}
    assert {i["value"] for i in body["merge"]["evidence"]["identities_moved"]} == {"wx2:o-ada"}
    assert linked.customer is not None
    assert {i.value for i in linked.customer.identities} == {"wx1:o-ada", "u-ada", "wx2:o-ada"}
    assert tx.get_customer(b.customer_id).merged_into == a.customer_id


def test_claimed_evidence_records_a_link_and_keeps_customers_apart(tx: SQLiteTx) -> None:
    a = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    b = place(
        tx, msg("2", Identity(kind="phone", value="+41790000002", verified=True)), POLICY, now=T0
    ).placement

    form = msg(
        "3",
        Identity(kind="email", value="ada@example.com"),
        Identity(kind="phone", value="+41790000002"),
        channel="form",
    )
    placed = place(tx, form, POLICY, now=T0)

    assert placed.events == ()
    assert placed.placement.customer_id == a.customer_id  # the first verified identity's customer
    (claimed,) = tx.claimed_links(b.customer_id)
    assert (claimed.customer_id, claimed.other_customer_id) == (a.customer_id, b.customer_id)
    assert tx.get_customer(b.customer_id).merged_into is None
    assert (
        tx.find_identities("acme", [Identity(kind="phone", value="+41790000002")])[0].customer_id
        == b.customer_id
    )


def test_stored_claimed_identity_does_not_merge_even_when_message_verifies_it(tx: SQLiteTx) -> None:
    a = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    # Someone typed this phone into a form: the phone's customer is only a claim.
    b = place(
        tx, msg("2", Identity(kind="phone", value="+41790000003"), channel="form"), POLICY, now=T0
    ).placement

    trusted = msg("3", MAIL, Identity(kind="phone", value="+41790000003", verified=True), channel="api")
    placed = place(tx, trusted, POLICY, now=T0)

    assert placed.events == ()
    assert placed.placement.customer_id == a.customer_id
    assert tx.get_customer(b.customer_id).merged_into is None
    assert len(tx.claimed_links(a.customer_id)) == 1


def test_unmerge_restores_identities_threads_and_emits_unmerged(tx: SQLiteTx) -> None:
    a = place(tx, msg("1", OPENID, UNIONID, channel="wechat"), POLICY, now=T0).placement
    b = place(tx, msg("2", OPENID2, channel="wechat", inbox="other"), POLICY, now=T0).placement
    merged = place(tx, msg("3", OPENID2, UNIONID, channel="wechat", inbox="other"), POLICY, now=T0)
    merge_id = orjson.loads(merged.events[0].body)["merge"]["id"]
    assert tx.get_thread(b.thread_id).customer_id == a.customer_id  # type: ignore[union-attr]

    _record, events = run(tx, graph.undo(merge_id), now=T0 + timedelta(minutes=1))

    assert types(events) == ["customer.unmerged"]
    assert orjson.loads(events[0].body)["merge"]["id"] == merge_id
    assert {i.value for i in tx.customer_identities(b.customer_id)} == {"wx2:o-ada"}
    assert {i.value for i in tx.customer_identities(a.customer_id)} == {"wx1:o-ada", "u-ada"}
    assert tx.get_customer(b.customer_id).merged_into is None
    assert tx.get_thread(b.thread_id).customer_id == b.customer_id  # type: ignore[union-attr]
    later = place(
        tx, msg("4", OPENID2, channel="wechat", inbox="other"), POLICY, now=T0 + timedelta(minutes=2)
    )
    assert later.placement.customer_id == b.customer_id
    with pytest.raises(graph.GraphError) as again:
        run(tx, graph.undo(merge_id))
    assert again.value.code == "already_undone"


def test_desk_link_adds_verified_identities_and_merges_owners(tx: SQLiteTx) -> None:
    a = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    b = place(tx, msg("2", Identity(kind="phone", value="+41790000004")), POLICY, now=T0).placement

    result, events = run(
        tx,
        graph.link(
            a.customer_id,
            identities=[Identity(kind="phone", value="+41 79 000 00 04"), Identity(kind="x", value="12345")],
            evidence={"agent": "sam"},
        ),
    )

    assert result.merge is not None
    assert result.merge.merged_customers == (b.customer_id,)
    assert [i.value for i in result.added] == ["12345"]
    assert types(events) == ["customer.merged"]
    assert orjson.loads(events[0].body)["merge"]["evidence"]["source"] == "desk"
    assert all(i.verified for i in tx.customer_identities(a.customer_id))
    summary, _ = run(tx, graph.customer_summary(b.customer_id))
    assert summary is not None
    assert summary.customer.merged_into == a.customer_id
    assert [m.id for m in summary.merges] == [result.merge.id]


def test_desk_link_of_another_customer_and_unknown_customer(tx: SQLiteTx) -> None:
    a = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    b = place(tx, msg("2", OPENID, channel="wechat"), POLICY, now=T0).placement

    result, events = run(tx, graph.link(a.customer_id, other_customer_id=b.customer_id, evidence={}))

    assert result.merge is not None
    assert types(events) == ["customer.merged"]
    with pytest.raises(graph.GraphError):
        run(tx, graph.link("cus_missing", identities=[MAIL], evidence={}))


def test_thread_status_reports_unknown_threads(tx: SQLiteTx, conn: sqlite3.Connection) -> None:
    a = place(tx, msg("1", MAIL), POLICY, now=T0).placement

    assert run(tx, graph.set_thread_status(a.thread_id, open=False, at=T0))[0] is True
    assert run(tx, graph.set_thread_status("thr_missing", open=False, at=T0))[0] is False
    assert run(tx, graph.set_thread_status(a.thread_id, open=False, at=T0, tenant="other"))[0] is False
    assert conn.execute("SELECT status FROM threads").fetchall() == [("closed",)]
