"""Thread assignment: references, closed threads, thread merges, window, duplicate touchpoints."""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import timedelta

import orjson
from dedupekit import POLICY, T0, msg, types

from core.model import Identity
from dedupe import graph
from dedupe.engine import place
from dedupe.tx import RECENT_TEXTS_KEPT, RecentText
from gateway.store.sqlite import SQLiteTx

MAIL = Identity(kind="email", value="ada@example.com", verified=True)
PHONE = Identity(kind="phone", value="+41790000001", verified=True)
BOB = Identity(kind="email", value="bob@example.com", verified=True)
DAY = timedelta(days=1)
COMPLAINT = "My order 1234 arrived broken, the screen is cracked. Please send a replacement."


def test_window_decides_between_same_and_new_thread(tx: SQLiteTx) -> None:
    first = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    inside = place(tx, msg("2", MAIL), POLICY, now=T0 + timedelta(seconds=3600)).placement
    still = place(tx, msg("3", MAIL), POLICY, now=T0 + timedelta(seconds=7000)).placement
    outside = place(tx, msg("4", MAIL), POLICY, now=T0 + timedelta(seconds=7000 + 3601)).placement

    assert (inside.thread_id, inside.sequence, inside.is_new_thread) == (first.thread_id, 2, False)
    assert (still.thread_id, still.sequence) == (first.thread_id, 3)
    assert (outside.sequence, outside.is_new_thread) == (1, True)
    assert outside.thread_id != first.thread_id


def test_in_reply_to_after_the_window_joins_the_original_thread(tx: SQLiteTx) -> None:
    first = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    other = place(tx, msg("q2@ada", MAIL), POLICY, now=T0 + DAY).placement  # a new thread, later
    reply = place(tx, msg("r1@ada", MAIL, in_reply_to="q1@ada"), POLICY, now=T0 + 2 * DAY).placement
    by_refs = place(
        tx, msg("r2@ada", MAIL, references=("q1@ada", "zz@x")), POLICY, now=T0 + 2 * DAY
    ).placement

    assert other.thread_id != first.thread_id
    assert (reply.thread_id, reply.is_new_thread, reply.sequence) == (first.thread_id, False, 2)
    assert by_refs.thread_id == first.thread_id


def test_reply_from_another_address_still_joins_by_reference(tx: SQLiteTx) -> None:
    first = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    reply = place(tx, msg("r1@bob", BOB, in_reply_to="q1@ada"), POLICY, now=T0 + 3 * DAY).placement

    assert reply.thread_id == first.thread_id
    assert reply.customer_id != first.customer_id


def test_ticket_reference_in_text_of_another_channel(tx: SQLiteTx) -> None:
    first = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    number = tx.get_thread(first.thread_id).number  # type: ignore[union-attr]
    chat = msg("c1", PHONE, channel="whatsapp", inbox="wa", text=f"About [#TG-{number}] again", subject=None)

    placed = place(tx, chat, POLICY, now=T0 + 5 * DAY).placement

    assert placed.thread_id == first.thread_id
    email_ref = place(tx, msg("q9@ada", MAIL, thread_ref=f"ticket:{number}"), POLICY, now=T0 + 9 * DAY)
    assert email_ref.placement.thread_id == first.thread_id


def test_channel_thread_key_is_scoped_to_channel_and_inbox(tx: SQLiteTx) -> None:
    slack = Identity(kind="slack", value="t1:u1", verified=True)
    first = place(
        tx, msg("s1", slack, channel="slack", thread_ref="1700000000.0001"), POLICY, now=T0
    ).placement
    same = place(tx, msg("s2", slack, channel="slack", thread_ref="1700000000.0001"), POLICY, now=T0 + DAY)
    elsewhere = place(
        tx,
        msg("s3", slack, channel="slack", inbox="other", thread_ref="1700000000.0001"),
        POLICY,
        now=T0 + DAY,
    )

    assert same.placement.thread_id == first.thread_id
    assert elsewhere.placement.thread_id != first.thread_id


def test_reference_to_a_closed_thread_opens_a_new_one_that_refers_to_it(tx: SQLiteTx) -> None:
    first = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    graph.set_thread_status(first.thread_id, open=False, at=T0)(tx, T0)

    again = place(
        tx, msg("r1@ada", MAIL, in_reply_to="q1@ada"), POLICY, now=T0 + timedelta(minutes=1)
    ).placement
    later = place(
        tx, msg("r2@ada", MAIL, in_reply_to="q1@ada"), POLICY, now=T0 + timedelta(minutes=2)
    ).placement
    window = place(tx, msg("n1@ada", MAIL), POLICY, now=T0 + timedelta(minutes=3)).placement

    assert (again.is_new_thread, again.previous_thread_id) == (True, first.thread_id)
    # A second reply to the old mail goes to the thread that continues it, not to a third one.
    assert (later.thread_id, later.is_new_thread) == (again.thread_id, False)
    assert window.thread_id == again.thread_id


def test_message_after_close_opens_a_new_thread_and_reopen_joins_again(tx: SQLiteTx) -> None:
    first = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    graph.set_thread_status(first.thread_id, open=False, at=T0)(tx, T0)
    after = place(tx, msg("2", MAIL), POLICY, now=T0 + timedelta(minutes=1)).placement
    assert after.thread_id != first.thread_id

    graph.set_thread_status(after.thread_id, open=False, at=T0)(tx, T0)
    graph.set_thread_status(first.thread_id, open=True, at=T0 + timedelta(minutes=2))(tx, T0)
    reopened = place(tx, msg("3", MAIL), POLICY, now=T0 + timedelta(minutes=3)).placement
    assert reopened.thread_id == first.thread_id


def test_message_after_close_refers_to_the_closed_thread_the_window_would_have_joined(tx: SQLiteTx) -> None:
    first = place(tx, msg("1", MAIL), POLICY, now=T0).placement
    elsewhere = place(tx, msg("e", MAIL, inbox="billing"), POLICY, now=T0).placement
    graph.set_thread_status(first.thread_id, open=False, at=T0)(tx, T0)
    graph.set_thread_status(elsewhere.thread_id, open=False, at=T0)(tx, T0)

    after = place(tx, msg("2", MAIL), POLICY, now=T0 + timedelta(minutes=1)).placement
    graph.set_thread_status(after.thread_id, open=False, at=T0)(tx, T0)
    # Past the window of the closed thread: a plain new thread, no predecessor.
    late = place(tx, msg("3", MAIL), POLICY, now=T0 + timedelta(minutes=1, seconds=3601)).placement

    assert (after.is_new_thread, after.previous_thread_id) == (True, first.thread_id)
    assert (late.is_new_thread, late.previous_thread_id) == (True, None)


def test_auto_reply_to_a_closed_thread_does_not_open_one(tx: SQLiteTx) -> None:
    first = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    graph.set_thread_status(first.thread_id, open=False, at=T0)(tx, T0)

    ooo = place(
        tx, msg("o1@ada", MAIL, in_reply_to="q1@ada", auto_generated="auto-reply"), POLICY, now=T0
    ).placement
    unreferenced = place(tx, msg("o2@ada", MAIL, auto_generated="bounce"), POLICY, now=T0).placement

    assert (ooo.thread_id, ooo.is_new_thread) == (first.thread_id, False)
    # Without a reference an auto-generated message is placed like any other (a desk must see a bounce).
    assert unreferenced.is_new_thread


def test_reference_to_two_open_threads_merges_them_into_the_lower_number(tx: SQLiteTx) -> None:
    a = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    b = place(tx, msg("q2@ada", MAIL, inbox="billing"), POLICY, now=T0).placement
    number_b = tx.get_thread(b.thread_id).number  # type: ignore[union-attr]

    both = place(
        tx, msg("r@ada", MAIL, in_reply_to="q1@ada", thread_ref=f"ticket:{number_b}"), POLICY, now=T0
    )

    assert both.placement.thread_id == a.thread_id
    assert types(both.events) == ["thread.merged"]
    body = orjson.loads(both.events[0].body)
    assert body["thread"] == {"id": a.thread_id, "merged": [b.thread_id], "reason": "reference"}
    later = place(tx, msg("x@ada", MAIL, in_reply_to="q2@ada"), POLICY, now=T0 + DAY).placement
    assert later.thread_id == a.thread_id


def test_customer_merge_merges_their_open_threads_in_the_inbox(tx: SQLiteTx) -> None:
    openid = Identity(kind="wechat_openid", value="wx1:o", verified=True)
    unionid = Identity(kind="wechat_unionid", value="u", verified=True)
    a = place(tx, msg("1", openid, channel="wechat"), POLICY, now=T0).placement
    b = place(tx, msg("2", unionid, channel="wechat"), POLICY, now=T0).placement

    both = place(tx, msg("3", openid, unionid, channel="wechat"), POLICY, now=T0 + timedelta(minutes=1))

    assert types(both.events) == ["customer.merged", "thread.merged"]
    assert both.placement.thread_id == a.thread_id
    assert orjson.loads(both.events[1].body)["thread"]["merged"] == [b.thread_id]


def test_threads_a_link_brought_together_merge_at_the_customers_next_message(tx: SQLiteTx) -> None:
    # One person follows two Official Accounts that share an inbox: two openids, two customers, two
    # threads. The user-info API gives both the same unionid, linked after the messages (no inbox).
    unionid = Identity(kind="wechat_unionid", value="u", verified=True)
    openids = [Identity(kind="wechat_openid", value=f"wx{n}:o", verified=True) for n in (1, 2, 3)]
    placed = [
        place(tx, msg(str(n), openid, channel="wechat"), POLICY, now=T0).placement
        for n, openid in enumerate(openids)
    ]
    graph.link(placed[0].customer_id, identities=[unionid], evidence={})(tx, T0)
    graph.link(placed[1].customer_id, identities=[unionid], evidence={})(tx, T0)  # merges 0 into 1
    _, linked = graph.link(placed[2].customer_id, identities=[unionid], evidence={})(tx, T0)  # 1 into 2
    assert types(linked) == ["customer.merged"]

    nxt = place(tx, msg("next", openids[2], channel="wechat"), POLICY, now=T0 + timedelta(minutes=1))

    assert types(nxt.events) == ["thread.merged"]
    body = orjson.loads(nxt.events[0].body)
    # Merges of merges are followed: the first customer's thread is one of the three.
    merged = [placed[1].thread_id, placed[2].thread_id]
    assert body["thread"] == {"id": placed[0].thread_id, "merged": merged, "reason": "customer.merged"}
    assert nxt.placement.thread_id == placed[0].thread_id
    again = place(tx, msg("again", openids[1], channel="wechat"), POLICY, now=T0 + timedelta(minutes=2))
    assert (again.events, again.placement.thread_id) == ((), placed[0].thread_id)


def test_two_open_threads_no_merge_joined_stay_apart(tx: SQLiteTx) -> None:
    first = place(tx, msg("q1@ada", MAIL), POLICY, now=T0).placement
    graph.set_thread_status(first.thread_id, open=False, at=T0)(tx, T0)
    current = place(tx, msg("q2@ada", MAIL), POLICY, now=T0 + timedelta(minutes=1)).placement
    graph.set_thread_status(first.thread_id, open=True, at=T0 + timedelta(minutes=2))(tx, T0)

    nxt = place(tx, msg("q3@ada", MAIL), POLICY, now=T0 + timedelta(minutes=3))

    assert nxt.events == ()
    assert nxt.placement.thread_id == first.thread_id  # the most recently active (reopened) one
    assert current.thread_id != first.thread_id


def test_same_text_through_another_channel_is_a_duplicate_touchpoint(tx: SQLiteTx) -> None:
    form = msg("f1", MAIL, PHONE, channel="form", inbox="web", text=COMPLAINT)
    first = place(tx, form, POLICY, now=T0).placement
    mail = msg(
        "m1@ada",
        MAIL,
        channel="email",
        text="my order 1234 arrived broken - the screen is cracked!! please send a replacement",
    )

    second = place(tx, mail, POLICY, now=T0 + timedelta(minutes=5)).placement

    assert (second.thread_id, second.duplicate_of, second.is_new_thread) == (
        first.thread_id,
        first.message_id,
        False,
    )


def test_different_problem_or_outside_window_or_same_channel_is_not_a_duplicate(tx: SQLiteTx) -> None:
    first = place(tx, msg("f1", MAIL, channel="form", inbox="web", text=COMPLAINT), POLICY, now=T0).placement
    other = place(
        tx,
        msg("m1", MAIL, text="Also, how do I change the delivery address of order 5678?"),
        POLICY,
        now=T0 + timedelta(minutes=1),
    ).placement
    again = place(
        tx,
        msg("f2", MAIL, channel="form", inbox="web2", text=COMPLAINT),
        POLICY,
        now=T0 + timedelta(minutes=2),
    ).placement
    late = place(
        tx, msg("m2", MAIL, inbox="late", text=COMPLAINT), POLICY, now=T0 + timedelta(minutes=18)
    ).placement

    assert other.duplicate_of is None
    assert other.thread_id != first.thread_id
    assert late.duplicate_of is None
    assert again.duplicate_of is None


def test_duplicate_threshold_and_window_come_from_the_policy(tx: SQLiteTx) -> None:
    strict = dataclasses.replace(POLICY, duplicate_threshold=100.0)
    place(tx, msg("f1", MAIL, channel="form", text=COMPLAINT), strict, now=T0)
    near = place(tx, msg("m1", MAIL, inbox="x", text=COMPLAINT + " Thanks"), strict, now=T0).placement
    assert near.duplicate_of is None

    off = dataclasses.replace(POLICY, duplicate_window=0)
    place(tx, msg("f2", BOB, channel="form", text=COMPLAINT), off, now=T0)
    same = place(tx, msg("m2", BOB, inbox="x", text=COMPLAINT), off, now=T0).placement
    assert same.duplicate_of is None


def test_recent_texts_keep_only_the_newest_of_each_channel(tx: SQLiteTx, conn: sqlite3.Connection) -> None:
    channels = ["email" if n % 10 else "chat" for n in range(RECENT_TEXTS_KEPT * 3)]
    for n, channel in enumerate(channels):
        text = RecentText(
            customer_id="cus_busy",
            message_id=f"m{n:04}",
            thread_id="thr_busy",
            channel=channel,
            text=COMPLAINT,
            at=T0 + timedelta(seconds=n),
        )
        tx.add_recent_text(text)

    kept = dict(conn.execute("SELECT channel, count(*) FROM recent_texts GROUP BY channel").fetchall())
    assert kept == {"email": RECENT_TEXTS_KEPT, "chat": 15}
    emails = [f"m{n:04}" for n, channel in enumerate(channels) if channel == "email"]
    kept_emails = conn.execute("SELECT message_id FROM recent_texts WHERE channel = 'email' ORDER BY at")
    assert [row[0] for row in kept_emails] == emails[-RECENT_TEXTS_KEPT:]
    # The cap is found through the key (customer, channel, at), not by reading the channel's rows.
    plan = " ".join(
        row[-1]
        for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT at FROM recent_texts WHERE customer_id = ? AND channel = ?"
            " ORDER BY at DESC LIMIT 1 OFFSET 49",
            ("cus_busy", "email"),
        )
    )
    assert "USING PRIMARY KEY (customer_id=? AND channel=?)" in plan
