"""The reply dispatcher on a real SQLite store with a recording sender: order, window, retries,
permanent refusals, channel choice, delivery reports; and the command over the control queue's
``apply_control``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from core import events
from core.channel import OutboundReply, SendError, SenderSpec, Sent
from core.events import CustomerView, Event
from core.model import CanonicalMessage, Identity, Placement, RawEnvelope
from core.settings import OutboxSettings, ReplySettings, StoreSettings
from dedupe.policy import PlacementPolicy
from gateway.control import Applied, apply_control
from gateway.metrics import Metrics
from gateway.replies import Dispatcher, TokenBucket, backoff
from gateway.reply_commands import ReplyIntake
from gateway.store.sqlite import SQLiteStore
from tests.support.schema import validate_event

NOW = datetime.now(UTC).replace(microsecond=0)


class Recorder:
    """A sender that records replies and answers from a script (an exception or a Sent)."""

    def __init__(self, *script: Exception) -> None:
        self.sent: list[OutboundReply] = []
        self.script = list(script)

    async def send(self, reply: OutboundReply) -> Sent:
        self.sent.append(reply)
        if self.script:
            raise self.script.pop(0)
        return Sent(provider_message_id=f"pm-{len(self.sent)}")


class Clock:
    """The dispatcher's clock; it starts a little after the store's (which is the real one)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC) + timedelta(seconds=5)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    instance = SQLiteStore(
        StoreSettings.model_validate(
            {"path": tmp_path / "tg.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
        ),
        OutboxSettings(),
    )
    await instance.open()
    yield instance
    await instance.close()


def _build(m: CanonicalMessage, p: Placement, c: CustomerView, subject: str | None, ref: str | None) -> Event:
    return events.message_received(
        m, placement=p, customer=c, thread_subject=subject, raw_ref=ref, signature_verified=True, retry=0,
        public_url=None, occurred_at=m.received_at,
    )  # fmt: skip


async def inbound(
    store: SQLiteStore,
    external_id: str,
    *,
    channel: str = "email",
    at: datetime = NOW,
    customer: str = "li.lei@example.com",
    **extra: Any,
) -> Placement:
    identities = (Identity(kind="email", value=customer, verified=True),)
    if channel == "wechat":
        identities = (Identity(kind="wechat_openid", value="o-li"),)
    message = CanonicalMessage(
        channel=channel, tenant="demo", inbox="demo", external_id=external_id, received_at=at,
        identities=identities, subject="Where is my order?", text=f"text {external_id}", extra=extra,
    )  # fmt: skip
    envelope = RawEnvelope(
        channel=channel, tenant="demo", inbox="demo", body=external_id.encode(), received_at=at
    )
    (placement,) = await store.accept(
        envelope, [message], policies=[PlacementPolicy(window=86400.0)], build_event=_build
    )
    return placement


Make = Callable[..., Dispatcher]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make(store: SQLiteStore, clock: Clock) -> Make:
    def build(senders: dict[str, SenderSpec], **settings: Any) -> Dispatcher:
        kinds = {"email": frozenset({"email"}), "wechat": frozenset({"wechat_openid"})}
        config = ReplySettings.model_validate({"backoff_base": 1.0, "backoff_cap": 8.0, **settings})
        return Dispatcher(config, store, Metrics(), senders, kinds=kinds, now=clock)

    return build


async def command(store: SQLiteStore, thread_id: str, command_id: str, **fields: Any) -> Applied:
    body = {"type": "reply.requested", "command_id": command_id, "thread_id": thread_id, "tenant": "demo"}
    body.setdefault("text", f"answer {command_id}")
    body.update(fields)
    return await apply_control(store, orjson.dumps(body), ReplyIntake(settings=ReplySettings()))


async def reply_events(store: SQLiteStore) -> list[dict[str, Any]]:
    rows = await store.outbox_fetch(1000)
    return [validate_event(r.body) for r in rows if r.type.startswith("reply.")]


async def test_replies_go_out_in_thread_order_with_what_answering_needs(
    store: SQLiteStore, make: Make
) -> None:
    first = await inbound(store, "m1@example.com", reply_to=["orders@example.com"])
    second = await inbound(store, "m2@example.com", at=NOW + timedelta(seconds=1))
    sender = Recorder()
    dispatcher = make({"email": SenderSpec(sender=sender)})
    for n in range(3):
        assert await command(store, first.thread_id, f"c{n}", agent_name="Ada") is Applied.APPLIED
    assert await command(store, first.thread_id, "c0", agent_name="Ada") is Applied.APPLIED  # a repeat

    while await dispatcher.run_once():
        pass

    assert [r.command_id for r in sender.sent] == ["c0", "c1", "c2"]
    out = sender.sent[0]
    assert (out.channel, out.inbox, out.recipient.value, out.agent_name) == (
        "email",
        "demo",
        "li.lei@example.com",
        "Ada",
    )
    assert out.thread_number == 1
    assert out.answering_external_id == "m2@example.com"
    assert out.references == ("m1@example.com", "m2@example.com")
    assert sender.sent[1].references[-1] == "pm-1"  # our earlier reply in the thread
    assert second.thread_id == first.thread_id
    sent = await reply_events(store)
    assert [e["type"] for e in sent] == ["reply.sent"] * 3
    assert [e["reply"]["provider_message_id"] for e in sent] == ["pm-1", "pm-2", "pm-3"]


async def test_outside_the_window_the_reply_fails_without_a_call(
    store: SQLiteStore, make: Make, clock: Clock
) -> None:
    placed = await inbound(store, "o-1", channel="wechat", at=NOW - timedelta(hours=49))
    sender = Recorder()
    templates: list[OutboundReply] = []
    spec = SenderSpec(
        sender=sender,
        window=48 * 3600.0,
        outside_window=lambda r: bool(templates.append(r)) or r.options.get("template") is not None,
    )
    dispatcher = make({"wechat": spec})
    await command(store, placed.thread_id, "late")
    await command(store, placed.thread_id, "template", options={"template": "shipping_update"})
    while await dispatcher.run_once():
        pass
    assert [r.command_id for r in sender.sent] == ["template"]
    [failed, sent] = await reply_events(store)
    assert (failed["type"], failed["reply"]["reason"]) == ("reply.failed", "window_closed")
    assert (failed["reply"]["attempts"], failed["reply"]["channel"]) == (1, "wechat")
    assert sent["type"] == "reply.sent"


async def test_transient_failures_are_retried_with_backoff_then_sent(
    store: SQLiteStore, make: Make, clock: Clock
) -> None:
    placed = await inbound(store, "m1@example.com")
    sender = Recorder(
        SendError("provider_error", "451 try later", permanent=False),
        SendError("rate_limited", "421 slow down", permanent=False, retry_after=30.0),
    )
    dispatcher = make({"email": SenderSpec(sender=sender)})
    await command(store, placed.thread_id, "c")
    assert await dispatcher.run_once() == 1
    assert await dispatcher.run_once() == 0  # waits for its backoff
    clock.now += timedelta(seconds=1.1)
    assert await dispatcher.run_once() == 1
    clock.now += timedelta(seconds=10)
    assert await dispatcher.run_once() == 0  # the provider asked for 30 s
    clock.now += timedelta(seconds=25)
    assert await dispatcher.run_once() == 1
    [sent] = await reply_events(store)
    assert (sent["type"], sent["reply"]["attempts"]) == ("reply.sent", 3)
    assert len(sender.sent) == 3


async def test_retries_run_out_and_permanent_refusals_end_the_reply(
    store: SQLiteStore, make: Make, clock: Clock
) -> None:
    placed = await inbound(store, "m1@example.com")
    transient = SendError("provider_error", "451", permanent=False)
    sender = Recorder(transient, transient, SendError("rejected", "554 spam", permanent=True))
    dispatcher = make({"email": SenderSpec(sender=sender)}, max_attempts=2)
    await command(store, placed.thread_id, "a")
    await command(store, placed.thread_id, "b")
    for _ in range(4):
        await dispatcher.run_once()
        clock.now += timedelta(seconds=10)
    expired, rejected = await reply_events(store)
    assert (expired["reply"]["command_id"], expired["reply"]["reason"]) == ("a", "expired")
    assert "451" in expired["reply"]["detail"]
    assert (rejected["reply"]["command_id"], rejected["reply"]["reason"]) == ("b", "rejected")
    assert rejected["reply"]["detail"] == "554 spam"


async def test_the_desk_chooses_among_the_customers_channels(store: SQLiteStore, make: Make) -> None:
    placed = await inbound(store, "m1@example.com")
    dispatcher = make({"email": SenderSpec(sender=Recorder())})
    await command(store, placed.thread_id, "wx", channel="wechat")
    await dispatcher.run_once()
    [failed] = await reply_events(store)
    assert (failed["reply"]["reason"], failed["reply"]["channel"]) == ("unsupported", "wechat")


async def test_refused_commands_are_answered_on_the_bus(store: SQLiteStore) -> None:
    placed = await inbound(store, "m1@example.com")
    body = {
        "type": "reply.requested",
        "command_id": "x",
        "thread_id": placed.thread_id,
        "tenant": "other",
        "text": "hi",
    }
    intake = ReplyIntake(settings=ReplySettings())
    assert await apply_control(store, orjson.dumps(body), intake) is Applied.REFUSED
    assert await command(store, placed.thread_id, "same") is Applied.APPLIED
    assert await command(store, placed.thread_id, "same", text="another body") is Applied.REFUSED
    assert await command(store, placed.thread_id, "none", text="") is Applied.MALFORMED
    assert await apply_control(store, orjson.dumps({**body, "tenant": "demo"}), None) is Applied.MALFORMED
    refusals = await reply_events(store)
    assert [(e["tenant"], e["reply"]["reason"]) for e in refusals] == [
        ("other", "rejected"),
        ("demo", "rejected"),
    ]
    assert len(await store.reply_list(placed.thread_id)) == 1


async def test_delivery_reports_become_events_once(store: SQLiteStore, make: Make) -> None:
    placed = await inbound(store, "m1@example.com")
    dispatcher = make({"email": SenderSpec(sender=Recorder())})
    await command(store, placed.thread_id, "c")
    await dispatcher.run_once()
    assert await dispatcher.report("email", "pm-1", "delivered", NOW, None, None)
    assert await dispatcher.report("email", "pm-1", "read", NOW, None, None)
    assert not await dispatcher.report("email", "pm-unknown", "read", NOW, None, None)
    assert [e["type"] for e in await reply_events(store)] == ["reply.sent", "reply.delivered", "reply.read"]


async def test_token_bucket_spaces_sends_after_the_burst() -> None:
    ticks = [0.0]
    bucket = TokenBucket(rate=2.0, burst=2, clock=lambda: ticks[0])
    await bucket.acquire()
    await bucket.acquire()
    ticks[0] = 0.5  # one token back
    await bucket.acquire()
    assert bucket._tokens < 1.0


def test_backoff_is_capped_exponential_with_jitter() -> None:
    settings = ReplySettings(backoff_base=2.0, backoff_cap=60.0)
    for attempt, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)]:
        delays = [backoff(attempt, settings) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1
    assert backoff(1, settings, retry_after=30.0) == 30.0


def test_message_received_says_which_channels_can_answer_and_until_when() -> None:
    message = CanonicalMessage(
        channel="wechat", tenant="demo", inbox="oa", external_id="1", received_at=NOW,
        identities=(Identity(kind="wechat_openid", value="o-li"),),
    )  # fmt: skip
    customer = CustomerView(
        id="cus_1",
        identities=(Identity(kind="wechat_openid", value="o-li"), Identity(kind="email", value="li@e.com")),
        display_name=None,
    )
    channels = [
        events.ReplyChannel(name="email", window=None, identity_kinds=frozenset({"email"})),
        events.ReplyChannel(name="wechat", window=48 * 3600.0, identity_kinds=frozenset({"wechat_openid"})),
        events.ReplyChannel(name="whatsapp", window=24 * 3600.0, identity_kinds=frozenset({"wa_id"})),
    ]
    block = events.reply_options(message, customer, channels)
    assert block["default_channel"] == "wechat"
    assert block["channels"] == [
        {"channel": "wechat", "inbox": "oa", "window_seconds": 172800.0,
         "window_ends_at": events.isoformat(NOW + timedelta(hours=48))},
        {"channel": "email", "inbox": None, "window_seconds": None, "window_ends_at": None},
    ]  # fmt: skip
    placement = Placement(message_id=message.message_id(), thread_id="thr_1", customer_id="cus_1", sequence=1,
                          is_new_thread=True, thread_number=7)  # fmt: skip
    event = events.message_received(
        message, placement=placement, customer=customer, thread_subject=None, raw_ref=None,
        signature_verified=True, retry=0, public_url=None, occurred_at=NOW, reply=block,
    )  # fmt: skip
    body = validate_event(event.body)
    assert (body["thread"]["number"], body["thread"]["tag"]) == (7, "[#TG-7]")
    assert body["reply"] == block


@pytest.fixture
async def https_files(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A local HTTPS server (self-signed) with a small file, a large one and a 404."""
    import ssl

    from aiohttp import web

    from tests.connectors.email.email_kit import self_signed

    cert, key = self_signed(tmp_path)

    async def invoice(request: web.Request) -> web.Response:
        return web.Response(body=b"%PDF-1.4 invoice")

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    def moved(to: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            raise web.HTTPFound(to.replace("PORT", str(request.url.port)))

        return handler

    app = web.Application()
    app.router.add_get("/invoice.pdf", invoice)
    app.router.add_get("/huge.bin", huge)
    app.router.add_get("/moved", moved("/invoice.pdf"))
    app.router.add_get("/to-private", moved("https://10.255.255.1/invoice.pdf"))
    app.router.add_get("/to-http", moved("http://localhost:PORT/invoice.pdf"))
    runner = web.AppRunner(app)
    await runner.setup()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(str(cert), str(key))
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://localhost:{port}", cert
    await runner.cleanup()


async def test_attachment_urls_are_fetched_from_public_addresses_only(
    store: SQLiteStore, make: Make, https_files: tuple[str, Path]
) -> None:
    base, ca = https_files
    port = base.rpartition(":")[2]
    placed = await inbound(store, "m1@example.com")
    sender = Recorder()

    def url(name: str, path: str) -> dict[str, str]:
        return {"name": name, "url": path if path.startswith("https:") else f"{base}{path}"}

    strict = make({"email": SenderSpec(sender=sender)}, fetch_ca_file=str(ca))
    await command(store, placed.thread_id, "by-name", attachments=[url("a", "/invoice.pdf")])
    await command(store, placed.thread_id, "literal", attachments=[url("b", f"https://127.0.0.1:{port}/x")])
    await command(store, placed.thread_id, "mapped", attachments=[url("c", f"https://[::ffff:10.0.0.1]:{port}/")])
    while await strict.run_once():
        pass
    await strict.close()
    allowed = make(
        {"email": SenderSpec(sender=sender)}, fetch_ca_file=str(ca), fetch_allow_networks=["127.0.0.0/8"]
    )
    await command(store, placed.thread_id, "moved", attachments=[url("d.pdf", "/moved")])
    await command(store, placed.thread_id, "to-private", attachments=[url("e", "/to-private")])
    await command(store, placed.thread_id, "to-http", attachments=[url("f", "/to-http")])
    while await allowed.run_once():
        pass
    await allowed.close()

    outcomes = {
        e["reply"]["command_id"]: (e["type"], e["reply"].get("reason"), e["reply"].get("detail"))
        for e in await reply_events(store)
        if e["type"] != "reply.requested"
    }
    assert outcomes["by-name"][:2] == ("reply.failed", "rejected")
    assert "resolves to no public address" in outcomes["by-name"][2]
    assert outcomes["literal"][:2] == ("reply.failed", "rejected")
    assert "127.0.0.1 is not a public address" in outcomes["literal"][2]
    assert outcomes["mapped"][:2] == ("reply.failed", "rejected")
    assert outcomes["moved"][:2] == ("reply.sent", None)
    assert outcomes["to-private"][:2] == ("reply.failed", "rejected")
    assert "10.255.255.1 is not a public address" in outcomes["to-private"][2]
    assert outcomes["to-http"][:2] == ("reply.failed", "rejected")
    assert "only https" in outcomes["to-http"][2]
    [sent] = sender.sent
    assert await store.read_blob(sent.attachments[0].sha256) == b"%PDF-1.4 invoice"


async def test_attachments_by_blob_and_by_https_url_with_caps(
    store: SQLiteStore, make: Make, https_files: tuple[str, Path]
) -> None:
    base, ca = https_files
    placed = await inbound(store, "m1@example.com")
    digest = await store.blob_put(b"kept before", "text/plain")
    sender = Recorder()
    dispatcher = make(
        {"email": SenderSpec(sender=sender)},
        fetch_ca_file=str(ca),
        max_attachment_bytes=1000,
        fetch_allow_networks=["127.0.0.0/8", "::1/128"],  # the test server is on this machine
    )
    attachments = [
        {"name": "note.txt", "content_type": "text/plain", "sha256": digest},
        {"name": "invoice.pdf", "content_type": "application/pdf", "url": f"{base}/invoice.pdf"},
    ]
    await command(store, placed.thread_id, "ok", attachments=attachments)
    await command(store, placed.thread_id, "big", attachments=[{"name": "h.bin", "url": f"{base}/huge.bin"}])
    await command(store, placed.thread_id, "gone", attachments=[{"name": "n.pdf", "url": f"{base}/nope.pdf"}])
    await command(store, placed.thread_id, "lost", attachments=[{"name": "x", "sha256": "ab" * 32}])
    while await dispatcher.run_once():
        pass
    [sent] = sender.sent
    assert [(a.name, a.size) for a in sent.attachments] == [("note.txt", 11), ("invoice.pdf", 16)]
    assert await store.read_blob(sent.attachments[1].sha256) == b"%PDF-1.4 invoice"
    outcomes = [
        (e["reply"]["command_id"], e["type"], e["reply"].get("reason")) for e in await reply_events(store)
    ]
    assert outcomes == [
        ("ok", "reply.sent", None),
        ("big", "reply.failed", "too_large"),
        ("gone", "reply.failed", "rejected"),
        ("lost", "reply.failed", "rejected"),
    ]
    await dispatcher.close()


async def test_a_reply_that_waits_out_its_lease_for_the_rate_limit_is_not_sent_late(
    store: SQLiteStore, make: Make
) -> None:
    one = await inbound(store, "m1@example.com")
    other = await inbound(store, "m2@example.com", customer="han.meimei@example.com")
    sender = Recorder()
    # One send per 4 s from the inbox and a 2 s lease: the second reply would go out after its
    # lease ran out (another instance may hold it by then), so it is put back instead.
    dispatcher = make({"email": SenderSpec(sender=sender, rate=0.25, burst=1)}, lease=2.0)
    await command(store, one.thread_id, "first")
    await command(store, other.thread_id, "second")
    assert await dispatcher.run_once() == 2
    assert [r.command_id for r in sender.sent] == ["first"]
    [waiting] = await store.reply_list(other.thread_id)
    assert (waiting.status, waiting.reason) == ("pending", "rate_limited")


def test_a_route_without_identities_is_answered_to_the_customers_identity() -> None:
    from gateway.replies import resolve
    from gateway.store.replies import ReplyContext, ReplyRoute

    route = ReplyRoute(
        message_id="m", thread_id="thr_1", channel="email", inbox="demo", external_id="a@example.com",
        identities=(), extra={}, received_at=NOW,
    )  # fmt: skip
    context = ReplyContext(  # a message stored before the ledger: its route knows no identity
        thread_id="thr_1", tenant="demo", number=1, subject=None, customer_id="cus_1",
        thread_routes=(route,), customer_routes=(route,), sent=(),
        customer_identities=(Identity(kind="phone", value="+8613"), Identity(kind="email", value="l@e.c")),
    )  # fmt: skip
    senders = {"email": SenderSpec(sender=Recorder())}
    resolved = resolve(context, requested=None, senders=senders, kinds={"email": frozenset({"email"})})
    assert resolved.recipient.value == "l@e.c"


def test_someone_else_writing_into_the_thread_is_not_answered() -> None:
    from gateway.replies import resolve
    from gateway.store.replies import ReplyContext, ReplyRoute

    def route(message_id: str, address: str, minute: int) -> ReplyRoute:
        return ReplyRoute(
            message_id=message_id, thread_id="thr_1", channel="email", inbox="demo",
            external_id=f"{message_id}@example.com", identities=(Identity(kind="email", value=address),),
            extra={}, received_at=NOW + timedelta(minutes=minute),
        )  # fmt: skip

    customer = route("m1", "li@example.com", 0)
    outsider = route("m2", "guess@evil.example", 1)  # wrote "Re: ... [#TG-1]" into the thread
    context = ReplyContext(
        thread_id="thr_1", tenant="demo", number=1, subject=None, customer_id="cus_1",
        thread_routes=(customer, outsider), customer_routes=(customer,), sent=(),
        customer_identities=(Identity(kind="email", value="li@example.com"),),
    )  # fmt: skip
    senders = {"email": SenderSpec(sender=Recorder())}
    resolved = resolve(context, requested=None, senders=senders, kinds={"email": frozenset({"email"})})
    assert (resolved.route.message_id, resolved.recipient.value) == ("m1", "li@example.com")
