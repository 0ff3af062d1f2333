"""The X sender against a local server that answers like X's DM API, errors included."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from connectors.x import XConnector
from connectors.x.oauth import OAuth1
from connectors.x.sender import XSender
from core.channel import OutboundAttachment, OutboundReply, SendError
from core.model import Identity, IdentityKind
from tests.connectors.line.fake_api import SenderContext
from tests.connectors.x.fake_api import FakeX, forbidden, server_error, too_many_requests
from tests.connectors.x.test_x_connector import KEY, TOKEN, make_settings

CUSTOMER = "1587654321098765432"


@pytest.fixture
async def x_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeX, str]:
    api = FakeX(consumer_key=KEY, token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def set_up(base: str, session: aiohttp.ClientSession) -> tuple[SenderContext, XSender]:
    ctx = SenderContext(settings=make_settings(base), session=session, channel="x")
    connector = XConnector.from_settings(ctx.settings)
    assert connector is not None
    connector.setup(ctx)
    [spec] = ctx.senders
    assert isinstance(spec.sender, XSender)
    return ctx, spec.sender


def reply(text: str | None = "We have re-sent your parcel.", **answering: Any) -> OutboundReply:
    return OutboundReply(
        reply_id="0193a1c2-d3e4-7f56-8a9b-0c1d2e3f4a5b", command_id="cmd-1", tenant="acme", channel="x",
        inbox="support", thread_id="thr_0190f3a1c2d37e4f8a9b0c1d2e3f4a5b", thread_number=7, subject=None,
        recipient=Identity(kind=IdentityKind.X, value=CUSTOMER, verified=True), text=text,
        answering={"to": CUSTOMER, **answering},
    )


def test_oauth_signatures_match_xs_published_example() -> None:
    # developer.x.com, "Creating a signature": the documented inputs give the documented signature.
    auth = OAuth1(consumer_key="xvz1evFS4wEEPTGEFPHBog",
                  consumer_secret="kAcSOqF21Fu85e7zjz7ZN2U4ZRhfV3WpwPAoE3Z7kBw",
                  token="370773112-GmHxMAgYyLbNEtIKZeRNFsMKPR9EyMZeS9weJAEb",
                  token_secret="LswwdoUaIvS8ltyTt5jkRh4J50vUPVVHtR2YPi5kE")
    header = auth.header(
        "POST", "https://api.twitter.com/1.1/statuses/update.json?include_entities=true",
        form={"status": "Hello Ladies + Gentlemen, a signed OAuth request!"},
        nonce="kYjzVBB8Y0ZFabxSWbWovY3uYSQ2pTgmZeNu2VS4cg", timestamp=1318622958,
    )
    assert 'oauth_signature="hCtSmYh%2BiHYCEqBWrE7C7hYmtUk%3D"' in header


async def test_a_reply_is_one_signed_dm_to_the_customer(
    x_api: tuple[FakeX, str], session: aiohttp.ClientSession
) -> None:
    api, base = x_api
    ctx, sender = set_up(base, session)
    sent = await sender.send(reply())
    assert api.sent == [{"participant": CUSTOMER, "text": "We have re-sent your parcel."}]
    assert sent.provider_message_id == "1864100000000000000"
    assert ctx.senders[0].idempotent is False
    assert ctx.senders[0].window is None


@pytest.mark.parametrize(
    ("scripted", "reason", "permanent", "retry_after"),
    [
        (too_many_requests(retry_after="42"), "rate_limited", False, 42.0),
        (server_error(), "provider_error", False, None),
        (forbidden(), "recipient_unreachable", True, None),
        ((404, {"title": "Not Found Error", "detail": "Could not find user", "status": 404}, {}),
         "recipient_unreachable", True, None),
        ((400, {"errors": [{"code": 349, "message": "You cannot send messages to this user."}]}, {}),
         "rejected", True, None),
        ((401, {"title": "Unauthorized", "detail": "Unauthorized", "status": 401}, {}), "auth", True, None),
    ],
)
async def test_x_errors_become_reply_failures(
    x_api: tuple[FakeX, str], session: aiohttp.ClientSession,
    scripted: Any, reason: str, permanent: bool, retry_after: float | None,
) -> None:
    api, base = x_api
    api.send_errors.append(scripted)
    _, sender = set_up(base, session)
    with pytest.raises(SendError) as caught:
        await sender.send(reply())
    failure = caught.value
    assert (failure.reason, failure.permanent, failure.retry_after) == (reason, permanent, retry_after)
    assert str(scripted[0]) in failure.detail


async def test_a_rate_limit_reset_becomes_the_pause(
    x_api: tuple[FakeX, str], session: aiohttp.ClientSession
) -> None:
    api, base = x_api
    api.send_errors.append(too_many_requests(reset=int(time.time()) + 300))
    _, sender = set_up(base, session)
    with pytest.raises(SendError) as caught:
        await sender.send(reply())
    assert caught.value.reason == "rate_limited"
    assert 290 <= (caught.value.retry_after or 0) <= 300


async def test_an_unreachable_x_is_retried(session: aiohttp.ClientSession) -> None:
    _, sender = set_up("http://127.0.0.1:9/", session)
    with pytest.raises(SendError) as caught:
        await sender.send(reply())
    assert caught.value.reason == "provider_error"
    assert not caught.value.permanent


async def test_what_a_dm_cannot_carry_is_refused(
    x_api: tuple[FakeX, str], session: aiohttp.ClientSession
) -> None:
    api, base = x_api
    _, sender = set_up(base, session)
    attachment = OutboundAttachment(name="a.pdf", content_type="application/pdf", size=3, sha256="0" * 64)
    cases = {
        "too_large": reply("x" * 10_001), "unsupported": replace(reply(), attachments=(attachment,)),
    }
    for reason, outbound in cases.items():
        with pytest.raises(SendError) as caught:
            await sender.send(outbound)
        assert caught.value.reason == reason
        assert caught.value.permanent
    assert api.sent == []
