"""Mail fallbacks of web-chat replies, on a real SQLite store with the dispatcher's clock faked and
the real email sender talking to a local aiosmtpd sink: a reply no widget received goes by mail
after the rule's delay (once, as its own reply linked to the original); a delivery before the delay
cancels it; a customer without a verified email gets nothing (counted); a restart keeps it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.email.sender import EmailSender
from connectors.email.settings import SmarthostSettings
from core import events
from core.channel import OutboundReply, SenderSpec, Sent
from core.events import CustomerView, Event
from core.model import CanonicalMessage, Identity, Placement, RawEnvelope
from core.settings import OutboxSettings, ReplySettings, StoreSettings
from dedupe.policy import PlacementPolicy
from gateway.control import Applied, apply_control
from gateway.metrics import Metrics
from gateway.replies import Dispatcher
from gateway.reply_commands import ReplyIntake
from gateway.store.sqlite import SQLiteStore
from tests.support.schema import validate_event
from tests.support.smtp_sink import SmtpSink

NOW = datetime.now(UTC).replace(microsecond=0)
EMAIL = "ada@example.com"
KINDS = {"webchat": frozenset({"webchat_visitor"}), "email": frozenset({"email"})}


class Widget:
    """The web-chat sender as the channel answers: held for the visitor under the reply id."""

    def __init__(self) -> None:
        self.sent: list[OutboundReply] = []

    async def send(self, reply: OutboundReply) -> Sent:
        self.sent.append(reply)
        return Sent(provider_message_id=reply.reply_id)


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(seconds=5)

    def __call__(self) -> datetime:
        return self.now


class _Ctx:
    """What the email sender reads of its channel context (blobs for attachments, the Date clock)."""

    class _Blobs:
        async def read(self, sha256: str) -> bytes | None:
            return None

    class _Clock:
        def now(self) -> datetime:
            return datetime.now(UTC)

    blobs = _Blobs()
    clock = _Clock()


def _open(path: Path) -> SQLiteStore:
    return SQLiteStore(
        StoreSettings.model_validate(
            {"path": path / "tg.db", "blob_dir": path / "blobs", "min_free_disk_mb": 0}
        ),
        OutboxSettings(),
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = _open(tmp_path)
    await instance.open()
    yield instance
    await instance.close()


@pytest.fixture
async def sink() -> AsyncIterator[SmtpSink]:
    running = await SmtpSink().start()
    yield running
    await running.close()


def _build(m: CanonicalMessage, p: Placement, c: CustomerView, subject: str | None, ref: str | None) -> Event:
    return events.message_received(
        m, placement=p, customer=c, thread_subject=subject, raw_ref=ref, signature_verified=True, retry=0,
        public_url=None, occurred_at=m.received_at,
    )  # fmt: skip


async def chat(store: SQLiteStore, *, signed_in: bool = True) -> Placement:
    """A web-chat message: a signed-in visitor (verified email), or an anonymous one whose typed
    email is only a claim."""
    identities = (
        Identity(kind="webchat_visitor", value="demo:s-1", verified=signed_in),
        Identity(kind="email", value=EMAIL, verified=signed_in),
    )
    message = CanonicalMessage(
        channel="webchat", tenant="demo", inbox="demo", external_id="demo:s-1:c-1", received_at=NOW,
        identities=identities, subject="Where is my order?", text="hello?", extra={"session": "s-1"},
    )  # fmt: skip
    envelope = RawEnvelope(channel="webchat", tenant="demo", inbox="demo", body=b"hello?", received_at=NOW)
    (placement,) = await store.accept(
        envelope, [message], policies=[PlacementPolicy(window=86400.0)], build_event=_build
    )
    return placement


async def command(store: SQLiteStore, thread_id: str, command_id: str) -> None:
    body = {"type": "reply.requested", "command_id": command_id, "thread_id": thread_id, "tenant": "demo"}
    body["text"] = f"answer {command_id}"
    applied = await apply_control(store, orjson.dumps(body), ReplyIntake(settings=ReplySettings()))
    assert applied is Applied.APPLIED


def dispatcher(
    store: SQLiteStore, clock: Clock, sink: SmtpSink, widget: Widget, metrics: Metrics, **rule: Any
) -> Dispatcher:
    smarthost = SmarthostSettings.model_validate({"host": "127.0.0.1", "port": sink.port, "security": "none"})
    mail = EmailSender(smarthost, {"demo": "support@demo.localhost"}, ctx=_Ctx())  # type: ignore[arg-type]
    settings = ReplySettings.model_validate(
        {"fallback": [{"channel": "webchat", "after": "60s", **rule}], "backoff_base": 1.0}
    )
    senders = {"webchat": SenderSpec(sender=widget), "email": SenderSpec(sender=mail)}
    return Dispatcher(settings, store, metrics, senders, kinds=KINDS, now=clock)


async def reply_events(store: SQLiteStore) -> list[dict[str, Any]]:
    rows = await store.outbox_fetch(1000)
    return [validate_event(r.body) for r in rows if r.type.startswith("reply.")]


def counted(metrics: Metrics, outcome: str, channel: str = "webchat") -> float:
    value = metrics.registry.get_sample_value(
        "ticketgate_reply_fallbacks_total", {"channel": channel, "outcome": outcome}
    )
    return value or 0.0


async def test_a_reply_no_widget_received_goes_by_mail_after_the_delay_once(
    store: SQLiteStore, sink: SmtpSink
) -> None:
    placement = await chat(store)
    clock, widget, metrics = Clock(), Widget(), Metrics()
    gate = dispatcher(store, clock, sink, widget, metrics)
    await command(store, placement.thread_id, "c1")
    assert await gate.run_once() == 1
    [held] = widget.sent
    # Waiting for the delay holds no later reply of the thread back.
    await command(store, placement.thread_id, "c2")
    assert await gate.run_once() == 1
    assert len(widget.sent) == 2
    clock.now += timedelta(seconds=59)
    assert await gate.run_once() == 0
    assert sink.mails == []
    assert counted(metrics, "scheduled") == 2

    clock.now += timedelta(seconds=2)
    # Both are due; the thread's order holds among its mails too: c1's first, then c2's.
    assert await gate.run_once() == 1
    assert await gate.run_once() == 1
    assert await gate.run_once() == 0  # each once
    assert len(sink.mails) == 2
    first = sink.mails[0].message
    assert first["To"] == EMAIL
    assert first.get_content().strip() == "answer c1"
    assert "[#TG-" in first["Subject"]

    replies = await store.reply_list(placement.thread_id)
    original = next(r for r in replies if r.id == held.reply_id)
    assert (original.status, original.channel, original.fallback_of) == ("sent", "webchat", None)
    fallback = next(r for r in replies if r.fallback_of == held.reply_id)
    assert (fallback.status, fallback.channel, fallback.thread_id) == ("sent", "email", original.thread_id)
    assert fallback.id != original.id
    sent = [e for e in await reply_events(store) if e["type"] == "reply.sent"]
    assert [e["reply"]["channel"] for e in sent] == ["webchat", "webchat", "email", "email"]
    mailed = next(e for e in sent if e["reply"]["id"] == fallback.id)
    assert mailed["reply"]["fallback_of"] == held.reply_id
    assert mailed["reply"]["provider_message_id"] == f"{fallback.id}@demo.localhost"
    assert counted(metrics, "sent", "email") == 2
    backlog = await store.reply_backlog()
    assert (backlog.pending, backlog.sending) == (0, 0)


async def test_a_delivery_before_the_delay_cancels_the_mail(store: SQLiteStore, sink: SmtpSink) -> None:
    placement = await chat(store)
    clock, widget, metrics = Clock(), Widget(), Metrics()
    gate = dispatcher(store, clock, sink, widget, metrics)
    await command(store, placement.thread_id, "c1")
    await command(store, placement.thread_id, "c2")
    await gate.run_once()
    await gate.run_once()
    first, second = widget.sent
    # The widget reports the first (through ctx.report_delivery): its fallback is dropped at once.
    assert await gate.report("webchat", first.reply_id, "delivered", clock.now, None, None)
    assert counted(metrics, "cancelled") == 1
    assert all(r.fallback_of != first.reply_id for r in await store.reply_list(placement.thread_id))
    # The second is read on a report the dispatcher did not see (another instance's, say): when
    # its fallback falls due it is checked again and dropped without a mail.
    assert await store.reply_report("webchat", second.reply_id, "read", clock.now)
    clock.now += timedelta(seconds=61)
    assert await gate.run_once() == 1
    assert sink.mails == []
    assert counted(metrics, "cancelled", "email") == 1
    replies = await store.reply_list(placement.thread_id)
    assert [(r.channel, r.status) for r in replies] == [("webchat", "sent"), ("webchat", "sent")]
    assert [e["reply"]["channel"] for e in await reply_events(store) if e["type"] == "reply.sent"] == [
        "webchat",
        "webchat",
    ]


async def test_no_verified_email_no_mail_and_the_reason_is_counted(
    store: SQLiteStore, sink: SmtpSink
) -> None:
    placement = await chat(store, signed_in=False)  # the email was typed, not vouched for by the site
    clock, widget, metrics = Clock(), Widget(), Metrics()
    gate = dispatcher(store, clock, sink, widget, metrics)
    await command(store, placement.thread_id, "c1")
    assert await gate.run_once() == 1
    assert counted(metrics, "no_verified_email") == 1
    clock.now += timedelta(hours=1)
    assert await gate.run_once() == 0
    assert sink.mails == []
    assert len(await store.reply_list(placement.thread_id)) == 1


async def test_the_pending_fallback_survives_a_restart(tmp_path: Path, sink: SmtpSink) -> None:
    store = _open(tmp_path)
    await store.open()
    placement = await chat(store)
    clock, widget = Clock(), Widget()
    await command(store, placement.thread_id, "c1")
    assert await dispatcher(store, clock, sink, widget, Metrics()).run_once() == 1
    await store.close()

    again = _open(tmp_path)  # a new process: nothing of the first one's memory
    await again.open()
    try:
        clock.now += timedelta(seconds=61)
        metrics = Metrics()
        assert await dispatcher(again, clock, sink, Widget(), metrics).run_once() == 1
        [mail] = sink.mails
        assert mail.rcpt_tos == [EMAIL]
        assert counted(metrics, "sent", "email") == 1
    finally:
        await again.close()


def test_a_rule_matches_its_channel_and_inbox() -> None:
    settings = ReplySettings.model_validate(
        {"fallback": [{"channel": "webchat", "inbox": "shop", "after": "15m", "email_inbox": "support"}]}
    )
    [rule] = settings.fallback
    assert rule.after == 900.0
    assert rule.matches("webchat", "shop")
    assert not rule.matches("webchat", "demo")
    assert not rule.matches("email", "shop")
    assert ReplySettings().fallback == ()
    with pytest.raises(ValueError, match="needs no mail fallback"):
        ReplySettings.model_validate({"fallback": [{"channel": "email"}]})
