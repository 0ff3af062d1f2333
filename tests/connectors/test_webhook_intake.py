"""connectors.base.WebhookIntake: the shielded, bounded ingest every webhook connector shares."""

from __future__ import annotations

import asyncio

from connectors.base import WebhookIntake, text_ok
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
