"""No loss, proven on the real gateway process and the real broker.

The gateway talks to RabbitMQ through a TCP proxy the test cuts and restores; the consumer talks to
the broker directly, so it sees exactly what reached the bus.
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.conftest import MakeDeployment
from tests.support.consumer import Consumer, Received
from tests.support.schema import validate_event
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.integration

AUTH = {"Authorization": "Bearer e2e-test-key-0001"}


async def send(session: aiohttp.ClientSession, url: str, i: int, customer: int) -> tuple[int, dict[str, Any]]:
    body = {
        "customer": {"email": f"customer{customer}@example.com"},
        "subject": f"question {i}",
        "text": f"message number {i}",
        "external_id": f"msg-{uuid.uuid4()}",
    }
    async with session.post(f"{url}/api/v1/messages", json=body, headers=AUTH) as resp:
        answer = await resp.json()
        if resp.status == 503:
            answer["retry_after"] = resp.headers.get("Retry-After")
        return resp.status, answer


async def wait_for_messages(consumer: Consumer, message_ids: set[str], within: float) -> list[Received]:
    """Wait until every message id (the body's message.id, not the event id) was delivered."""

    def delivered() -> set[str]:
        return {orjson.loads(r.body)["message"]["id"] for r in consumer.received}

    try:
        await consumer.wait_until(lambda: message_ids <= delivered(), within=within)
    except AssertionError:
        missing = message_ids - delivered()
        raise AssertionError(f"lost {len(missing)} of {len(message_ids)} acknowledged messages") from None
    return list(consumer.received)


def assert_per_thread_order(received: list[Received]) -> None:
    """Across first deliveries, each thread's sequences arrive 1, 2, 3, ... without gaps or reordering."""
    seen: set[str | None] = set()
    sequences: dict[str, list[int]] = defaultdict(list)
    for delivery in received:
        if delivery.message_id in seen:
            continue  # an at-least-once repeat; desks drop it by message_id
        seen.add(delivery.message_id)
        event = validate_event(delivery.body)
        sequences[event["thread"]["id"]].append(event["thread"]["sequence"])
    for thread, seqs in sequences.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"thread {thread} out of order: {seqs}"


async def test_broker_outage_is_absorbed_and_drains_in_order(
    deploy: MakeDeployment, broker_proxy: TcpProxy
) -> None:
    d = await deploy(broker_url=broker_proxy.url())
    async with aiohttp.ClientSession() as session:
        status, _ = await send(session, d.gateway.url, 0, customer=0)
        assert status == 202
        await d.consumer.wait_for(1)

        broker_proxy.cut()
        acked: set[str] = set()
        for i in range(1, 61):
            status, answer = await send(session, d.gateway.url, i, customer=i % 3)
            assert status == 202, answer  # accepted into the outbox although the broker is away
            acked.add(answer["message_id"])
        # The relay reports its connection twice a second: wait for /readyz to say it is down.
        async with asyncio.timeout(10):
            while True:
                async with session.get(f"{d.gateway.url}/readyz") as resp:
                    ready = await resp.json()
                if ready["broker_connected"] is False:
                    break
                await asyncio.sleep(0.1)  # polling another process's view, not a task of ours
        assert ready["outbox_backlog"] >= 1

        broker_proxy.restore()
    received = await wait_for_messages(d.consumer, acked, within=30)
    delivered = {validate_event(r.body)["message"]["id"] for r in received}
    assert acked <= delivered, f"lost {len(acked - delivered)} acknowledged messages"
    assert_per_thread_order(received)


async def test_past_the_backlog_bound_channels_get_503_with_retry_after(
    deploy: MakeDeployment, broker_proxy: TcpProxy
) -> None:
    broker_proxy.cut()
    d = await deploy(broker_url=broker_proxy.url(), extra="")
    # The bound is small for this test: set through the environment override, as ops would.
    await d.gateway.stop()
    d.gateway.env = {"TICKETGATE__OUTBOX__MAX_BACKLOG": "5"}
    await d.gateway.start()
    async with aiohttp.ClientSession() as session:
        statuses = [(await send(session, d.gateway.url, i, customer=i))[0] for i in range(5)]
        assert statuses == [202] * 5
        status, answer = await send(session, d.gateway.url, 99, customer=99)
        assert status == 503
        assert answer["retry_after"]
        assert answer.get("reason")
        async with session.get(f"{d.gateway.url}/readyz") as resp:
            assert resp.status == 503
    broker_proxy.restore()
    received = await d.consumer.wait_for(5, within=30)
    assert len({r.message_id for r in received}) == 5


async def test_sigkill_right_after_acks_loses_nothing(deploy: MakeDeployment, broker_proxy: TcpProxy) -> None:
    """N acknowledged messages, SIGKILL, restart: all N are published, once each (by event id)."""
    broker_proxy.cut()  # nothing can be published before the kill: everything rests on the store
    d = await deploy(broker_url=broker_proxy.url())
    acked: set[str] = set()
    async with aiohttp.ClientSession() as session:
        for i in range(40):
            status, answer = await send(session, d.gateway.url, i, customer=i % 4)
            assert status == 202
            acked.add(answer["message_id"])
    d.gateway.signal(signal.SIGKILL)
    assert await d.gateway.wait() == -signal.SIGKILL
    assert d.consumer.received == []

    broker_proxy.restore()
    await d.gateway.start()
    received = await d.consumer.wait_for(len(acked), within=30)
    delivered = [validate_event(r.body)["message"]["id"] for r in received]
    assert set(delivered) == acked
    assert len(delivered) == len(acked), "a message was published twice although the store committed it once"
    assert_per_thread_order(received)


async def test_sigkill_while_publishing_loses_nothing(deploy: MakeDeployment) -> None:
    """Killed while requests are in flight and the relay publishes: every acked message arrives."""
    d = await deploy()
    acked: set[str] = set()
    killed = asyncio.Event()

    async def client(session: aiohttp.ClientSession, worker: int) -> None:
        for i in range(worker, 10_000, 16):
            try:
                status, answer = await send(session, d.gateway.url, i, customer=i % 7)
            except aiohttp.ClientError:
                return  # the gateway died under this request: it was never acknowledged
            assert status == 202, answer
            acked.add(answer["message_id"])
            if len(acked) >= 300 and not killed.is_set():
                killed.set()
                d.gateway.signal(signal.SIGKILL)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session, w) for w in range(16)))
    assert killed.is_set()
    await d.gateway.wait()
    await d.gateway.start()
    received = await wait_for_messages(d.consumer, acked, within=60)
    delivered = {validate_event(r.body)["message"]["id"] for r in received}
    assert acked <= delivered, f"lost {len(acked - delivered)} of {len(acked)} acknowledged messages"
    assert_per_thread_order(received)


async def test_sigterm_drains_and_exits_zero(deploy: MakeDeployment) -> None:
    d = await deploy()
    async with aiohttp.ClientSession() as session:
        ids = set()
        for i in range(20):
            status, answer = await send(session, d.gateway.url, i, customer=1)
            assert status == 202
            ids.add(answer["message_id"])
    d.gateway.signal(signal.SIGTERM)
    assert await d.gateway.wait() == 0
    received = await d.consumer.wait_for(20)
    assert {validate_event(r.body)["message"]["id"] for r in received} == ids


def relay_pids(pid: int) -> list[int]:
    """The relay processes the gateway ``pid`` spawned (by the name they give themselves; the
    normalizer process and multiprocessing's resource tracker are children too)."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return sorted(c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "tg-relay")


async def test_a_killed_relay_process_is_restarted_and_loses_nothing(deploy: MakeDeployment) -> None:
    """The relay runs as the gateway's child process: SIGKILL it mid-stream; the gateway restarts it."""
    d = await deploy()
    assert d.gateway.proc is not None
    relays = relay_pids(d.gateway.proc.pid)
    assert len(relays) == 1, relays
    acked: set[str] = set()
    async with aiohttp.ClientSession() as session:
        for i in range(60):
            status, answer = await send(session, d.gateway.url, i, customer=i % 5)
            assert status == 202
            acked.add(answer["message_id"])
            if i == 20:
                os.kill(relays[0], signal.SIGKILL)
    received = await wait_for_messages(d.consumer, acked, within=60)
    assert_per_thread_order(received)
    restarted = relay_pids(d.gateway.proc.pid)
    assert len(restarted) == 1
    assert restarted != relays
    assert "relay process exited" in d.gateway.log()
