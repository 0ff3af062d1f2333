"""What the three Meta channels share behind the hub: split a verified body by inbox, ingest every
part, report delivery receipts, queue media, and answer Meta.

A body's items may go to several inboxes (two phone numbers of one WhatsApp Business Account, two
pages of one app). Each inbox gets one envelope: the body exactly as signed when it all goes to one
inbox (the usual case), else a body of the same shape holding only that inbox's entries. Every part
is ingested at once; Meta gets 200 only when every part is stored (a duplicate or a quarantine is
stored), 503 with ``Retry-After`` when any part is not (Meta redelivers the whole body, and what was
stored is a duplicate then), 400 when a part was refused as a request. Items for no configured inbox
are answered 200 and counted (``unrouted``); receipts on our replies go to ``ctx.report_delivery``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from connectors.base import WebhookIntake, ingest_capturing, retry_response, text_ok
from connectors.media import MediaFetcher, fetches_for
from connectors.meta.hub import Delivery
from core.channel import ChannelContext, DeliveryStatus, ReplyFailure
from core.model import IngestResult, Outcome, RawEnvelope
from normalizers.base import Normalizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Receipt:
    """A provider's report on one of our replies."""

    message_id: str
    status: DeliveryStatus
    at: datetime | None = None
    reason: ReplyFailure | None = None
    detail: str | None = None


@dataclass(slots=True, kw_only=True)
class Split:
    """A body sorted by inbox: the entries (or entry parts) of each, receipts, and what went nowhere."""

    parts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    unrouted: int = 0
    whole: bool = True  # every entry went, unchanged, to one inbox

    def add(self, inbox: str, entry: dict[str, Any]) -> None:
        self.parts.setdefault(inbox, []).append(entry)


class MetaChannel(abc.ABC):
    """One Meta channel's webhook handler (WhatsApp, Messenger or Instagram) on the shared hub."""

    object_kind: str

    def __init__(
        self,
        ctx: ChannelContext,
        normalize: Normalizer,
        tenants: Mapping[str, str],
        fetcher: MediaFetcher | None,
        fetching: frozenset[str],
        timeout: float,
    ) -> None:
        self._ctx = ctx
        self._normalize = normalize
        self._tenants = dict(tenants)
        self._fetcher = fetcher
        self._fetching = fetching
        self._timeout = timeout
        self._work = WebhookIntake(ctx.channel, timeout)

    @abc.abstractmethod
    def split(self, app: str, payload: Mapping[str, Any]) -> Split:
        raise NotImplementedError

    async def __call__(self, delivery: Delivery) -> web.Response:
        channel = self._ctx.channel
        try:
            split = self.split(delivery.app.name, delivery.payload)
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            # A verified body of an unexpected shape: keep it whole for a person (quarantine).
            logger.warning(
                "%s %s: cannot sort a body by inbox (%s); quarantining it", channel, delivery.app.name, exc
            )
            # The whole body, exactly as signed, to the first inbox: the normalizer quarantines it.
            split = Split(whole=True)
            split.parts[next(iter(self._tenants))] = []
        if split.unrouted:
            logger.warning(
                "%s %s: %d item(s) for no configured inbox; answered and dropped",
                channel,
                delivery.app.name,
                split.unrouted,
            )
            for _ in range(split.unrouted):
                self._ctx.metrics.event("unrouted")
        try:
            # Shielded: a half-done commit helps nobody; Meta's redelivery finds it stored.
            results = await self._work.shielded(self._process(delivery, split), self._timeout)
        except TimeoutError:
            logger.warning("%s %s: store did not answer within %.1f s; answering 503", channel,
                           delivery.app.name, self._timeout)
            return retry_response(5.0)
        except Exception:
            logger.exception("%s %s: processing a webhook failed", channel, delivery.app.name)
            return retry_response(5.0)
        worst = _worst(results)
        if worst is None:  # every item was for no configured inbox: answered and dropped
            return web.Response(status=200, text="ok")
        return self._work.answer(worst, name=delivery.app.name, ok=text_ok())

    async def _process(self, delivery: Delivery, split: Split) -> list[IngestResult]:
        results = await asyncio.gather(
            *(
                self._ingest(delivery, inbox, entries, whole=split.whole and len(split.parts) == 1)
                for inbox, entries in split.parts.items()
            )
        )
        for receipt in split.receipts:
            await self._ctx.report_delivery(
                receipt.message_id,
                receipt.status,
                at=receipt.at,
                reason=receipt.reason,
                detail=receipt.detail,
            )
        return list(results)

    async def _ingest(
        self, delivery: Delivery, inbox: str, entries: list[dict[str, Any]], *, whole: bool
    ) -> IngestResult:
        body = delivery.body if whole else orjson.dumps({"object": self.object_kind, "entry": entries})
        envelope = RawEnvelope(
            channel=self._ctx.channel,
            tenant=self._tenants[inbox],
            inbox=inbox,
            body=body,
            received_at=self._ctx.clock.now(),
            content_type=delivery.content_type,
            headers=delivery.headers,
            signature_verified=True,
            remote=delivery.remote,
            meta={"app": delivery.app.name, "part": not whole},
        )
        result, produced = await ingest_capturing(self._ctx.ingest, envelope, self._normalize)
        if not result.stored:
            return result
        if not produced and result.outcome is Outcome.ACCEPTED:
            self._ctx.metrics.event("update_ignored", inbox=inbox)
        # Also for a duplicate: the first delivery may have been committed by a process that died
        # before it queued the media; the queue is insert-if-absent.
        if self._fetcher is not None and produced and inbox in self._fetching:
            await self._fetcher.enqueue(fetches_for(produced, now=self._ctx.clock.now()))
        return result

    async def drain(self, app: web.Application) -> None:
        """Let work that outlived its answer finish before the store closes."""
        await self._work.drain(app)


def _worst(results: Sequence[IngestResult]) -> IngestResult | None:
    """The result that decides the answer for a delivery split by inbox: a retry (with the longest
    wait) before a rejection before a stored part; success only when every part is stored."""
    retry = [r for r in results if r.outcome is Outcome.RETRY]
    if retry:
        return replace(retry[0], retry_after=max(r.retry_after or 5.0 for r in retry))
    rejected = [r for r in results if r.outcome is Outcome.REJECTED]
    return rejected[0] if rejected else next(iter(results), None)
