"""The web chat on two gateway processes sharing one PostgreSQL and one RabbitMQ.

A visitor's socket is open on one instance while the desk's replies are dispatched by the other
(the visitor's instance hears no reply commands): every reply still reaches the open widget (the
reply bulletin), once and in order. The visitor's session token, minted by one instance, resumes
the session on the other.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.connectors.webchat.kit import ChatSocket
from tests.e2e.harness import GatewayProcess, free_port, gateway_config
from tests.e2e.test_webchat_e2e import publish_reply
from tests.support.consumer import Consumer
from tests.support.postgres import admin_dsn, fresh_database, require_postgres
from tests.support.rabbitmq import Janitor
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

SHARED = """[store]
backend = "postgresql"
dsn = {{ env = "TG_TEST_STORE_DSN" }}
blob_dir = "{blob_dir}"

[channels.webchat]
session_secret = "e2e-chat-session-secret"
bulletin_interval = "200ms"

[channels.webchat.inboxes.demo]
demo_page = true

[control]
queue = "{control}"

[replies]
poll_interval = "0.2s"
"""
REPLIES = 6


@pytest.fixture
def store_dsn() -> Iterator[str]:
    dsn = admin_dsn()
    require_postgres(dsn)
    with fresh_database(dsn, prefix="ticketgate_chat") as database:
        yield database


@pytest.fixture
async def pair(
    tmp_path: Path, store_dsn: str, amqp_url: str, amqp_names: Janitor
) -> AsyncIterator[tuple[list[GatewayProcess], Consumer, str]]:
    exchange, queue, control = amqp_names.exchange("chat"), amqp_names.queue("desk"), amqp_names.queue("ctl")
    consumer = await Consumer(amqp_url, exchange).start()
    gateways = []
    # The second instance (the visitor's) hears no reply commands and looks at the ledger only at
    # start: the first one dispatches every reply.
    quiet = {
        "TICKETGATE__CONTROL__QUEUE": amqp_names.queue("ctl-quiet"),
        "TICKETGATE__REPLIES__POLL_INTERVAL": "3600",
    }
    for n in range(2):
        port = free_port()
        config = gateway_config(
            tmp_path,
            name=f"gw{n}",
            port=port,
            amqp_url=amqp_url,
            exchange=exchange,
            queue=queue,
            store=SHARED.format(blob_dir=tmp_path / "blobs", control=control),
        )
        gateways.append(
            GatewayProcess(
                config=config,
                port=port,
                log_path=tmp_path / f"gw{n}.log",
                env={"TG_TEST_STORE_DSN": store_dsn, **(quiet if n else {})},
            )
        )
    try:
        await asyncio.gather(*(g.start() for g in gateways))
        yield gateways, consumer, control
    finally:
        for gateway in gateways:
            await gateway.stop()
        await consumer.close()


async def replies_sent(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    found = re.search(r'^ticketgate_replies_sent_total\{channel="webchat",inbox="demo"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def of_type(consumer: Consumer, kind: str) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in consumer.distinct() if r.type == kind]


async def test_replies_reach_a_visitor_connected_to_the_other_instance(
    pair: tuple[list[GatewayProcess], Consumer, str], amqp_url: str
) -> None:
    gateways, consumer, control = pair
    async with aiohttp.ClientSession() as http:
        here = ChatSocket(
            await http.ws_connect(f"{gateways[1].url}/chat/demo/ws", headers={"Origin": gateways[1].url})
        )
        welcome = await here.hello()
        ack = await here.say("client-multi-1", "Which instance am I on?")
        assert ack["type"] == "ack"
        await consumer.wait_until(lambda: bool(of_type(consumer, "message.received")), within=30)
        thread_id = ack["thread_id"]
        for n in range(REPLIES):
            await publish_reply(amqp_url, control, thread_id, f"desk-multi-{n}", f"reply {n}")
        got = [await here.until("reply", timeout=30) for _ in range(REPLIES)]
        assert sorted(r["id"] for r in got) == sorted({r["id"] for r in got})  # each once
        assert [r["text"] for r in got] == [f"reply {n}" for n in range(REPLIES)]  # in thread order
        await consumer.wait_until(lambda: len(of_type(consumer, "reply.sent")) >= REPLIES, within=30)
        # The token minted by one instance resumes the session on the other, with what was held.
        await here.close()
        there = ChatSocket(
            await http.ws_connect(f"{gateways[0].url}/chat/demo/ws", headers={"Origin": gateways[0].url})
        )
        resumed = await there.hello(welcome["token"])
        assert resumed["session"] == welcome["session"]
        assert [r["text"] for r in resumed["replies"]] == [f"reply {n}" for n in range(REPLIES)]
        await there.close()
        sent = [await replies_sent(http, g.url) for g in gateways]
        assert sent == [REPLIES, 0], sent  # every reply went out from the instance without the socket
