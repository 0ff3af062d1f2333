"""The LINE sender against a local server that answers like the Messaging API, errors included."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from connectors.line import LineConnector
from connectors.line.sender import LineSender, retry_key
from core.channel import OutboundAttachment, OutboundReply, SendError
from core.model import Identity, IdentityKind
from tests.connectors.line.fake_api import FakeLine, SenderContext, monthly_limit, rate_limited, server_error
from tests.connectors.line.test_line_connector import TOKEN, make_settings
from tests.connectors.telegram.context import START

CUSTOMER = "U4af4980629a5b6c7d8e9f0a1b2c3d4e5"
GROUP = "Cb1a2c3d4e5f60718293a4b5c6d7e8f90"
REPLY_TOKEN = "7e1a2b3c4d5e6f71a1b2c3d4e5f60718"
REPLY_ID = "0193a1c2-d3e4-7f56-8a9b-0c1d2e3f4a5b"


@pytest.fixture
async def line_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeLine, str]:
    api = FakeLine(token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def set_up(base: str, session: aiohttp.ClientSession, **inbox: Any) -> tuple[SenderContext, LineSender]:
    account = {"channel_secret": "s" * 32, "channel_access_token": TOKEN, "fetch_media": False, **inbox}
    ctx = SenderContext(settings=make_settings(base, inboxes={"support": account}), session=session,
                        channel="line")
    connector = LineConnector.from_settings(ctx.settings)
    assert connector is not None
    connector.setup(ctx)
    [spec] = ctx.senders
    assert isinstance(spec.sender, LineSender)
    return ctx, spec.sender


def reply(*, text: str | None = "Your refund is on its way.", attempt: int = 1, age: float = 5.0,
          **answering: Any) -> OutboundReply:
    event_ms = int((START - timedelta(seconds=age)).timestamp() * 1000)
    return OutboundReply(
        reply_id=REPLY_ID, command_id="cmd-1", tenant="acme", channel="line", inbox="support",
        thread_id="thr_0190f3a1c2d37e4f8a9b0c1d2e3f4a5b", thread_number=12, subject=None,
        recipient=Identity(kind=IdentityKind.LINE, value=CUSTOMER, verified=True), text=text,
        answering={"to": CUSTOMER, "reply_token": REPLY_TOKEN, "timestamp": event_ms, "redelivery": False,
                   **answering},
        attempt=attempt,
    )


async def test_a_fresh_reply_token_is_used_once(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession
) -> None:
    api, base = line_api
    api.valid_reply_tokens.add(REPLY_TOKEN)
    _, sender = set_up(base, session)
    sent = await sender.send(reply())
    assert sent.detail["via"] == "reply"
    assert [(s["call"], s["replyToken"]) for s in api.sent] == [("reply", REPLY_TOKEN)]
    assert sent.provider_message_id == sent.detail["sent_message_ids"][0]


@pytest.mark.parametrize("case", ["expired", "retry", "redelivered", "used already", "disabled"])
async def test_otherwise_it_pushes_with_the_retry_key(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession, case: str
) -> None:
    api, base = line_api
    if case != "used already":
        api.valid_reply_tokens.add(REPLY_TOKEN)
    _, sender = set_up(base, session, reply_with_token=case != "disabled")
    outbound = {
        "expired": reply(age=55), "retry": reply(attempt=2), "redelivered": reply(redelivery=True),
        "used already": reply(), "disabled": reply(),
    }[case]
    sent = await sender.send(outbound)
    assert sent.detail["via"] == "push"
    [push] = api.sent
    assert push["call"] == "push"
    assert push["to"] == CUSTOMER
    assert push["messages"] == [{"type": "text", "text": "Your refund is on its way."}]
    assert api.accepted == {REPLY_ID: "req-1"}


async def test_a_group_thread_is_answered_in_the_group(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession
) -> None:
    api, base = line_api
    _, sender = set_up(base, session, reply_with_token=False)
    await sender.send(reply(to=GROUP))
    assert api.sent[0]["to"] == GROUP


async def test_a_repeated_push_is_dropped_by_line_and_reported_sent(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession
) -> None:
    api, base = line_api
    _, sender = set_up(base, session, reply_with_token=False)
    first = await sender.send(reply())
    # Our commit of the first attempt was lost: the retry carries the same key and LINE says 409.
    again = await sender.send(reply(attempt=2))
    assert len(api.sent) == 1
    assert again.provider_message_id == "req-1"
    assert again.detail["already_accepted"] is True
    assert first.detail["request_id"] == "req-1"


def test_the_retry_key_is_a_uuid_for_any_reply_id() -> None:
    assert retry_key(REPLY_ID) == REPLY_ID
    derived = retry_key("rpl_0190f3a1c2d37e4f8a9b0c1d2e3f4a5b")
    assert derived == retry_key("rpl_0190f3a1c2d37e4f8a9b0c1d2e3f4a5b")
    assert len(derived) == 36


@pytest.mark.parametrize(
    ("scripted", "reason", "permanent", "retry_after"),
    [
        (rate_limited("17"), "rate_limited", False, 17.0),
        (rate_limited(), "rate_limited", False, 1.0),
        (monthly_limit(), "rate_limited", False, 3600.0),
        (server_error(), "provider_error", False, None),
        ((401, {"message": "Authentication failed"}, {}), "auth", True, None),
        ((403, {"message": "Not authorized to use this API"}, {}), "rejected", True, None),
        ((400, {"message": "The request body has 1 error(s)",
                "details": [{"message": "May not be empty", "property": "messages[0].text"}]}, {}),
         "rejected", True, None),
    ],
)
async def test_line_errors_become_reply_failures(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession,
    scripted: Any, reason: str, permanent: bool, retry_after: float | None,
) -> None:
    api, base = line_api
    api.send_errors.append(scripted)
    _, sender = set_up(base, session, reply_with_token=False)
    with pytest.raises(SendError) as caught:
        await sender.send(reply())
    failure = caught.value
    assert (failure.reason, failure.permanent, failure.retry_after) == (reason, permanent, retry_after)
    assert str(scripted[1]["message"]) in caught.value.detail


async def test_an_unreachable_line_is_a_transient_failure(session: aiohttp.ClientSession) -> None:
    _, sender = set_up("http://127.0.0.1:9", session, reply_with_token=False)
    with pytest.raises(SendError) as caught:
        await sender.send(reply())
    assert caught.value.reason == "provider_error"
    assert not caught.value.permanent


async def test_long_text_goes_as_several_messages_and_too_long_is_refused(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession
) -> None:
    api, base = line_api
    _, sender = set_up(base, session, reply_with_token=False)
    await sender.send(reply(text="x" * 12_000))
    assert [len(m["text"]) for m in api.sent[0]["messages"]] == [5000, 5000, 2000]
    with pytest.raises(SendError) as caught:
        await sender.send(reply(text="x" * 25_001))
    assert caught.value.reason == "too_large"
    assert caught.value.permanent


async def test_attachments_and_empty_replies_are_unsupported(
    line_api: tuple[FakeLine, str], session: aiohttp.ClientSession
) -> None:
    _, base = line_api
    _, sender = set_up(base, session)
    attachment = OutboundAttachment(name="a.pdf", content_type="application/pdf", size=3, sha256="0" * 64)
    for outbound in (reply(text=None), replace(reply(), attachments=(attachment,))):
        with pytest.raises(SendError) as caught:
            await sender.send(outbound)
        assert caught.value.reason == "unsupported"
        assert caught.value.permanent


def test_the_sender_spec_says_push_only_is_idempotent(session: aiohttp.ClientSession) -> None:
    for with_token, idempotent in ((True, False), (False, True)):
        ctx, _ = set_up("http://127.0.0.1:9", session, reply_with_token=with_token)
        assert ctx.senders[0].idempotent is idempotent
        assert ctx.senders[0].window is None
