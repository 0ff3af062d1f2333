"""The reply ledger's contract, on every backend (the ``make_store`` fixture of the store contract)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from storekit import Clock, message

from core.model import CanonicalMessage
from dedupe.engine import new_id
from gateway.store.base import Store
from gateway.store.postgres import MIGRATIONS as PG_MIGRATIONS
from gateway.store.replies import FallbackPlan, ReplyOutcome, ReplyRecord, ReplyRequest
from gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.gateway.store import test_store_contract as contract
from tests.gateway.store.test_store_contract import MakeStore, accept

# The store contract's fixtures: every backend, a fresh database per test, a settable clock.
backend = contract.backend
backend_settings = contract.backend_settings
clock = contract.clock
make_store = contract.make_store
store = contract.store

LEASE = 30.0


def request(
    thread_id: str, command_id: str = "cmd-1", *, text: str = "Hello", tenant: str = "acme"
) -> ReplyRequest:
    return ReplyRequest(
        reply_id=new_id("rpl"),
        tenant=tenant,
        command_id=command_id,
        thread_id=thread_id,
        fingerprint=f"fp:{text}",
        command={"text": text, "agent_name": "Bo"},
    )


async def a_thread(store: Store, external_id: str = "m1", **kw: Any) -> str:
    (placement,) = await accept(store, message(external_id, **kw))
    return placement.thread_id


def owner() -> str:
    return new_id("lease")


async def reply_events(store: Store) -> list[dict[str, Any]]:
    rows = await store.outbox_fetch(1000)
    return [orjson.loads(r.body) for r in rows if r.type.startswith("reply.")]


async def test_a_command_is_recorded_once_and_another_body_under_its_id_is_refused(store: Store) -> None:
    thread = await a_thread(store)
    first = await store.reply_request(request(thread))
    again = await store.reply_request(request(thread))
    other = await store.reply_request(request(thread, text="Something else"))

    assert first.outcome == "created"
    assert first.record is not None
    assert (first.record.status, first.record.position, first.record.attempts) == ("pending", 1, 0)
    assert first.record.command == {"text": "Hello", "agent_name": "Bo"}
    assert again.outcome == "duplicate"
    assert again.record is not None
    assert again.record.id == first.record.id
    assert other.outcome == "conflict"
    assert [r.id for r in await store.reply_list(thread)] == [first.record.id]


async def test_a_thread_of_another_tenant_or_none_is_unknown(store: Store) -> None:
    thread = await a_thread(store)
    assert (await store.reply_request(request(thread, tenant="other"))).outcome == "unknown_thread"
    assert (await store.reply_request(request("thr_nope"))).outcome == "unknown_thread"
    assert await store.reply_list(thread) == []


async def test_concurrent_repeats_of_one_command_make_one_reply(store: Store) -> None:
    thread = await a_thread(store)
    results = await asyncio.gather(*(store.reply_request(request(thread)) for _ in range(20)))
    assert sorted(r.outcome for r in results) == ["created"] + ["duplicate"] * 19
    assert len({r.record.id for r in results if r.record is not None}) == 1


async def test_replies_of_a_thread_are_claimed_one_at_a_time_in_order(store: Store, clock: Clock) -> None:
    thread = await a_thread(store)
    other = await a_thread(store, "x1", email="zed@example.com")
    ids = [(await store.reply_request(request(thread, f"c{i}"))).record.id for i in range(3)]  # type: ignore[union-attr]
    lone = (await store.reply_request(request(other, "z"))).record
    assert lone is not None

    claimed = await store.reply_claim(clock(), 10, LEASE, owner())
    assert {r.id for r in claimed} == {ids[0], lone.id}  # the second waits for the first
    assert await store.reply_claim(clock(), 10, LEASE, owner()) == []  # leased

    first = next(r for r in claimed if r.id == ids[0])
    assert (first.status, first.attempts) == ("sending", 1)
    assert await finish(store, first, "sent", provider_message_id="p-1")
    (second,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert second.id == ids[1]
    # A permanent failure ends the reply and lets the next one go.
    assert await finish(store, second, "failed", reason="rejected", detail="no")
    (third,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert third.id == ids[2]


async def test_a_lapsed_lease_makes_the_reply_due_again_and_the_old_lease_cannot_undo_it(
    store: Store, clock: Clock
) -> None:
    thread = await a_thread(store)
    created = (await store.reply_request(request(thread))).record
    assert created is not None
    (first,) = await store.reply_claim(clock(), 10, LEASE, owner())
    clock.advance(LEASE + 1)  # the instance died mid-send
    (second,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert (second.id, second.attempts) == (first.id, 2)
    assert second.lease_owner != first.lease_owner

    # The first attempt's late retry changes nothing; the second attempt's success counts.
    assert not await finish(store, first, "retry", retry_at=clock())
    assert await finish(store, second, "sent", provider_message_id="p-1")
    # A success reported again (the first attempt went out too) makes no second event.
    assert not await finish(store, first, "sent", provider_message_id="p-1")
    [sent] = await reply_events(store)
    assert sent["type"] == "reply.sent"
    assert sent["reply"]["provider_message_id"] == "p-1"
    assert sent["reply"]["attempts"] == 2
    assert sent["thread"] == {"id": thread, "number": 1}


async def test_a_retry_waits_until_its_time(store: Store, clock: Clock) -> None:
    thread = await a_thread(store)
    await store.reply_request(request(thread))
    (first,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert await finish(store, first, "retry", retry_at=clock() + timedelta(seconds=5), reason="timeout")
    assert await store.reply_claim(clock(), 10, LEASE, owner()) == []
    backlog = await store.reply_backlog()
    assert (backlog.pending, backlog.sending) == (1, 0)
    clock.advance(5)
    (again,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert (again.attempts, again.reason) == (2, "timeout")
    assert await reply_events(store) == []  # a retry is not an outcome


async def test_failure_event_says_why(store: Store, clock: Clock) -> None:
    thread = await a_thread(store)
    await store.reply_request(request(thread))
    (claimed,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert await finish(store, claimed, "failed", reason="window_closed", detail="48 h passed")
    [failed] = await reply_events(store)
    assert failed["type"] == "reply.failed"
    assert (failed["reply"]["reason"], failed["reply"]["detail"]) == ("window_closed", "48 h passed")
    assert failed["reply"]["command_id"] == "cmd-1"
    record = await store.reply_get(claimed.id)
    assert record is not None
    assert (record.status, record.reason) == ("failed", "window_closed")
    assert (await store.reply_backlog()).pending == 0


async def test_delivery_reports_find_the_reply_by_provider_id_once_per_status(
    store: Store, clock: Clock
) -> None:
    thread = await a_thread(store)
    await store.reply_request(request(thread))
    (claimed,) = await store.reply_claim(clock(), 10, LEASE, owner())
    await finish(store, claimed, "sent", provider_message_id="wamid.9")

    assert await store.reply_report("form", "wamid.9", "delivered", clock())
    assert await store.reply_report("form", "wamid.9", "delivered", clock())  # repeated: ours, no event
    assert await store.reply_report("form", "wamid.9", "read", clock())
    assert not await store.reply_report("form", "unknown", "read", clock())
    assert not await store.reply_report("email", "wamid.9", "read", clock())  # another channel's id
    types = [e["type"] for e in await reply_events(store)]
    assert types == ["reply.sent", "reply.delivered", "reply.read"]


async def test_context_has_the_thread_its_messages_and_the_customers_channels(
    store: Store, clock: Clock
) -> None:
    def at(minute: int, m: CanonicalMessage) -> CanonicalMessage:
        return dataclasses.replace(m, received_at=clock() + timedelta(minutes=minute))

    (one,) = await accept(store, at(0, message("m1")))
    (two,) = await accept(store, at(1, message("m2", subject="Re: Order 1234 is late", text="And?")))
    (other,) = await accept(store, at(2, message("w1", channel="chat", inbox="web", text="Hi")))
    assert two.thread_id == one.thread_id
    created = (await store.reply_request(request(one.thread_id))).record
    assert created is not None
    context = await store.reply_context(created.id)
    assert context is not None
    assert (context.number, context.customer_id, context.subject) == (
        1,
        one.customer_id,
        "Order 1234 is late",
    )
    assert [r.message_id for r in context.thread_routes] == [one.message_id, two.message_id]
    assert context.thread_routes[0].identities[0].value == "ada@example.com"
    assert {(r.channel, r.inbox) for r in context.customer_routes} == {("form", "support"), ("chat", "web")}
    assert context.customer_routes[0].message_id == other.message_id  # newest first
    assert context.sent == ()


async def finish(store: Store, record: ReplyRecord, kind: str, **kw: Any) -> bool:
    assert record.lease_owner is not None
    return await store.reply_finish(
        ReplyOutcome(
            reply_id=record.id,
            lease_owner=record.lease_owner,
            kind=kind,
            channel="form",
            inbox="support",
            **kw,
        )  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("instances", [2])
async def test_two_instances_never_lease_one_reply_twice(
    make_store: MakeStore, backend: str, clock: Clock, instances: int
) -> None:
    if backend == "sqlite":
        pytest.skip("one SQLite file has one gateway")
    stores = [make_store() for _ in range(instances)]
    for each in stores:
        await each.open()
    threads = [await a_thread(stores[0], f"m{i}", email=f"c{i}@example.com") for i in range(20)]
    for thread in threads:
        for n in range(2):
            await stores[0].reply_request(request(thread, f"{thread}-{n}"))
    claims = await asyncio.gather(
        *(s.reply_claim(clock(), 100, LEASE, owner()) for s in stores for _ in range(3))
    )
    ids = [r.id for batch in claims for r in batch]
    assert len(ids) == len(set(ids))
    assert len({r.thread_id for batch in claims for r in batch}) == len(ids)  # one per thread


async def test_messages_from_before_the_ledger_get_routes_and_are_answered_to_the_customer(
    make_store: MakeStore, backend: str, backend_settings: dict[str, Any], tmp_path: Path
) -> None:
    """The backfill migration: a message stored before migration 10 had no reply route."""
    first = make_store()
    await first.open()
    (placed,) = await accept(first, message("old-1"))
    await first.close()
    migrations = SQLITE_MIGRATIONS if backend == "sqlite" else PG_MIGRATIONS
    # The backfill by its content: later migrations are appended after it.
    backfill = next(m for m in migrations if "INSERT INTO reply_routes" in m)
    statements = ["DELETE FROM reply_routes", backfill]  # as if stored before, then upgraded
    if backend == "sqlite":
        with sqlite3.connect(tmp_path / "tg.db") as conn:
            conn.executescript(";".join(statements))
    else:
        with psycopg.connect(backend_settings["dsn"], autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)
    again = make_store()
    await again.open()
    created = (await again.reply_request(request(placed.thread_id))).record
    assert created is not None
    context = await again.reply_context(created.id)
    assert context is not None
    [route] = context.thread_routes
    assert (route.message_id, route.channel, route.inbox, route.identities, route.extra) == (
        placed.message_id, "form", "support", (), {},
    )  # fmt: skip
    assert [i.value for i in context.customer_identities] == ["ada@example.com"]


async def test_a_mail_fallback_waits_its_delay_holds_nothing_back_and_a_delivery_cancels_it(
    store: Store, clock: Clock
) -> None:
    """The fallback row is written with the original's reply.sent, due later; a report of
    delivery drops it; a claimed one can be dropped under its lease only."""
    thread = await a_thread(store)
    ids = [(await store.reply_request(request(thread, f"c{i}"))).record.id for i in range(3)]  # type: ignore[union-attr]
    due_at = clock() + timedelta(seconds=60)
    plans = [FallbackPlan(reply_id=new_id("rpl"), due_at=due_at, channel="email", inbox="s") for _ in ids]
    for plan in plans[:2]:
        (record,) = await store.reply_claim(clock(), 10, LEASE, owner())
        assert await finish(store, record, "sent", provider_message_id=f"pm-{record.id}", fallback=plan)
    # Two fallbacks wait; the third reply is not held back by them.
    (third,) = await store.reply_claim(clock(), 10, LEASE, owner())
    assert third.id == ids[2]
    backlog = await store.reply_backlog()
    assert (backlog.pending, backlog.sending) == (0, 1)  # a fallback counts once it is due
    waiting = [r for r in await store.reply_list(thread) if r.fallback_of is not None]
    assert [(r.fallback_of, r.status, r.channel, r.inbox) for r in waiting] == [
        (ids[0], "pending", "email", "s"),
        (ids[1], "pending", "email", "s"),
    ]
    assert waiting[0].command_id == "c0#email-fallback"
    # The first is delivered: its fallback goes.
    assert await store.reply_report("form", f"pm-{ids[0]}", "delivered", clock())
    assert await store.reply_delivered(ids[0])
    assert not await store.reply_delivered(ids[1])
    assert await store.reply_fallback_cancel("form", f"pm-{ids[0]}") == 1
    assert await store.reply_fallback_cancel("form", f"pm-{ids[0]}") == 0
    assert await finish(store, third, "sent", provider_message_id="pm-3")
    # The second is due after the delay, claimed once, and dropped only under its lease.
    later = clock() + timedelta(seconds=61)
    (due,) = await store.reply_claim(later, 10, LEASE, owner())
    assert (due.id, due.fallback_of, due.created_at) == (plans[1].reply_id, ids[1], plans[1].due_at)
    assert await store.reply_claim(later, 10, LEASE, owner()) == []
    assert not await store.reply_fallback_drop(due.id, owner())
    assert await store.reply_fallback_drop(due.id, due.lease_owner or "")
    assert all(r.fallback_of is None for r in await store.reply_list(thread))
