"""The email sender against a real SMTP server (aiosmtpd on port 0): threading headers, the subject
tag, STARTTLS and AUTH, and what SMTP answers become."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.email.sender import EmailSender, subject_for
from connectors.email.settings import SmarthostSettings
from core.channel import OutboundAttachment, OutboundReply, SendError
from core.errors import NormalizationError
from core.model import Identity, RawEnvelope
from normalizers.email import normalize_email
from tests.connectors.email.email_kit import self_signed
from tests.support.smtp_sink import SmtpSink

NOW = datetime(2026, 12, 5, 7, 0, tzinfo=UTC)
REPLY_ID = "rpl_019ae4f0000070008000000000000001"


class _Clock:
    def now(self) -> datetime:
        return NOW


class _Blobs:
    def __init__(self, blobs: dict[str, bytes] | None = None) -> None:
        self.blobs = blobs or {}

    async def read(self, sha256: str) -> bytes | None:
        return self.blobs.get(sha256)


class _Ctx:
    def __init__(self, blobs: dict[str, bytes] | None = None) -> None:
        self.clock = _Clock()
        self.blobs = _Blobs(blobs)


def sender(port: int, ctx: _Ctx | None = None, **smarthost: Any) -> EmailSender:
    settings = SmarthostSettings.model_validate(
        {"host": "127.0.0.1", "port": port, "security": "none", "from_name": "Demo support", **smarthost}
    )
    return EmailSender(settings, {"demo": "support@demo.localhost"}, ctx=ctx or _Ctx())  # type: ignore[arg-type]


def reply(**overrides: Any) -> OutboundReply:
    fields: dict[str, Any] = {
        "reply_id": REPLY_ID,
        "command_id": "desk-1",
        "tenant": "demo",
        "channel": "email",
        "inbox": "demo",
        "thread_id": "thr_1",
        "thread_number": 42,
        "subject": "催促发货",
        "recipient": Identity(kind="email", value="li.lei@example.com"),
        "text": "您好，已经发货了。",
        "agent_name": "Ada",
        "answering_external_id": "order-2@example.com",
        "references": ("order-1@example.com", "order-2@example.com"),
    }
    fields.update(overrides)
    return OutboundReply(**fields)


@pytest.fixture
async def sink() -> Any:
    running = await SmtpSink().start()
    yield running
    await running.close()


async def test_the_reply_threads_on_the_customers_mail_and_carries_the_tag(sink: SmtpSink) -> None:
    sent = await sender(sink.port).send(reply())
    [mail] = sink.mails
    message = mail.message
    assert sent.provider_message_id == f"{REPLY_ID}@demo.localhost"
    assert message["Message-ID"] == f"<{REPLY_ID}@demo.localhost>"
    assert message["In-Reply-To"] == "<order-2@example.com>"
    assert message["References"] == "<order-1@example.com> <order-2@example.com>"
    assert message["Subject"] == "Re: 催促发货 [#TG-42]"
    [author] = message["From"].addresses
    assert (author.display_name, author.addr_spec) == ("Ada (Demo support)", "support@demo.localhost")
    assert message["To"] == "li.lei@example.com"
    assert message["X-Ticketgate-Reply"] == REPLY_ID
    assert "Auto-Submitted" not in message  # a person wrote it
    assert message.get_content().strip() == "您好，已经发货了。"
    assert (mail.mail_from, mail.rcpt_tos) == ("support@demo.localhost", ["li.lei@example.com"])


async def test_html_attachments_and_reply_to(sink: SmtpSink) -> None:
    digest = "ab" * 32
    ctx = _Ctx({digest: b"%PDF-1.4 invoice"})
    attachment = OutboundAttachment(
        name="invoice.pdf", content_type="application/pdf", size=16, sha256=digest
    )
    await sender(sink.port, ctx).send(
        reply(
            text=None,
            html="<p>See <b>attached</b>.</p>",
            attachments=(attachment,),
            answering={"reply_to": ["orders@example.com"]},
            recipient=Identity(kind="email", value="li.lei@example.com", verified=True),
        )
    )
    message = sink.mails[0].message
    assert message["To"] == "orders@example.com"
    parts = {part.get_content_type(): part for part in message.walk()}
    assert "See attached." in parts["text/plain"].get_content()
    assert "<b>attached</b>" in parts["text/html"].get_content()
    assert parts["application/pdf"].get_filename() == "invoice.pdf"
    assert parts["application/pdf"].get_content() == b"%PDF-1.4 invoice"


async def test_starttls_and_auth(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    secured = await SmtpSink(tls_cert=(cert, key), users={"relay": "s3cret-password"}).start()
    try:
        out = sender(
            secured.port,
            host="localhost",
            security="starttls",
            ca_file=str(cert),
            username="relay",
            password="s3cret-password",
        )
        await out.send(reply())
        assert len(secured.mails) == 1
        wrong = sender(
            secured.port,
            host="localhost",
            security="starttls",
            ca_file=str(cert),
            username="relay",
            password="wrong-password",
        )
        with pytest.raises(SendError) as refused:
            await wrong.send(reply())
        assert (refused.value.reason, refused.value.permanent) == ("auth", False)
    finally:
        await secured.close()


async def test_a_temporary_refusal_is_retried_a_permanent_one_ends_the_reply(sink: SmtpSink) -> None:
    sink.refuse_data = 1
    with pytest.raises(SendError) as later:
        await sender(sink.port).send(reply())
    assert (later.value.reason, later.value.permanent) == ("provider_error", False)
    assert later.value.detail.startswith("451")

    sink.refuse_rcpt = {"li.lei@example.com"}
    with pytest.raises(SendError) as never:
        await sender(sink.port).send(reply())
    assert (never.value.reason, never.value.permanent) == ("recipient_unreachable", True)
    assert sink.mails == []


async def test_a_smarthost_that_is_down_is_retried(sink: SmtpSink) -> None:
    port = sink.port
    await sink.close()
    with pytest.raises(SendError) as down:
        await sender(port).send(reply())
    assert down.value.permanent is False


async def test_our_own_reply_coming_back_is_quarantined_not_a_ticket(sink: SmtpSink) -> None:
    await sender(sink.port).send(reply())
    envelope = RawEnvelope(
        channel="email", tenant="demo", inbox="demo", body=sink.mails[0].raw, received_at=NOW
    )
    with pytest.raises(NormalizationError, match="own reply"):
        normalize_email(envelope)


def test_the_subject_gets_the_tag_once_and_re_once() -> None:
    assert subject_for("Order late", 7) == "Re: Order late [#TG-7]"
    assert subject_for("Re: Order late [#TG-7]", 7) == "Re: Order late [#TG-7]"
    assert subject_for(None, 7) == "Re: [#TG-7]"


async def test_connections_are_reused_checked_and_dropped_when_idle_or_stale(sink: SmtpSink) -> None:
    out = sender(sink.port)
    for n in range(3):
        await out.send(reply(reply_id=f"rpl_{n:032x}"))
    assert (len(sink.mails), sink.connections) == (3, 1)  # one session, RSET between mails

    sink.drop_on_rset = True  # the server dropped the idle connection meanwhile
    await out.send(reply(reply_id=f"rpl_{9:032x}"))
    assert (len(sink.mails), sink.connections) == (4, 2)  # nothing lost: a fresh session

    sink.drop_on_rset = False
    fresh = sender(sink.port, idle_timeout=0)
    await fresh.send(reply())
    await fresh.send(reply())
    assert sink.connections == 4  # past idle_timeout a connection is not reused
    await out.close()
    await fresh.close()


async def test_an_unverified_sender_is_answered_at_from_not_at_its_reply_to(sink: SmtpSink) -> None:
    # A forged From with the forger's Reply-To must not get the real customer's answer.
    await sender(sink.port).send(reply(answering={"reply_to": ["forger@evil.example"]}))
    assert sink.mails[0].rcpt_tos == ["li.lei@example.com"]
