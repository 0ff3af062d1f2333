"""What SMTP and IMAP share: which inbox an address belongs to, and how an envelope is built."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from connectors.email import trust
from connectors.email.settings import EmailSettings
from core.channel import Compute
from core.model import RawEnvelope
from core.settings import Settings

logger = logging.getLogger(__name__)

CHANNEL = "email"


class Router:
    """Maps a recipient address to its inbox: exact addresses first, then catch-all domains."""

    def __init__(self, email: EmailSettings) -> None:
        self._addresses = {a: inbox for inbox, s in email.inboxes.items() for a in s.addresses}
        self._domains = {d: inbox for inbox, s in email.inboxes.items() for d in s.domains}

    def inbox_for(self, address: str) -> str | None:
        address = address.strip().lower()
        if address.count("@") != 1:
            return None
        inbox = self._addresses.get(address)
        if inbox is not None:
            return inbox
        return self._domains.get(address.rpartition("@")[2].rstrip("."))


@dataclass(frozen=True, slots=True)
class EnvelopeFactory:
    """Builds the envelope of one mail for one inbox; holds what every mail of the channel shares."""

    email: EmailSettings
    tenants: Mapping[str, str]  # inbox id -> tenant
    ticket_ref_pattern: str
    # Where a trusted Authentication-Results header is parsed (the channel context's compute):
    # authres takes ~500 us of pure Python per header, off the event loop's interpreter there.
    compute: Compute | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, email: EmailSettings, *, compute: Compute | None = None
    ) -> EnvelopeFactory:
        return cls(
            email=email,
            tenants={inbox_id: inbox.tenant for inbox_id, inbox in settings.inboxes.items()},
            ticket_ref_pattern=settings.threading.ticket_ref_pattern,
            compute=compute,
        )

    async def build(
        self,
        raw: bytes,
        *,
        inbox: str,
        transport: Mapping[str, Any],
        remote: str | None = None,
        authserv_id: str | None = None,
        received_at: datetime | None = None,
    ) -> RawEnvelope:
        """The raw bytes are passed on exactly as received (no Received header is added to them)."""
        authentication = await self._verdict(raw, authserv_id) if authserv_id else None
        meta: dict[str, Any] = {
            **transport,
            "authentication": dict(authentication) if authentication is not None else None,
            "ticket_ref_pattern": self.ticket_ref_pattern,
        }
        if self.email.loop_marker is not None:
            meta["loop_marker"] = self.email.loop_marker
        return RawEnvelope(
            channel=CHANNEL,
            tenant=self.tenants[inbox],
            inbox=inbox,
            body=raw,
            received_at=received_at or datetime.now(UTC),
            content_type="message/rfc822",
            signature_verified=authentication is not None and authentication["dmarc"] == "pass",
            remote=remote,
            meta=meta,
        )

    async def _verdict(self, raw: bytes, authserv_id: str) -> trust.Authentication | None:
        head = trust.header_block(raw)
        if self.compute is None or not trust.has_results(head):
            return trust.verdict(head, authserv_id)  # most mail has no header to parse: no hand-over
        try:
            return await self.compute(trust.verdict, head, authserv_id)
        except RuntimeError as exc:
            # Not parsed again here: the header may be what took the other process down.
            logger.error("Authentication-Results of a mail not read (%s); its sender is not trusted", exc)
            return None
