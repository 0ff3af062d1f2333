"""The quarantine's operations, shared by ``ticketgate quarantine`` and the status page.

List, show and replay are written once here, so the command line and the page cannot drift: the
same fields, the same replay (the channel's live normalizer, the pipeline's replay, the record
marked only when the result was stored).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from core.channel import Normalizer
from core.events import isoformat
from core.model import RawEnvelope
from gateway.pipeline import Pipeline
from gateway.store.base import QuarantineRecord, Store

logger = logging.getLogger(__name__)

NormalizerFor = Callable[[str], Normalizer]
"""channel name -> the normalizer live ingest uses for it (``KeyError``: not installed)."""


def state_text(record: QuarantineRecord) -> str:
    """``held``, or when and how it was replayed."""
    if record.replayed_at is None:
        return "held"
    return f"replayed {isoformat(record.replayed_at)}: {record.replay_result}"


def record_info(record: QuarantineRecord, envelope: RawEnvelope | None = None) -> dict[str, Any]:
    """The record as ``quarantine show`` prints it (and the status page's JSON carries it)."""
    info: dict[str, Any] = {
        "id": record.id,
        "channel": record.channel,
        "inbox": record.inbox,
        "tenant": record.tenant,
        "reason": record.reason,
        "raw_ref": record.raw_ref,
        "size": record.size,
        "received_at": isoformat(record.received_at),
        "replayed_at": isoformat(record.replayed_at),
        "replay_result": record.replay_result,
    }
    if envelope is not None:
        info["content_type"] = envelope.content_type
    return info


async def list_records(store: Store, limit: int = 100) -> list[QuarantineRecord]:
    return await store.quarantine_list(limit=limit)


async def show(store: Store, quarantine_id: str) -> tuple[QuarantineRecord, RawEnvelope] | None:
    """The record and its envelope (raw bytes included); ``None`` when there is no such id."""
    return await store.quarantine_get(quarantine_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayResult:
    """What a replay did: ``summary`` is ``accepted``, ``duplicate`` or ``rejected: why``."""

    id: str
    outcome: str
    reason: str | None
    stored: bool

    @property
    def summary(self) -> str:
        return self.outcome + (f": {self.reason}" if self.reason else "")


async def replay(
    store: Store, pipeline: Pipeline, normalizer_for: NormalizerFor, quarantine_id: str
) -> ReplayResult | None:
    """Normalize the quarantined message again and commit it; its events land in the outbox, which
    the running gateway's relay publishes. The record is marked replayed only when the result was
    stored; a second failure leaves it held, with the new reason returned. ``None``: no such id."""
    found = await store.quarantine_get(quarantine_id)
    if found is None:
        return None
    record, envelope = found
    try:
        normalize = normalizer_for(envelope.channel)
    except KeyError:
        return ReplayResult(
            id=record.id, outcome="rejected", stored=False,
            reason=f"channel {envelope.channel!r} is not installed here",
        )
    result = await pipeline.replay(envelope, normalize)
    made = ReplayResult(
        id=record.id, outcome=result.outcome.value, reason=result.reason, stored=result.stored
    )
    if result.stored:
        await store.quarantine_mark_replayed(record.id, made.summary)
    logger.info("quarantined message %s replayed: %s", record.id, made.summary)
    return made
