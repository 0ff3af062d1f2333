"""The Telegram channel through its context: webhook verification, answers, media and polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from connectors.telegram import DESCRIPTOR, TelegramConnector
from connectors.telegram.connector import OFFSET_KEY, Poller
from core.errors import ConfigError
from core.settings import Settings
from tests.connectors.telegram.context import (
    FakeBotApi,
    MemoryContext,
    server_error,
    too_many_requests,
)

Client = TestClient[web.Request, web.Application]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "telegram"
TOKEN = "7000000001:AAE-test-bot-token"
SECRET, PREVIOUS = "current-secret_0123456789", "previous-secret_0123456789"
HEADER = "X-Telegram-Bot-Api-Secret-Token"
PHOTO = "AgACAgUAAxkBAAIBK2dPhotoLarge"


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def make_settings(api_base: str = "http://127.0.0.1:9", **channel: Any) -> Settings:
    inboxes = channel.pop("inboxes", {
        "support": {"bot_token": TOKEN, "secret_token": SECRET, "previous_secret_token": PREVIOUS},
    })
    return Settings.model_validate({
        "tenants": {"acme": {}},
        "inboxes": {name: {"tenant": "acme"} for name in ("support", "polled")},
        "channels": {"telegram": {
            "api_base": api_base, "max_body_bytes": 4096, "ingest_timeout": 0.5,
            "media_first_backoff": 10, "media_max_backoff": 60, "media_retry_for": 3600,
            "inboxes": inboxes, **channel,
        }},
    })


@pytest.fixture
async def bot_api(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> tuple[FakeBotApi, str]:
    api = FakeBotApi(token=TOKEN)
    server = await aiohttp_server(api.app())
    return api, str(server.make_url("/"))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def context(bot_api: tuple[FakeBotApi, str], session: aiohttp.ClientSession) -> MemoryContext:
    ctx = MemoryContext(settings=make_settings(bot_api[1]), session=session)
    connector = TelegramConnector.from_settings(ctx.settings)
    assert connector is not None
    connector.setup(ctx)
    return ctx


@pytest.fixture
async def client(aiohttp_client: Callable[..., Awaitable[Client]], context: MemoryContext) -> Client:
    return await aiohttp_client(context.app)


async def post(client: Client, body: bytes, *, secret: str | None = SECRET, inbox: str = "support") -> int:
    headers = {"Content-Type": "application/json", **({HEADER: secret} if secret is not None else {})}
    response = await client.post(f"/telegram/{inbox}", data=body, headers=headers)
    return response.status


# --- configuration ------------------------------------------------------------------------------


def test_the_descriptor_names_the_channel_and_its_parts() -> None:
    assert DESCRIPTOR.name == "telegram"
    assert DESCRIPTOR.connector is TelegramConnector
    assert DESCRIPTOR.normalizer is not None
    assert DESCRIPTOR.deadline <= 10.0
    assert "telegram" in DESCRIPTOR.identity_kinds


@pytest.mark.parametrize(
    ("inbox", "key"),
    [
        ({"secret_token": SECRET}, "channels.telegram.inboxes.support.bot_token"),
        ({"bot_token": TOKEN}, "channels.telegram.inboxes.support.secret_token"),
        ({"bot_token": TOKEN, "secret_token": ""}, "channels.telegram.inboxes.support.secret_token"),
    ],
)
def test_a_bot_without_its_secrets_refuses_to_start(inbox: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        TelegramConnector.from_settings(make_settings(inboxes={"support": inbox}))
    assert caught.value.key == key


def test_a_secret_from_an_unset_environment_variable_refuses_to_start() -> None:
    inbox = {"bot_token": TOKEN, "secret_token": {"env": "TICKETGATE_TEST_UNSET_TELEGRAM_SECRET"}}
    with pytest.raises(ConfigError, match="TICKETGATE_TEST_UNSET_TELEGRAM_SECRET") as caught:
        TelegramConnector.from_settings(make_settings(inboxes={"support": inbox}))
    assert caught.value.key == "channels.telegram.inboxes.support.secret_token"


def test_a_secret_telegram_would_refuse_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="secret token"):
        make_settings(inboxes={"support": {"bot_token": TOKEN, "secret_token": "has spaces"}}).channel(
            "telegram", DESCRIPTOR.settings  # type: ignore[arg-type]
        )


def test_polling_needs_no_secret_token_and_secrets_stay_out_of_reprs() -> None:
    connector = TelegramConnector.from_settings(
        make_settings(inboxes={"polled": {"bot_token": TOKEN, "mode": "polling"}})
    )
    assert connector is not None
    assert TOKEN not in repr(connector.bots)
    assert "AAE" not in repr(connector.table)


def test_a_bot_for_an_unknown_inbox_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not in \\[inboxes\\]"):
        TelegramConnector.from_settings(
            make_settings(inboxes={"nowhere": {"bot_token": TOKEN, "secret_token": SECRET}})
        )


# --- the webhook ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "wrong-secret", SECRET + "x", SECRET[:-1]])
async def test_a_missing_or_wrong_secret_token_is_401_and_nothing_is_parsed(
    client: Client, context: MemoryContext, monkeypatch: pytest.MonkeyPatch, secret: str | None
) -> None:
    def sentinel(*_: object) -> None:
        raise AssertionError("the normalizer ran for an unverified request")

    monkeypatch.setattr("connectors.telegram.connector.normalize", sentinel)
    assert await post(client, fixture("private_text"), secret=secret) == 401
    assert context.ingests == 0
    assert context.metrics.counts[("refused:signature", "support")] == 1


async def test_both_secret_tokens_are_accepted_during_a_rotation(
    client: Client, context: MemoryContext
) -> None:
    assert await post(client, fixture("private_text"), secret=PREVIOUS) == 200
    assert await post(client, fixture("photo_caption"), secret=SECRET) == 200
    assert len(context.events) == 2


async def test_an_update_is_answered_200_once_stored(client: Client, context: MemoryContext) -> None:
    assert await post(client, fixture("private_text")) == 200
    [message] = context.events
    assert (message.channel, message.tenant, message.inbox) == ("telegram", "acme", "support")
    assert message.text is not None
    assert message.text.startswith("Hi, my order")


async def test_the_secret_token_is_not_kept_with_the_raw_update(
    client: Client, context: MemoryContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept: list[dict[str, str]] = []
    ingest = context.ingest

    async def recording(envelope: Any, normalize_with: Any = None) -> Any:
        kept.append(dict(envelope.headers))
        return await ingest(envelope, normalize_with)

    monkeypatch.setattr(context, "ingest", recording)
    assert await post(client, fixture("private_text")) == 200
    assert kept
    assert all(SECRET not in value for headers in kept for value in headers.values())


async def test_a_redelivered_update_makes_one_event(client: Client, context: MemoryContext) -> None:
    body = fixture("private_text")
    assert [await post(client, body) for _ in range(2)] == [200, 200]
    assert len(context.events) == 1
    # The same message in an update with another update_id is still the same message.
    other = orjson.loads(body)
    other["update_id"] += 1
    assert await post(client, orjson.dumps(other)) == 200
    assert len(context.events) == 1


async def test_three_concurrent_deliveries_make_one_event(client: Client, context: MemoryContext) -> None:
    context.store_delay = 0.01
    body = fixture("private_text")
    statuses = await asyncio.gather(*(post(client, body) for _ in range(3)))
    assert statuses == [200, 200, 200]
    assert len(context.events) == 1
    assert context.ingests == 3


async def test_an_oversized_body_is_413_and_not_ingested(client: Client, context: MemoryContext) -> None:
    update = orjson.loads(fixture("private_text"))
    update["message"]["text"] = "x" * 5000
    assert await post(client, orjson.dumps(update)) == 413
    assert context.ingests == 0


async def test_a_store_failure_is_503_with_retry_after_and_nothing_acknowledged(
    client: Client, context: MemoryContext
) -> None:
    context.store_down = True
    response = await client.post(
        "/telegram/support", data=fixture("photo_caption"), headers={HEADER: SECRET}
    )
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    assert context.events == []
    assert context.media.fetches == {}
    context.store_down = False
    assert await post(client, fixture("photo_caption")) == 200
    assert len(context.events) == 1
    assert len(context.media.fetches) == 1


async def test_a_store_slower_than_the_deadline_is_answered_503_in_time(
    client: Client, context: MemoryContext
) -> None:
    context.store_delay = 2.0  # ingest_timeout is 0.5 s
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await post(client, fixture("private_text")) == 503
    assert loop.time() - started < 1.5


async def test_media_that_cannot_be_queued_is_503_so_telegram_retries(
    client: Client, context: MemoryContext
) -> None:
    context.media.fail_enqueue = True
    assert await post(client, fixture("photo_caption")) == 503
    context.media.fail_enqueue = False
    assert await post(client, fixture("photo_caption")) == 200  # a duplicate now, its media queued
    assert len(context.events) == 1
    assert len(context.media.fetches) == 1


@pytest.mark.parametrize("body", [b"{not json", b"", b"[]"])
async def test_a_body_that_is_not_an_update_object_is_400(
    client: Client, context: MemoryContext, body: bytes
) -> None:
    assert await post(client, body) == 400
    assert context.events == []


async def test_a_verified_update_that_cannot_be_understood_is_quarantined_and_200(
    client: Client, context: MemoryContext
) -> None:
    assert await post(client, b'{"update_id": 5, "message": {"text": "no ids"}}') == 200
    assert len(context.quarantined) == 1
    assert context.events == []


@pytest.mark.parametrize("name", ["callback_query", "my_chat_member"])
async def test_updates_that_are_not_tickets_are_200_and_counted(
    client: Client, context: MemoryContext, name: str
) -> None:
    assert await post(client, fixture(name)) == 200
    assert context.events == []
    assert context.metrics.counts[("update_ignored", "support")] == 1


async def test_an_unknown_inbox_is_404(client: Client) -> None:
    assert await post(client, fixture("private_text"), inbox="elsewhere") == 404


# --- media ------------------------------------------------------------------------------------


async def fetch_round(context: MemoryContext) -> None:
    """One round of the supervised fetcher (its loop only adds waiting between rounds)."""
    fetcher = context.spawned["media"].__self__  # type: ignore[attr-defined]
    await fetcher.run_once()


async def test_media_failing_twice_then_succeeding_ends_with_the_blob_stored(
    client: Client, context: MemoryContext, bot_api: tuple[FakeBotApi, str]
) -> None:
    api, _ = bot_api
    api.files[PHOTO] = b"\xff\xd8\xffJPEG bytes"
    api.file_errors[PHOTO] = [server_error(), too_many_requests(30)]
    assert await post(client, fixture("photo_caption")) == 200
    key = next(iter(context.media.fetches))
    await fetch_round(context)
    first = context.media.fetches[key]
    assert (first.state, first.attempts) == ("pending", 1)
    assert first.next_attempt_at == context.clock.now() + timedelta(seconds=10)
    context.clock.advance(10)
    await fetch_round(context)
    second = context.media.fetches[key]
    assert second.state == "pending"
    assert second.next_attempt_at == context.clock.now() + timedelta(seconds=20)  # doubled
    await fetch_round(context)
    assert context.media.fetches[key].state == "pending"  # not due yet: nothing fetched early
    context.clock.advance(20)
    await fetch_round(context)
    done = context.media.fetches[key]
    assert done.state == "done"
    assert done.attempts == 3
    assert done.sha256 is not None
    assert await context.blobs.read(done.sha256) == b"\xff\xd8\xffJPEG bytes"
    assert done.content_type == "image/jpeg"


async def test_media_that_keeps_failing_ends_failed_and_counted_and_the_message_is_published(
    client: Client, context: MemoryContext, bot_api: tuple[FakeBotApi, str]
) -> None:
    api, _ = bot_api
    api.file_errors[PHOTO] = [server_error() for _ in range(100)]
    assert await post(client, fixture("photo_caption")) == 200
    assert len(context.events) == 1
    key = next(iter(context.media.fetches))
    for _ in range(100):
        await fetch_round(context)
        context.clock.advance(60)  # the capped backoff
        if context.media.fetches[key].state != "pending":
            break
    record = context.media.fetches[key]
    assert record.state == "failed"
    assert record.error is not None
    assert "502" in record.error
    assert context.metrics.counts[("media_failed", "support")] == 1
    # Given up once the next attempt would fall past media_retry_for (an hour here), not before.
    assert context.clock.now() - record.created_at >= timedelta(seconds=3500)


@pytest.mark.parametrize(
    ("errors", "size"),
    [([(400, {"ok": False, "error_code": 400, "description": "Bad Request: file is too big"})], None),
     ([], 21 * 1024 * 1024)],
)
async def test_a_file_over_the_download_limit_fails_at_once(
    client: Client, context: MemoryContext, bot_api: tuple[FakeBotApi, str],
    errors: list[tuple[int, dict[str, Any]]], size: int | None,
) -> None:
    api, _ = bot_api
    api.files[PHOTO] = b"jpeg"
    api.file_errors[PHOTO] = errors
    if size is not None:
        api.file_sizes[PHOTO] = size
    assert await post(client, fixture("photo_caption")) == 200
    await fetch_round(context)
    [record] = context.media.fetches.values()
    assert record.state == "failed"
    assert record.attempts == 1
    assert api.calls["download"] == 0
    assert context.metrics.counts[("media_failed", "support")] == 1


# --- polling ----------------------------------------------------------------------------------


def polling_context(
    api_base: str, session: aiohttp.ClientSession, ctx: MemoryContext | None = None
) -> Poller:
    settings = make_settings(
        api_base, poll_timeout=0, inboxes={"polled": {"bot_token": TOKEN, "mode": "polling"}}
    )
    context = ctx or MemoryContext(settings=settings, session=session)
    context.settings = settings
    context.spawned.clear()
    connector = TelegramConnector.from_settings(settings)
    assert connector is not None
    connector.setup(context)
    poller: Poller = context.spawned["poll-polled"].__self__  # type: ignore[attr-defined]
    return poller


def polled_updates() -> list[dict[str, Any]]:
    return [orjson.loads(fixture(name)) for name in ("private_text", "callback_query", "photo_caption")]


@pytest.fixture
def polling(
    bot_api: tuple[FakeBotApi, str], session: aiohttp.ClientSession
) -> tuple[FakeBotApi, MemoryContext, Poller]:
    """A polling bot whose Bot API holds a message, a callback query and a photo."""
    api, base = bot_api
    api.updates = polled_updates()
    context = MemoryContext(settings=make_settings(base), session=session)
    return api, context, polling_context(base, session, context)


async def test_polling_advances_a_durable_offset_only_past_stored_updates(
    polling: tuple[FakeBotApi, MemoryContext, Poller], bot_api: tuple[FakeBotApi, str],
    session: aiohttp.ClientSession,
) -> None:
    api, context, poller = polling
    assert await poller.run_once() == 0
    last = api.updates[-1]["update_id"]
    assert context.state.values[OFFSET_KEY.format(inbox="polled")] == str(last + 1).encode()
    assert len(context.events) == 2
    assert context.events[0].inbox == "polled"
    assert context.events[0].identities[0].verified is True

    # A restart: a new connector on the same state asks from the stored offset and stores nothing twice.
    restarted = polling_context(bot_api[1], session, context)
    api.updates.append({**orjson.loads(fixture("voice")), "update_id": last + 1})
    assert await restarted.run_once() == 0
    assert api.offsets_asked == [None, last + 1]
    assert len(context.events) == 3
    assert context.state.values[OFFSET_KEY.format(inbox="polled")] == str(last + 2).encode()


async def test_polling_keeps_the_offset_when_the_store_fails(
    polling: tuple[FakeBotApi, MemoryContext, Poller],
) -> None:
    api, context, poller = polling
    context.store_down = True
    assert await poller.run_once() == 7.0
    assert OFFSET_KEY.format(inbox="polled") not in context.state.values
    context.store_down = False
    assert await poller.run_once() == 0
    assert api.offsets_asked == [None, None]
    assert len(context.events) == 2


async def test_polling_without_a_hold_pauses_between_empty_answers(
    polling: tuple[FakeBotApi, MemoryContext, Poller],
) -> None:
    api, context, poller = polling
    api.updates = []
    assert await poller.run_once() == 1.0
    assert context.state.values == {}


@pytest.mark.parametrize(
    ("error", "pause"),
    [(too_many_requests(12), 12.0),
     ((409, {"ok": False, "error_code": 409,
             "description": "Conflict: can't use getUpdates method while webhook is active"}), 30.0)],
)
async def test_polling_backs_off_when_telegram_refuses(
    polling: tuple[FakeBotApi, MemoryContext, Poller], error: tuple[int, dict[str, Any]], pause: float,
) -> None:
    api, context, poller = polling
    api.update_errors = [error]
    assert await poller.run_once() == pause
    assert context.ingests == 0
    assert context.state.values == {}
