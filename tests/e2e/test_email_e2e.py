"""Email on the running gateway: real SMTP clients, a real Dovecot, events consumed from RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.connectors.email.dovecot_kit import PASSWORD, USER, Dovecot, dovecot
from tests.e2e.conftest import MakeDeployment
from tests.e2e.harness import free_port
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration


def smtp_config(port: int) -> str:
    return f"""
[channels.email.smtp]
host = "127.0.0.1"
port = {port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["support@demo.localhost"]
"""


def gbk_mail(message_id: str) -> bytes:
    body = "你好，我的订单号 123456789012345678 还没有发货。\n\n-- \n李雷".encode("gbk")
    return (
        b"From: =?GBK?B?wO7A1w==?= <li.lei@example.com>\r\n"
        b"To: support@demo.localhost\r\n"
        b"Subject: =?GBK?B?tN+02beiu/U=?=\r\n"
        b"Message-ID: <" + message_id.encode() + b">\r\n"
        b"Date: Sun, 22 Nov 2026 10:00:00 +0800\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=GBK\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body.replace(b"\n", b"\r\n") + b"\r\n"
    )


def send(port: int, raw: bytes, to: str = "support@demo.localhost") -> dict[str, Any]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("li.lei@example.com", [to], raw)


async def test_mail_over_smtp_becomes_one_event_and_a_redelivery_none(deploy: MakeDeployment) -> None:
    port = free_port()
    d = await deploy(extra=smtp_config(port))
    await asyncio.to_thread(send, port, gbk_mail("order-1@example.com"))
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert delivery.routing_key == "demo.email.message.received"
    assert event["message"]["subject"] == "催促发货"
    assert "123456789012345678" in event["message"]["text"]
    assert event["message"]["reply_text"].strip() == "你好，我的订单号 123456789012345678 还没有发货。"
    assert event["message"]["external_id"] == "order-1@example.com"
    assert event["customer"]["display_name"] == "李雷"
    assert {"kind": "email", "value": "li.lei@example.com", "verified": False} in event["customer"][
        "identities"
    ]

    # An MTA retry of the same mail: 250 again, and no second event (the next event is the sentinel).
    await asyncio.to_thread(send, port, gbk_mail("order-1@example.com"))
    await asyncio.to_thread(send, port, gbk_mail("order-2@example.com"))
    received = await d.consumer.wait_for(2)
    assert validate_event(received[1].body)["message"]["external_id"] == "order-2@example.com"
    assert len(received) == 2


async def test_a_trusted_relays_verdict_verifies_the_sender(deploy: MakeDeployment) -> None:
    # Loopback is a trusted relay by default; the header is read in the normalizer process.
    port = free_port()
    trust = '\n[channels.email]\ntrusted_authserv_id = "mx.trusted.example"\n'
    d = await deploy(extra=smtp_config(port) + trust)
    verdict = (
        b"Authentication-Results: mx.trusted.example; dkim=pass header.d=example.com;"
        b" spf=pass smtp.mailfrom=example.com; dmarc=pass header.from=example.com\r\n"
    )
    forged = b"Authentication-Results: mx.elsewhere.example; dmarc=pass header.from=example.com\r\n"
    await asyncio.to_thread(send, port, verdict + gbk_mail("trusted@example.com"))
    await asyncio.to_thread(send, port, forged + gbk_mail("forged@example.com"))
    trusted, other = (validate_event(d.body) for d in await d.consumer.wait_for(2))

    assert trusted["message"]["external_id"] == "trusted@example.com"
    assert trusted["provenance"]["signature_verified"] is True
    assert {"kind": "email", "value": "li.lei@example.com", "verified": True} in trusted["customer"][
        "identities"
    ]
    assert other["message"]["external_id"] == "forged@example.com"
    assert other["provenance"]["signature_verified"] is False


async def test_relay_attempts_are_refused_and_nothing_is_published(deploy: MakeDeployment) -> None:
    port = free_port()
    d = await deploy(extra=smtp_config(port))
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await asyncio.to_thread(send, port, gbk_mail("relay@example.com"), "victim@elsewhere.example")
    code, reason = refused.value.recipients["victim@elsewhere.example"]
    assert code == 550
    assert reason.startswith(b"5.1.1")
    await asyncio.to_thread(send, port, gbk_mail("sentinel@example.com"))
    [only] = await d.consumer.wait_for(1)
    assert validate_event(only.body)["message"]["external_id"] == "sentinel@example.com"


async def test_mail_sent_with_swaks_arrives(deploy: MakeDeployment) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.fail("swaks is not installed (scripts/ensure-services.sh swaks)")
    port = free_port()
    d = await deploy(extra=smtp_config(port))
    result = await asyncio.to_thread(
        subprocess.run,
        [
            swaks,
            "--server",
            f"127.0.0.1:{port}",
            "--from",
            "ada@example.com",
            "--to",
            "support@demo.localhost",
            "--header",
            "Subject: Invoice question [#TG-77]",
            "--body",
            "Where is my invoice?",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    [delivery] = await d.consumer.wait_for(1)
    event = validate_event(delivery.body)
    assert event["message"]["subject"] == "Invoice question [#TG-77]"
    assert event["message"]["text"].strip() == "Where is my invoice?"


def normalizer_pids(pid: int) -> list[int]:
    """The gateway's normalizer processes, by the name they give themselves."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "tg-normalize"]


async def test_a_killed_normalizer_process_loses_no_mail(deploy: MakeDeployment) -> None:
    """Mail is parsed in the gateway's normalizer process: SIGKILL it while four clients send.
    Every mail still gets its 250 and exactly one event, a message or (for a mail the dying
    process was parsing) a quarantine record; another normalizer process takes over."""
    port = free_port()
    d = await deploy(extra=smtp_config(port))
    assert d.gateway.proc is not None
    [first] = normalizer_pids(d.gateway.proc.pid)
    ids = [f"storm-{i}@example.com" for i in range(80)]
    sent = asyncio.Queue[str]()
    for message_id in ids:
        sent.put_nowait(message_id)

    done: list[str] = []
    a_quarter_done = asyncio.Event()

    async def client() -> None:
        while not sent.empty():
            message_id = sent.get_nowait()
            await asyncio.to_thread(send, port, gbk_mail(message_id))  # raises unless 250
            done.append(message_id)
            if len(done) >= len(ids) // 4:
                a_quarter_done.set()

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await a_quarter_done.wait()
    os.kill(first, signal.SIGKILL)
    await asyncio.gather(*clients)

    def settled() -> bool:
        return len(d.consumer.distinct()) >= len(ids)

    await d.consumer.wait_until(settled, within=60)
    events = [validate_event(r.body) for r in d.consumer.distinct()]
    received = [e["message"]["external_id"] for e in events if e["type"] == "message.received"]
    quarantined = [e for e in events if e["type"] == "message.quarantined"]
    assert len(received) == len(set(received))
    assert set(received) <= set(ids)
    assert len(received) + len(quarantined) == len(ids)
    assert all("normalizer process died" in e["quarantine"]["reason"] for e in quarantined), quarantined
    for _ in range(100):  # another one starts a second after the death
        if normalizer_pids(d.gateway.proc.pid) not in ([], [first]):
            break
        await asyncio.sleep(0.1)
    assert normalizer_pids(d.gateway.proc.pid) not in ([], [first])
    assert "normalizer process exited" in d.gateway.log()


@pytest.fixture
def imap_server() -> Iterator[Dovecot]:
    with dovecot() as server:
        yield server


def imap_config(server: Dovecot) -> str:
    return f"""
[channels.email.inboxes.demo]
addresses = ["support@demo.localhost"]

[channels.email.imap.box]
host = "127.0.0.1"
port = {server.port}
tls = false
username = "{USER}"
password = "{PASSWORD}"
inbox = "demo"
folders = ["INBOX"]
poll_interval = "200ms"
rescan = "all"
reconnect_min = "100ms"
"""


async def test_mail_arriving_while_the_gateway_is_down_is_fetched_once_after_restart(
    imap_server: Dovecot, deploy: MakeDeployment
) -> None:
    # imap_server first: fixtures stop in reverse, so the gateway lets go of its IMAP session
    # before Dovecot shuts down (Dovecot would otherwise wait out its client).
    d = await deploy(extra=imap_config(imap_server))
    for n in range(2):
        imap_server.append(gbk_mail(f"before-{n}@example.com"))
    await d.consumer.wait_for(2, within=20)

    d.gateway.signal(signal.SIGTERM)
    assert await d.gateway.wait() == 0
    for n in range(2):
        imap_server.append(gbk_mail(f"during-{n}@example.com"))
    await d.gateway.start()
    imap_server.append(gbk_mail("sentinel@example.com"))
    expected = {f"{when}-{n}@example.com" for when in ("before", "during") for n in range(2)}
    expected.add("sentinel@example.com")

    def external_ids() -> set[str]:
        return {orjson.loads(r.body)["message"]["external_id"] for r in d.consumer.received}

    await d.consumer.wait_until(lambda: expected <= external_ids(), within=30)
    events = [validate_event(r.body) for r in d.consumer.received]
    assert external_ids() == expected
    # No duplicate tickets: each mail became exactly one message (a repeated delivery of the same
    # event, which at-least-once allows, carries the same message id).
    by_mail: dict[str, set[str]] = {}
    for event in events:
        by_mail.setdefault(event["message"]["external_id"], set()).add(event["message"]["id"])
    assert all(len(ids) == 1 for ids in by_mail.values()), by_mail
    assert all("\\Seen" in flags for flags in imap_server.flags().values())
