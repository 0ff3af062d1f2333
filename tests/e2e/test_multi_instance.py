"""Several gateway processes on one PostgreSQL and one RabbitMQ, checked by a consumer ledger.

Three real gateway processes share a fresh database. Each customer first writes once with email and
phone (to the ``signup`` inbox), which links the two. Then every customer's messages go to the
``demo`` inbox, alternately from the email and from the phone, concurrently, each to a random
instance, and a fifth of them again (same external id, same Idempotency-Key) to another instance.
Messages of one customer thus race on different instances under *different* identities, for a
thread that does not exist yet. What the desks see must be as if one gateway had taken them all:
one event per message, one thread per customer, per-thread sequences 1..n in order on the bus.
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psycopg
import pytest

from tests.e2e.harness import GatewayProcess, free_port, gateway_config
from tests.support.consumer import Consumer, Received
from tests.support.postgres import admin_dsn, fresh_database, require_postgres
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

AUTH = "Bearer e2e-test-key-0001"
SIGNUP_AUTH = "Bearer e2e-signup-key-0001"
INSTANCES = 3
CUSTOMERS = 50
PER_CUSTOMER = 10
RETRY_SHARE = 0.2
IN_FLIGHT = 48


# The shared database (its DSN from the environment, as ops would pass a secret) and blob directory.
SHARED_STORE = """[store]
backend = "postgresql"
dsn = {{ env = "TG_TEST_STORE_DSN" }}
blob_dir = "{blob_dir}"
"""
# A second inbox with its own key, for the customers' sign-ups.
SIGNUP_INBOX = """
[inboxes.signup]
tenant = "demo"

[channels.api.inboxes.signup]
keys = ["e2e-signup-key-0001"]
"""


@dataclass
class Cluster:
    gateways: list[GatewayProcess]
    consumer: Consumer


@pytest.fixture
def store_dsn() -> Iterator[str]:
    dsn = admin_dsn()
    require_postgres(dsn)
    with fresh_database(dsn, prefix="ticketgate_e2e") as database:
        yield database


@pytest.fixture
async def cluster(
    tmp_path: Path, store_dsn: str, amqp_url: str, amqp_names: Janitor
) -> AsyncIterator[Cluster]:
    exchange, queue = amqp_names.exchange("multi"), amqp_names.queue("desk")
    consumer = await Consumer(amqp_url, exchange).start()
    gateways = []
    for n in range(INSTANCES):
        port = free_port()
        config = gateway_config(
            tmp_path,
            name=f"gw{n}",
            port=port,
            amqp_url=amqp_url,
            exchange=exchange,
            queue=queue,
            store=SHARED_STORE.format(blob_dir=tmp_path / "shared-blobs"),
            extra=SIGNUP_INBOX,
        )
        gateways.append(
            GatewayProcess(
                config=config,
                port=port,
                log_path=tmp_path / f"gw{n}.log",
                # The relay hears of other instances' commits through LISTEN/NOTIFY, not its poll:
                # a poll this rare shows a lost notification as a delivery that takes 30 s.
                env={"TG_TEST_STORE_DSN": store_dsn, "TICKETGATE__OUTBOX__POLL_INTERVAL": "30"},
            )
        )
    try:
        # Started together: the schema migration runs once, under its advisory lock.
        await asyncio.gather(*(g.start() for g in gateways))
        yield Cluster(gateways=gateways, consumer=consumer)
    finally:
        for gateway in gateways:
            await gateway.stop()
        await consumer.close()


@dataclass(frozen=True)
class Send:
    customer: int
    n: int
    instance: int
    retry: bool = False

    @property
    def external_id(self) -> str:
        return f"c{self.customer}-m{self.n}"

    def body(self) -> dict[str, Any]:
        # Alternately by email and by phone: the customer's messages race under two identity locks.
        who = {"email": email(self.customer)} if self.n % 2 == 0 else {"phone": phone(self.customer)}
        return {
            "customer": who,
            "subject": f"order {self.customer}",
            "text": f"message {self.n} of customer {self.customer}",
            "external_id": self.external_id,
        }


def email(customer: int) -> str:
    return f"customer{customer}@example.com"


def phone(customer: int) -> str:
    return f"+4179{1_000_000 + customer:07d}"


async def sign_up(cluster: Cluster) -> set[str]:
    """Every customer writes once with email and phone, which links them; returns the message ids."""

    async def one(session: aiohttp.ClientSession, customer: int) -> str:
        gateway = cluster.gateways[customer % len(cluster.gateways)]
        body = {
            "customer": {"email": email(customer), "phone": phone(customer)},
            "subject": "sign-up",
            "text": f"hello from customer {customer}",
            "external_id": f"signup-{customer}",
        }
        headers = {"Authorization": SIGNUP_AUTH}
        async with session.post(f"{gateway.url}/api/v1/messages", json=body, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 202, answer
            return str(answer["message_id"])

    async with aiohttp.ClientSession() as session:
        return set(await asyncio.gather(*(one(session, c) for c in range(CUSTOMERS))))


def plan(rng: random.Random) -> list[Send]:
    """Every message to a random instance, a fifth again to another one; all interleaved."""
    sends = [
        Send(customer=c, n=n, instance=rng.randrange(INSTANCES))
        for c in range(CUSTOMERS)
        for n in range(PER_CUSTOMER)
    ]
    retries = [
        Send(s.customer, s.n, (s.instance + rng.randrange(1, INSTANCES)) % INSTANCES, retry=True)
        for s in rng.sample(sends, int(len(sends) * RETRY_SHARE))
    ]
    work = sends + retries
    rng.shuffle(work)
    return work


async def post(session: aiohttp.ClientSession, gateway: GatewayProcess, send: Send) -> tuple[int, str]:
    headers = {"Authorization": AUTH, "Idempotency-Key": send.external_id}
    async with session.post(f"{gateway.url}/api/v1/messages", json=send.body(), headers=headers) as resp:
        answer = await resp.json()
        assert resp.status in (200, 202), (resp.status, answer)
        return resp.status, str(answer["message_id"])


async def feed(cluster: Cluster, work: list[Send]) -> dict[str, str]:
    """Send everything with ``IN_FLIGHT`` requests at a time; ``{external_id: message_id}``."""
    acked: dict[str, set[str]] = defaultdict(set)
    queue: asyncio.Queue[Send] = asyncio.Queue()
    for send in work:
        queue.put_nowait(send)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            send = queue.get_nowait()
            _, message_id = await post(session, cluster.gateways[send.instance], send)
            acked[send.external_id].add(message_id)

    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))
    # A retry answers with the first message's id, on whichever instance it lands.
    assert all(len(ids) == 1 for ids in acked.values()), {k: v for k, v in acked.items() if len(v) > 1}
    return {external_id: ids.pop() for external_id, ids in acked.items()}


async def wait_for_delivery(consumer: Consumer, message_ids: set[str], within: float = 60) -> None:
    """Wait until every message id arrived in a ``message.received`` event (bodies parsed once)."""
    delivered: set[str] = set()
    parsed = 0

    def done() -> bool:
        nonlocal parsed
        for delivery in consumer.received[parsed:]:
            if delivery.type == "message.received":
                delivered.add(orjson.loads(delivery.body)["message"]["id"])
        parsed = len(consumer.received)
        return message_ids <= delivered

    try:
        await consumer.wait_until(done, within=within)
    except AssertionError:
        raise AssertionError(f"{len(message_ids - delivered)} acknowledged messages never arrived") from None


def ledger(received: list[Received]) -> list[dict[str, Any]]:
    """The ``message.received`` events of the ``demo`` inbox (sign-ups are not under test)."""
    events = [validate_event(r.body) for r in received if r.type == "message.received"]
    return [e for e in events if e["message"]["inbox"] == "demo"]


def check_ledger(events: list[dict[str, Any]], acked: dict[str, str]) -> None:
    by_message: dict[str, int] = defaultdict(int)
    threads_of_customer: dict[str, set[str]] = defaultdict(set)
    customers_of_identity: dict[tuple[str, str], set[str]] = defaultdict(set)
    sequences: dict[str, list[int]] = defaultdict(list)
    for event in events:
        by_message[event["message"]["id"]] += 1
        for identity in event["customer"]["identities"]:
            customers_of_identity[(identity["kind"], identity["value"])].add(event["customer"]["id"])
        threads_of_customer[event["customer"]["id"]].add(event["thread"]["id"])
        sequences[event["thread"]["id"]].append(event["thread"]["sequence"])

    duplicates = {m: n for m, n in by_message.items() if n > 1}
    assert not duplicates, f"{len(duplicates)} messages published more than once"
    missing = set(acked.values()) - set(by_message)
    assert not missing, f"{len(missing)} acknowledged messages never reached the bus"
    assert set(by_message) == set(acked.values())
    assert len(customers_of_identity) == 2 * CUSTOMERS  # email and phone, linked by the sign-up
    assert all(len(ids) == 1 for ids in customers_of_identity.values()), "one identity, several customers"
    assert len(threads_of_customer) == CUSTOMERS
    split = {c: t for c, t in threads_of_customer.items() if len(t) != 1}
    assert not split, f"customers with more than one thread: {split}"
    for thread, seqs in sequences.items():
        assert seqs == list(range(1, PER_CUSTOMER + 1)), f"thread {thread}: {seqs} on the bus"


async def test_three_instances_make_one_thread_per_customer_with_gapless_ordered_sequences(
    cluster: Cluster,
) -> None:
    signups = await sign_up(cluster)
    work = plan(random.Random(20251122))
    assert sum(s.retry for s in work) == int(CUSTOMERS * PER_CUSTOMER * RETRY_SHARE)
    assert {s.instance for s in work} == set(range(INSTANCES))

    acked = await feed(cluster, work)

    assert len(acked) == CUSTOMERS * PER_CUSTOMER
    await wait_for_delivery(cluster.consumer, set(acked.values()) | signups)
    check_ledger(ledger(cluster.consumer.received), acked)


def relay_lease_holder(dsn: str) -> int | None:
    """The OS pid of the gateway whose relay holds the lease (its connection's application_name)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()"
            " AND a.application_name LIKE 'ticketgate-relay %'"
        ).fetchone()
    if row is None:
        return None
    return int(str(row[0]).rsplit("pid=", 1)[1])


def owning_gateway(pid: int | None, gateways: list[GatewayProcess]) -> GatewayProcess | None:
    """The gateway that is ``pid`` or its parent (the relay may run in a child process)."""
    by_pid = {g.proc.pid: g for g in gateways if g.proc is not None}
    if pid is None or pid in by_pid:
        return by_pid.get(pid) if pid is not None else None
    status = Path(f"/proc/{pid}/status").read_text()
    parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
    return by_pid.get(parent)


async def test_a_standby_relay_takes_over_when_the_publishing_instance_dies(
    cluster: Cluster, store_dsn: str
) -> None:
    """SIGKILL the instance that relays (and another one) mid-stream: the standby publishes the rest."""
    signups = await sign_up(cluster)
    work = plan(random.Random(7))
    half = len(work) // 2
    first = await feed(cluster, work[:half])
    holder = owning_gateway(await asyncio.to_thread(relay_lease_holder, store_dsn), cluster.gateways)
    assert holder is not None, "no gateway holds the relay lease"
    survivor = next(g for g in cluster.gateways if g is not holder)
    for gateway in cluster.gateways:
        if gateway is not survivor:
            gateway.signal(signal.SIGKILL)
            await gateway.wait()

    rest = [Send(s.customer, s.n, 0, s.retry) for s in work[half:]]
    second = await feed(Cluster(gateways=[survivor], consumer=cluster.consumer), rest)

    acked = {**first, **second}
    assert len(acked) == CUSTOMERS * PER_CUSTOMER
    await wait_for_delivery(cluster.consumer, set(acked.values()) | signups)
    assert (
        owning_gateway(await asyncio.to_thread(relay_lease_holder, store_dsn), cluster.gateways) is survivor
    )
    # A killed relay may have published a batch it could not mark: desks drop repeats by
    # message_id, so the ledger is checked on first deliveries (order and gaps included).
    seen: set[str | None] = set()
    first_deliveries = []
    for delivery in cluster.consumer.received:
        if delivery.message_id not in seen:
            seen.add(delivery.message_id)
            first_deliveries.append(delivery)
    check_ledger(ledger(first_deliveries), acked)


async def test_a_message_taken_by_a_standby_reaches_the_bus_long_before_the_relay_polls(
    cluster: Cluster, store_dsn: str
) -> None:
    await wait_for_delivery(cluster.consumer, await sign_up(cluster))
    holder = owning_gateway(await asyncio.to_thread(relay_lease_holder, store_dsn), cluster.gateways)
    assert holder is not None, "no gateway holds the relay lease"

    async with aiohttp.ClientSession() as session:
        for n, standby in enumerate(g for g in cluster.gateways if g is not holder):
            _, message_id = await post(session, standby, Send(customer=n, n=0, instance=n))
            await wait_for_delivery(cluster.consumer, {message_id}, within=2.0)
