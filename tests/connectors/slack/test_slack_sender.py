"""The Slack reply sender (chat.postMessage) against a local server answering like Slack, errors included."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.slack import SlackConnector
from core.channel import OutboundAttachment, OutboundReply, SendError, SenderSpec
from core.model import Identity, IdentityKind
from core.settings import OutboxSettings, Settings, StoreSettings
from gateway.channels import GatewayContext
from gateway.store.blobs import BlobDir
from gateway.store.sqlite import SQLiteStore
from tests.connectors.slack.fake_slack import BOT_TOKEN, FakeSlack
from tests.support.channels import set_up


@pytest.fixture
async def slack(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> FakeSlack:
    fake = FakeSlack()
    server = await aiohttp_server(fake.app())
    fake.base = str(server.make_url("")).rstrip("/")
    return fake


@contextlib.asynccontextmanager
async def sender_at(api_base: str, store: SQLiteStore | None = None) -> AsyncIterator[SenderSpec]:
    """The sender the Slack channel registers on its real context, calling ``api_base``."""
    settings = Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {"support": {"tenant": "acme"}},
        "channels": {"slack": {"api_base": api_base, "api_timeout": 2, "inboxes": {"support": {
            "signing_secret": "sender-test-secret", "bot_token": BOT_TOKEN, "fetch_files": False,
        }}}},
    })
    connector = SlackConnector.from_settings(settings)
    assert connector is not None

    async def ingest(*_: Any) -> Any:
        raise AssertionError("no ingest in sender tests")

    specs: dict[str, SenderSpec] = {}
    ctx: GatewayContext = set_up(
        web.Application(), connector, ingest, settings=settings, store=store, senders=specs
    )
    try:
        yield specs["slack"]
    finally:
        for client in ctx._clients:
            await client.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    settings = StoreSettings.model_validate(
        {"path": tmp_path / "slack.db", "blob_dir": tmp_path / "blobs", "min_free_disk_mb": 0}
    )
    instance = SQLiteStore(settings, OutboxSettings())
    await instance.open()
    yield instance
    await instance.close()


@pytest.fixture
async def spec(slack: FakeSlack, store: SQLiteStore) -> AsyncIterator[SenderSpec]:
    async with sender_at(f"{slack.base}/api", store) as made:
        yield made


def reply(text: str | None = "We have refunded order #1234.", **kw: Any) -> OutboundReply:
    values: dict[str, Any] = {
        "reply_id": "rpl_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "command_id": "cmd-1",
        "tenant": "acme",
        "channel": "slack",
        "inbox": "support",
        "thread_id": "thr_0190f3a8c1d27e6b9a4f5c3e2d1b0a98",
        "thread_number": 7,
        "subject": None,
        "recipient": Identity(kind=IdentityKind.SLACK, value="T0TICKETS:U0CUSTOMER", verified=True),
        "text": text,
        "answering": {"channel": "C0SUPPORT", "channel_type": "channel", "ts": "1764921700.000200",
                      "thread_ts": None},
    }
    values.update(kw)
    return OutboundReply(**values)


async def test_a_channel_message_is_answered_in_its_thread(spec: SenderSpec, slack: FakeSlack) -> None:
    sent = await spec.sender.send(reply())
    [posted] = slack.posted
    assert posted["channel"] == "C0SUPPORT"
    assert posted["thread_ts"] == "1764921700.000200"
    assert posted["text"] == "We have refunded order #1234."
    assert sent.provider_message_id == f"C0SUPPORT:{sent.detail['ts']}"
    assert spec.idempotent is False  # Slack has no idempotency key for chat.postMessage
    assert spec.window is None


async def test_a_thread_reply_goes_to_the_threads_root(spec: SenderSpec, slack: FakeSlack) -> None:
    answering = {"channel": "C0SUPPORT", "channel_type": "channel", "ts": "1764922000.000300",
                 "thread_ts": "1764921700.000200"}
    await spec.sender.send(reply(answering=answering))
    assert slack.posted[0]["thread_ts"] == "1764921700.000200"


async def test_a_dm_is_answered_in_the_dm_and_without_a_conversation_one_is_opened(
    spec: SenderSpec, slack: FakeSlack
) -> None:
    await spec.sender.send(reply(answering={"channel": "D0CUSTOMER", "channel_type": "im",
                                            "ts": "1764921600.000100", "thread_ts": None}))
    assert slack.posted[0]["channel"] == "D0CUSTOMER"
    assert "thread_ts" not in slack.posted[0]
    await spec.sender.send(reply(answering={}))
    assert slack.calls["conversations.open"] == 1
    assert slack.posted[1]["channel"] == "D0CUSTOMER"


async def test_attachments_are_one_upload_shared_in_the_thread_with_the_text(
    spec: SenderSpec, slack: FakeSlack, tmp_path: Path
) -> None:
    pdf = b"%PDF-1.7 invoice"
    sha = BlobDir(tmp_path / "blobs").put(pdf)
    attachment = OutboundAttachment(
        name="invoice.pdf", content_type="application/pdf", size=len(pdf), sha256=sha
    )
    sent = await spec.sender.send(reply(text="Here is the corrected invoice.", attachments=(attachment,)))
    [completed] = slack.completed
    assert completed["channel_id"] == "C0SUPPORT"
    assert completed["thread_ts"] == "1764921700.000200"
    assert completed["initial_comment"] == "Here is the corrected invoice."
    [file_id] = slack.uploaded
    assert slack.uploaded[file_id] == pdf
    assert sent.provider_message_id == f"C0SUPPORT:files:{file_id}"
    assert slack.posted == []  # one provider action: the upload carries the text


async def test_an_attachment_missing_from_the_blob_store_is_refused(spec: SenderSpec) -> None:
    missing = OutboundAttachment(name="a.pdf", content_type="application/pdf", size=1, sha256="0" * 64)
    with pytest.raises(SendError) as raised:
        await spec.sender.send(reply(attachments=(missing,)))
    assert raised.value.reason == "rejected"
    assert raised.value.permanent


async def test_html_only_replies_are_sent_as_text(spec: SenderSpec, slack: FakeSlack) -> None:
    await spec.sender.send(reply(text=None, html="<p>Hello <b>Ana</b></p>"))
    assert "Hello" in slack.posted[0]["text"]
    assert "<b>" not in slack.posted[0]["text"]


@pytest.mark.parametrize(
    ("error", "status", "headers", "reason", "permanent", "retry_after"),
    [
        ("ratelimited", 429, {"Retry-After": "30"}, "rate_limited", False, 30.0),
        ("channel_not_found", 200, {}, "recipient_unreachable", True, None),
        ("not_in_channel", 200, {}, "recipient_unreachable", True, None),
        ("is_archived", 200, {}, "recipient_unreachable", True, None),
        ("invalid_auth", 200, {}, "auth", False, None),
        ("token_revoked", 200, {}, "auth", False, None),
        ("msg_too_long", 200, {}, "too_large", True, None),
        ("restricted_action", 200, {}, "rejected", True, None),
        ("internal_error", 500, {}, "provider_error", False, None),
        ("something_new", 200, {}, "provider_error", True, None),
    ],
)
async def test_slack_errors_are_sorted_for_the_dispatcher(
    spec: SenderSpec, slack: FakeSlack, error: str, status: int, headers: dict[str, str], reason: str,
    permanent: bool, retry_after: float | None,
) -> None:
    slack.fail("chat.postMessage", error, status=status, headers=headers)
    with pytest.raises(SendError) as raised:
        await spec.sender.send(reply())
    assert raised.value.reason == reason
    assert raised.value.permanent is permanent
    assert raised.value.retry_after == retry_after
    assert error in raised.value.detail
    # The next attempt goes through.
    await spec.sender.send(reply())
    assert len(slack.posted) == 1


async def test_unreachable_slack_is_a_retryable_timeout() -> None:
    async with sender_at("http://127.0.0.1:9/api") as nowhere:
        with pytest.raises(SendError) as raised:
            await nowhere.sender.send(reply())
    assert raised.value.reason == "timeout"
    assert not raised.value.permanent


async def test_an_inbox_without_an_installation_is_unsupported(spec: SenderSpec) -> None:
    with pytest.raises(SendError) as raised:
        await spec.sender.send(reply(inbox="nobody"))
    assert raised.value.reason == "unsupported"
    assert raised.value.permanent


async def test_replies_slack_refuses_before_calling(spec: SenderSpec, slack: FakeSlack) -> None:
    for bad, reason in ((reply(text="  "), "rejected"), (reply(text="x" * 40_001), "too_large")):
        with pytest.raises(SendError) as raised:
            await spec.sender.send(bad)
        assert raised.value.reason == reason
        assert raised.value.permanent
    assert slack.calls["chat.postMessage"] == 0
