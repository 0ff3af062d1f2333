"""Erasure end to end: a customer who wrote by mail, WeChat and the web form is erased, on SQLite
(with the CLI, beside the running gateway) and on PostgreSQL (with the desk API); afterwards no
byte of their text, addresses or files is left in the store, searched byte-wise (SQLite: the
database, WAL and blob files; PostgreSQL: a pg_dump of the database and the blob files), and
``customer.erased`` arrived on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from psycopg.conninfo import conninfo_to_dict

from bench.wechat_send import DEV_APP_ID, build_callback, text_xml
from tests.e2e.conftest import Deployment, MakeDeployment
from tests.e2e.harness import ROOT, free_port
from tests.support.postgres import admin_dsn, fresh_database, require_postgres
from tests.support.schema import validate_event

pytestmark = pytest.mark.integration

DESK_KEY = "desk-e2e-key-0123456789abcdef"
ADDRESS = "lin.erasure@example.org"
NAME = "林 Erasure"
OPENID = "oErasureOpenId42"
MAIL_TEXT = "我的订单 ERASE-MAIL-TEXT-7f3a 还没有到"
MAIL_SUBJECT = "ERASE-MAIL-SUBJECT-91c2"
MESSAGE_ID = "erase-mail-1.ERASE-MSGID@example.org"
INVOICE = b"%PDF-1.4 ERASE-INVOICE-BYTES-5d1e " * 40  # only theirs
LOGO = b"\x89PNG KEEP-SHARED-LOGO-BYTES-2b2b " * 40  # also in the other customer's mail
WECHAT_TEXT = "微信消息 ERASE-WECHAT-TEXT-0b77"
FORM_TEXT = "Form message ERASE-FORM-TEXT-c3d9, phone +41 79 555 01 02"
FORM_SUBJECT = "ERASE-FORM-SUBJECT-44aa"
# A customer who is not erased: their bytes must stay.
OTHER_ADDRESS = "keep.me@example.org"
OTHER_TEXT = "KEEP-THIS-TEXT-e8e8"

NEEDLES = [
    ADDRESS, NAME, OPENID, MAIL_TEXT, MAIL_SUBJECT, MESSAGE_ID, WECHAT_TEXT, FORM_TEXT, FORM_SUBJECT,
    "ERASE-INVOICE-BYTES-5d1e",
]  # fmt: skip


def config_extra(smtp_port: int) -> str:
    return f"""
[channels.email.smtp]
host = "127.0.0.1"
port = {smtp_port}
hostname = "localhost"

[channels.email.inboxes.demo]
addresses = ["support@demo.localhost"]

[inboxes.wechat-demo]
tenant = "demo"

[channels.wechat.accounts.demo]
inbox = "wechat-demo"
app_id = "{DEV_APP_ID}"
token = "devtoken"
encoding_aes_key = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
mode = "safe"

[channels.identity]
keys = ["{DESK_KEY}"]

# The daemon's retention rounds run beside the erasure (nothing here is old enough to go).
[retention]
raw_bodies = "30d"
blobs = "90d"
messages = "365d"
interval = "1s"
"""


def sqlite_store(tmp: Path) -> str:
    # Small inline limit: the mail's raw body goes to a blob file, as big mails do.
    return f"""[store]
path = "{tmp / "data" / "ticketgate.db"}"
blob_dir = "{tmp / "data" / "blobs"}"
inline_raw_max = 512
"""


def postgres_store(tmp: Path, dsn: str) -> str:
    return f"""[store]
backend = "postgresql"
dsn = "{dsn}"
blob_dir = "{tmp / "data" / "blobs"}"
inline_raw_max = 512
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, str | None]]:
    if request.param == "sqlite":
        yield "sqlite", None
        return
    dsn = admin_dsn()
    require_postgres(dsn)
    with fresh_database(dsn, prefix="ticketgate_erase") as database:
        yield "postgresql", database


def mail(message_id: str, text: str, sender: str, name: str, subject: str, *files: bytes) -> bytes:
    message = EmailMessage()
    message["From"] = f"{name} <{sender}>"
    message["To"] = "support@demo.localhost"
    message["Subject"] = subject
    message["Message-ID"] = f"<{message_id}>"
    message.set_content(text, charset="utf-8", cte="8bit")
    for n, data in enumerate(files):
        message.add_attachment(data, maintype="application", subtype="octet-stream", filename=f"file{n}.bin")
    return message.as_bytes()


def send_mail(port: int, raw: bytes, sender: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(sender, ["support@demo.localhost"], raw)


async def wechat(session: aiohttp.ClientSession, d: Deployment, text: str, openid: str, msg_id: int) -> None:
    query, body = build_callback(text_xml(text, openid=openid, msg_id=msg_id))
    async with session.post(f"{d.gateway.url}/wechat/demo?{query}", data=body) as resp:
        assert (resp.status, await resp.text()) == (200, "success")


async def form(session: aiohttp.ClientSession, d: Deployment) -> None:
    data = {"name": NAME, "email": ADDRESS, "subject": FORM_SUBJECT, "message": FORM_TEXT}
    headers = {"Origin": d.gateway.url, "Accept": "application/json"}
    async with session.post(f"{d.gateway.url}/forms/demo", data=data, headers=headers) as resp:
        assert resp.status in (200, 202), await resp.text()


def events(d: Deployment, kind: str) -> list[dict[str, Any]]:
    return [validate_event(r.body) for r in d.consumer.distinct() if orjson.loads(r.body)["type"] == kind]


def store_bytes(tmp: Path, dsn: str | None) -> bytes:
    """Every byte the store holds: the database (SQLite files, or a pg_dump) and every blob file."""
    data = tmp / "data"
    parts: list[bytes] = []
    if dsn is None:
        parts += [p.read_bytes() for p in sorted(data.glob("ticketgate.db*"))]
    else:
        params = conninfo_to_dict(dsn)
        where = ["--host", str(params.get("host", "127.0.0.1")), "--port", str(params.get("port", 5432))]
        who = ["--username", str(params.get("user", "root")), "--dbname", str(params["dbname"])]
        command = ["pg_dump", "--no-owner", *where, *who]
        dump = subprocess.run(command, check=True, capture_output=True, timeout=60)
        parts.append(dump.stdout)
    parts += [p.read_bytes() for p in sorted((data / "blobs").rglob("*")) if p.is_file()]
    return b"\n".join(parts)


def found_in(haystack: bytes, needle: str | bytes) -> bool:
    """Present as bytes, or hex-encoded (pg_dump writes bytea columns as ``\\x...`` hex)."""
    raw = needle.encode() if isinstance(needle, str) else needle
    return raw in haystack or raw.hex().encode() in haystack


async def test_erased_customer_leaves_no_trace_in_the_store(
    deploy: MakeDeployment, tmp_path: Path, backend: tuple[str, str | None]
) -> None:
    kind, dsn = backend
    smtp_port = free_port()
    store = sqlite_store(tmp_path) if dsn is None else postgres_store(tmp_path, dsn)
    d = await deploy(extra=config_extra(smtp_port), store=store)
    raw_mail = mail(MESSAGE_ID, MAIL_TEXT, ADDRESS, NAME, MAIL_SUBJECT, INVOICE, LOGO)
    await asyncio.to_thread(send_mail, smtp_port, raw_mail, ADDRESS)
    other = mail("keep-1@example.org", OTHER_TEXT, OTHER_ADDRESS, "Keep", "keep", LOGO)
    await asyncio.to_thread(send_mail, smtp_port, other, OTHER_ADDRESS)
    async with aiohttp.ClientSession() as session:
        await wechat(session, d, WECHAT_TEXT, OPENID, 77001)
        await form(session, d)
        await d.consumer.wait_until(lambda: len(events(d, "message.received")) == 4, within=30)
        received = events(d, "message.received")
        mine = [e for e in received if OTHER_TEXT not in (e["message"]["text"] or "")]
        by_channel = {e["message"]["channel"]: e for e in mine}
        assert set(by_channel) == {"email", "wechat", "form"}
        customer = by_channel["email"]["customer"]["id"]
        assert by_channel["form"]["customer"]["id"] == customer  # the same address
        # The desk links the WeChat customer to them (verified evidence: a merge).
        wechat_customer = by_channel["wechat"]["customer"]["id"]
        async with session.post(
            f"{d.gateway.url}/api/v1/customers/{customer}/link",
            json={"customer_id": wechat_customer, "actor": "agent 7"},
            headers={"Authorization": f"Bearer {DESK_KEY}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        await d.consumer.wait_until(lambda: len(events(d, "customer.merged")) == 1, within=30)
        files = {a["name"]: a["sha256"] for e in mine for a in e["message"]["attachments"]}
        assert sorted(files) == ["file0.bin", "file1.bin"]
        raws = [e["provenance"]["raw_ref"].rsplit(":", 1)[1] for e in mine]
        for digest in [*files.values(), *raws]:
            async with session.get(f"{d.gateway.url}/blobs/{digest}") as resp:
                assert resp.status == 200, digest
        before = store_bytes(tmp_path, dsn)
        assert [n for n in NEEDLES if not found_in(before, n)] == []  # the search can see them

        if kind == "sqlite":  # the operator's command, beside the running gateway
            done = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "gateway.cli", "customer", "erase", customer, "--by", "dpo", "--yes",
                 "--config", str(d.gateway.config)],
                cwd=ROOT, capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()
            erasure = orjson.loads(done.stdout)
        else:  # a desk, through the API
            async with session.post(
                f"{d.gateway.url}/api/v1/customers/{wechat_customer}/erase",  # the merged id: followed
                json={"actor": "privacy request 12"},
                headers={"Authorization": f"Bearer {DESK_KEY}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                erasure = await resp.json()
        assert erasure["customer_id"] == customer
        assert erasure["merged_customers"] == [wechat_customer]
        assert erasure["counts"]["messages"] == 3

        await d.consumer.wait_until(lambda: len(events(d, "customer.erased")) == 1, within=30)
        (announced,) = events(d, "customer.erased")
        assert announced["customer"] == {"id": customer, "merged": [wechat_customer]}
        assert announced["erasure"]["digest"] == erasure["digest"]
        assert not any(found_in(orjson.dumps(announced), n) for n in NEEDLES)
        for digest in [*raws, files["file0.bin"]]:
            async with session.get(f"{d.gateway.url}/blobs/{digest}") as resp:
                assert resp.status == 404, digest
        # The logo is in the other customer's mail too: it stays theirs.
        async with session.get(f"{d.gateway.url}/blobs/{files['file1.bin']}") as resp:
            assert resp.status == 200

    d.gateway.signal(signal.SIGTERM)
    assert await d.gateway.wait() == 0
    assert "past its retention failed" not in d.gateway.log()
    after = store_bytes(tmp_path, dsn)
    assert [n for n in NEEDLES if found_in(after, n)] == []
    assert found_in(after, OTHER_TEXT)
    assert found_in(after, OTHER_ADDRESS)
    assert found_in(after, "KEEP-SHARED-LOGO-BYTES-2b2b")  # the other customer's file
