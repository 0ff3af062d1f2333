"""connectors.base.WebhookIntake: the shielded, bounded ingest every webhook connector shares."""

from __future__ import annotations

import asyncio
import logging
from unittest import mock

import pytest
from aiohttp import StreamReader, web
from aiohttp.test_utils import make_mocked_request

from connectors.base import WebhookIntake, read_webhook, text_ok
from core.model import IngestResult, Outcome


async def test_a_slow_commit_is_answered_retry_and_still_finishes() -> None:
    intake = WebhookIntake("test", 0.05)
    done = asyncio.Event()

    async def slow() -> IngestResult:
        await asyncio.sleep(0.2)
        done.set()
        return IngestResult(outcome=Outcome.ACCEPTED)

    response = await intake.respond(slow(), name="inbox", ok=text_ok())
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert not done.is_set()
    await intake.drain()
    assert done.is_set()  # shielded: the commit was not cancelled with its answer


async def test_results_map_to_the_channel_answer() -> None:
    intake = WebhookIntake("test", 1.0)

    async def result(outcome: Outcome, status: int | None = None) -> IngestResult:
        return IngestResult(outcome=outcome, reason="why", status=status)

    stored = await intake.respond(result(Outcome.DUPLICATE), name="i", ok=text_ok("success"))
    assert (stored.status, stored.text) == (200, "success")
    rejected = await intake.respond(result(Outcome.REJECTED, 422), name="i", ok=text_ok())
    assert (rejected.status, rejected.text) == (422, "why")
    assert (await intake.respond(result(Outcome.REJECTED, 500), name="i", ok=text_ok())).status == 400
    assert (await intake.respond(result(Outcome.RETRY), name="i", ok=text_ok())).status == 503


async def test_a_failure_after_the_commit_is_a_retry_not_a_500() -> None:
    intake = WebhookIntake("test", 1.0)

    async def failing() -> IngestResult:
        raise RuntimeError("media queue down")

    result = await intake.submit(failing(), name="i")
    assert result.outcome is Outcome.RETRY
    assert not result.stored


async def test_read_webhook_answers_413_past_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    refusals: list[str] = []
    small = make_mocked_request("POST", "/x", headers={"Content-Length": "3"}, payload=_payload(b"abc"))
    assert await read_webhook(small, 3, log_as="x app", refused=refusals.append) == b"abc"
    assert refusals == []

    # Chunked (no Content-Length): counted while read, refused once past the limit.
    big = make_mocked_request("POST", "/x", payload=_payload(b"abcd"))
    with caplog.at_level(logging.WARNING, logger="connectors.base"):
        answer = await read_webhook(big, 3, log_as="x app", refused=refusals.append)
    assert isinstance(answer, web.Response)
    assert (answer.status, answer.text) == (413, "too large")
    assert refusals == ["size"]
    assert "x app: refused a body from" in caplog.text


def _payload(data: bytes) -> StreamReader:
    stream = StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    stream.feed_data(data)
    stream.feed_eof()
    return stream
