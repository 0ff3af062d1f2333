"""The path of one inbound message: normalize -> enrich -> one store transaction -> the answer.

The pipeline never answers "stored" for something that is not committed, and never turns a
transient fault into a permanent rejection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from core import events
from core.errors import InvalidInput, NormalizationError, RetryableError
from core.events import CustomerView, Event
from core.model import CanonicalMessage, IngestResult, Outcome, Placement, RawEnvelope
from core.settings import Settings
from dedupe.policy import PlacementPolicy
from gateway.enrich import Enricher
from gateway.metrics import Metrics
from gateway.offload import NormalizeWorker, offloadable
from gateway.store.base import Store
from normalizers.base import Normalizer, storable
from normalizers.content import normalized

logger = logging.getLogger(__name__)

Enrich = Callable[[CanonicalMessage], CanonicalMessage]
Answering = Callable[[CanonicalMessage, CustomerView], Mapping[str, Any]]
"""(message, customer) -> message.received's ``reply`` block (:func:`core.events.reply_options`)."""


class Pipeline:
    """Turns raw envelopes into committed messages and events; one per application."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics,
        *,
        enrich: Enrich | None = None,
        enricher: Enricher | None = None,
        on_commit: Callable[[], None] | None = None,
        offload: NormalizeWorker | None = None,
        answering: Answering | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        # ``enricher``: its enrich, and on the live path finishing and enrichment in one copy.
        self._enrich = enricher.enrich if enricher is not None else enrich
        self._finish_and_enrich = enricher.finish_and_enrich if enricher is not None else None
        self._on_commit = on_commit
        # Parses (and enriches, from the same settings) what a normalizer marks heavy.
        self._offload = offload
        # How a thread can be answered (message.received's reply block), from the registered senders.
        self._answering = answering
        self._policies: dict[tuple[str, str], PlacementPolicy] = {}

    async def ingest(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        """Process one envelope; the result tells the connector what to answer."""
        started = time.perf_counter()
        channel = envelope.channel
        self._metrics.message_received(channel)
        result = await self._ingest(envelope, normalize)
        ack_seconds = time.perf_counter() - started if result.stored else None
        self._metrics.message_done(channel, result.outcome.value, ack_seconds, inbox=envelope.inbox)
        if result.stored and self._on_commit is not None:
            self._on_commit()
        return result

    async def replay(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        """Re-run a quarantined envelope; a second failure is reported, not quarantined again."""
        try:
            messages = self._normalize(envelope, normalize)
        except (InvalidInput, NormalizationError) as exc:
            return IngestResult(outcome=Outcome.REJECTED, reason=str(exc))
        result = await self._accept(envelope, messages)
        if result.stored and self._on_commit is not None:
            self._on_commit()
        return result

    async def _ingest(self, envelope: RawEnvelope, normalize: Normalizer) -> IngestResult:
        try:
            messages = None
            if self._offload is not None and offloadable(normalize):
                messages = await self._offload.run(normalize, envelope)
            if messages is None:
                messages = self._normalize(envelope, normalize)
        except InvalidInput as exc:
            logger.info("rejected %s message for inbox %s: %s", envelope.channel, envelope.inbox, exc.reason)
            return IngestResult(outcome=Outcome.REJECTED, reason=exc.reason, status=exc.status)
        except NormalizationError as exc:
            return await self._quarantine(envelope, str(exc))
        except Exception as exc:
            # A normalizer bug must not lose a verified message: keep it for replay after the fix.
            logger.exception("normalizer for %s failed", envelope.channel)
            return await self._quarantine(envelope, f"normalizer error: {type(exc).__name__}: {exc}")
        result = await self._accept(envelope, messages)
        reused = [p for p in result.placements if p.conflict]
        if reused:
            return await self._key_reused(envelope, result, reused)
        return result

    async def _key_reused(
        self, envelope: RawEnvelope, result: IngestResult, reused: Sequence[Placement]
    ) -> IngestResult:
        """An idempotency key came back with other content: not a retry, and never dropped unseen.

        ``refuse`` (the API) tells the sender (422); ``record`` keeps the first delivery's answer
        and quarantines this one, so its raw bytes and the reason are kept for a person to look at.
        """
        first = reused[0].message_id
        self._metrics.channel_event(envelope.channel, envelope.inbox, "idempotency_key_reused")
        logger.warning(
            "%s message for inbox %s reuses the idempotency key of message %s with other content",
            envelope.channel, envelope.inbox, first,
        )
        if envelope.key_reuse == "refuse":
            return IngestResult(
                outcome=Outcome.REJECTED,
                status=422,
                reason="this idempotency key was already used for a request with another body",
            )
        recorded = await self._quarantine(
            envelope, f"idempotency key reused with other content; answered as a duplicate of {first}"
        )
        return result if recorded.stored else recorded

    def _normalize(self, envelope: RawEnvelope, normalize: Normalizer) -> list[CanonicalMessage]:
        if self._finish_and_enrich is not None:
            return [self._finish_and_enrich(message) for message in normalize(envelope)]
        messages = normalized(normalize, envelope)
        if self._enrich is not None:
            messages = [self._enrich(message) for message in messages]
        return messages

    async def _accept(self, envelope: RawEnvelope, messages: Sequence[CanonicalMessage]) -> IngestResult:
        if not messages:
            # e.g. a delivery receipt: verified, understood, nothing to ticket.
            return IngestResult(outcome=Outcome.ACCEPTED)
        try:
            # Here, once, for every channel, the live path, the offloaded one and replays alike.
            messages = [storable(m) for m in messages]
        except InvalidInput as exc:
            logger.info("rejected %s message for inbox %s: %s", envelope.channel, envelope.inbox, exc.reason)
            return IngestResult(outcome=Outcome.REJECTED, reason=exc.reason, status=exc.status)
        try:
            placements = await self._store.accept(
                envelope,
                messages,
                policies=[self._policy(m) for m in messages],
                build_event=self._build_event(envelope),
            )
        except RetryableError as exc:
            logger.warning("cannot store %s message now: %s", envelope.channel, exc.reason)
            return IngestResult(outcome=Outcome.RETRY, reason=exc.reason, retry_after=exc.retry_after)
        except Exception:
            logger.exception("store failed for a %s message", envelope.channel)
            return IngestResult(
                outcome=Outcome.RETRY,
                reason="store unavailable",
                retry_after=self._settings.outbox.retry_after,
            )
        duplicate = all(p.duplicate for p in placements)
        return IngestResult(
            outcome=Outcome.DUPLICATE if duplicate else Outcome.ACCEPTED, placements=tuple(placements)
        )

    async def _quarantine(self, envelope: RawEnvelope, reason: str) -> IngestResult:
        logger.warning("quarantining %s message for inbox %s: %s", envelope.channel, envelope.inbox, reason)
        try:
            record = await self._store.quarantine(envelope, reason)
        except RetryableError as exc:
            return IngestResult(outcome=Outcome.RETRY, reason=exc.reason, retry_after=exc.retry_after)
        except Exception:
            logger.exception("store failed while quarantining a %s message", envelope.channel)
            return IngestResult(
                outcome=Outcome.RETRY,
                reason="store unavailable",
                retry_after=self._settings.outbox.retry_after,
            )
        return IngestResult(outcome=Outcome.QUARANTINED, reason=reason, quarantine_id=record.id)

    def _policy(self, message: CanonicalMessage) -> PlacementPolicy:
        """The placement policy of the message's channel and inbox, kept for a configured inbox (the
        settings do not change while the pipeline runs; configured inboxes are a bounded set)."""
        key = (message.channel, message.inbox)
        policy = self._policies.get(key)
        if policy is not None:
            return policy
        inbox = self._settings.inboxes.get(message.inbox)
        threading = self._settings.threading
        dedupe = self._settings.dedupe
        policy = PlacementPolicy(
            window=threading.window_for(message.channel, inbox.thread_window if inbox else None),
            ticket_ref_pattern=threading.ticket_ref_pattern,
            duplicate_window=dedupe.duplicate_window,
            duplicate_threshold=dedupe.duplicate_threshold,
            duplicate_min_chars=dedupe.duplicate_min_chars,
        )
        if inbox is not None:
            self._policies[key] = policy
        return policy

    def _build_event(self, envelope: RawEnvelope) -> Callable[..., Event]:
        public_url = self._settings.server.public_url
        answering = self._answering

        def build(
            message: CanonicalMessage,
            placement: Placement,
            customer: CustomerView,
            thread_subject: str | None,
            raw_ref: str | None,
        ) -> Event:
            return events.message_received(
                message,
                placement=placement,
                customer=customer,
                thread_subject=thread_subject,
                raw_ref=raw_ref,
                signature_verified=envelope.signature_verified,
                retry=envelope.retry,
                # A channel that knows why the provider redelivered keeps it in meta["retry_reason"].
                retry_reason=_retry_reason(envelope),
                public_url=public_url,
                occurred_at=datetime.now(UTC),
                reply=answering(message, customer) if answering is not None else None,
            )

        return build


def _retry_reason(envelope: RawEnvelope) -> str | None:
    reason = envelope.meta.get("retry_reason")
    return reason[:200] if isinstance(reason, str) and reason else None
