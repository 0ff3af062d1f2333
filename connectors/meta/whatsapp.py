"""WhatsApp Cloud API: webhooks of ``object = whatsapp_business_account`` through the app's hub.

Each change of each entry is routed by ``value.metadata.phone_number_id`` to the inbox that names
that number (else to the app's inbox without a ``phone_number_id``; else it is answered and counted
``unrouted``). ``statuses`` are receipts on our replies (``reply.delivered`` / ``reply.read`` /
``reply.failed``); messages go through the pipeline; media are fetched after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from connectors.media import MediaPolicy, start_fetcher
from connectors.meta.channel import MetaChannel, Receipt, Split
from connectors.meta.graph import GraphApi
from connectors.meta.hub import PREFIX, MetaHub, load_apps, meta_table
from connectors.meta.media import whatsapp_downloader
from connectors.meta.sender import WhatsAppSender, whatsapp_spec
from connectors.meta.settings import WhatsAppSettings
from core.channel import ChannelContext, ChannelEndpoint, DeliveryStatus, ReplyFailure
from core.errors import ConfigError
from core.settings import Settings
from normalizers.whatsapp import CHANNEL, OBJECT, configure

logger = logging.getLogger(__name__)

STATUSES: dict[str, DeliveryStatus] = {
    "delivered": "delivered",
    "read": "read",
    "played": "read",
    "failed": "failed",
}
# WhatsApp's failure codes on a status, as reply failures (the rest is provider_error).
STATUS_FAILURES: dict[int, ReplyFailure] = {
    131047: "window_closed",
    131026: "recipient_unreachable",
    131050: "blocked",
    131051: "unsupported",
    131049: "rejected",
    131053: "rejected",
    131052: "rejected",
    130472: "rejected",
    131042: "auth",
    131056: "rate_limited",
    130429: "rate_limited",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Number:
    """One inbox's phone number (``phone_number_id`` ``None``: the app's other numbers)."""

    inbox: str
    tenant: str
    app: str
    phone_number_id: str | None
    fetch_media: bool
    token: str = field(repr=False)


class WhatsAppConnector:
    def __init__(self, table: WhatsAppSettings, numbers: Mapping[str, Number]) -> None:
        self.table = table
        self.numbers = dict(numbers)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(CHANNEL, WhatsAppSettings)
        if table is None:
            return None
        apps = load_apps(settings)
        numbers: dict[str, Number] = {}
        seen: dict[tuple[str, str | None], str] = {}
        for inbox, config in table.inboxes.items():
            where = f"channels.{CHANNEL}.inboxes.{inbox}"
            _known_app(settings, apps, config.app, f"{where}.app")
            token = config.access_token.get_secret_value() if config.access_token is not None else ""
            if not token:
                raise ConfigError(
                    "is required (media cannot be fetched nor replies sent without it)",
                    file=settings.source,
                    key=f"{where}.access_token",
                )
            route = (config.app, config.phone_number_id)
            if route in seen:
                raise ConfigError(
                    f"routes the same number as inbox {seen[route]!r}",
                    file=settings.source,
                    key=f"{where}.phone_number_id",
                )
            seen[route] = inbox
            numbers[inbox] = Number(
                inbox=inbox,
                tenant=settings.inbox(inbox, key=where).tenant,
                app=config.app,
                phone_number_id=config.phone_number_id,
                fetch_media=config.fetch_media,
                token=token,
            )
        return cls(table, numbers)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        return [
            ChannelEndpoint(inbox=n.inbox, kind="webhook", address=f"{base_url}{PREFIX}/{n.app}")
            for n in self.numbers.values()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table = self.table
        http = ctx.http(table.api_base, timeout=table.api_timeout)
        apis = {
            inbox: GraphApi(http, table.api_version, n.token, timeout=table.api_timeout)
            for inbox, n in self.numbers.items()
        }
        fetching = frozenset(inbox for inbox, n in self.numbers.items() if n.fetch_media)
        fetcher = None
        if fetching:
            download = whatsapp_downloader({i: apis[i] for i in fetching}, max_bytes=table.media_max_bytes)
            # The lease covers the media-id lookup plus the download.
            fetcher = start_fetcher(ctx, CHANNEL, MediaPolicy.from_table(table, api_calls=2), download)
        hub = MetaHub.shared(ctx)
        handler = WhatsAppWebhook(
            ctx,
            configure(table.echoes),
            {i: n.tenant for i, n in self.numbers.items()},
            fetcher,
            fetching,
            meta_table(ctx.settings).ingest_timeout,
            numbers=self.numbers,
        )
        for app in sorted({n.app for n in self.numbers.values()}):
            hub.register(app, OBJECT, handler, ctx.metrics)
        hub.add_drain(handler.drain)
        numbers = {inbox: n.phone_number_id for inbox, n in self.numbers.items()}
        ctx.add_sender(whatsapp_spec(WhatsAppSender(apis, numbers, ctx.blobs, clock=ctx.clock)))


def _known_app(settings: Settings, apps: Mapping[str, object], app: str, key: str) -> None:
    if app not in apps:
        raise ConfigError(
            f"names Meta app {app!r}, which is not in [channels.meta.apps]", file=settings.source, key=key
        )


class WhatsAppWebhook(MetaChannel):
    object_kind = OBJECT

    def __init__(self, *args: Any, numbers: Mapping[str, Number], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._by_number: dict[tuple[str, str | None], str] = {
            (n.app, n.phone_number_id): inbox for inbox, n in numbers.items()
        }

    def _inbox(self, app: str, phone_number_id: object) -> str | None:
        if isinstance(phone_number_id, str) and (app, phone_number_id) in self._by_number:
            return self._by_number[(app, phone_number_id)]
        return self._by_number.get((app, None))

    def split(self, app: str, payload: Mapping[str, Any]) -> Split:
        split = Split()
        inboxes: set[str] = set()
        for entry in payload.get("entry") or []:
            parts: dict[str, list[dict[str, Any]]] = {}
            for change in entry.get("changes") or []:
                value = change.get("value") or {}
                split.receipts.extend(receipts(value.get("statuses")))
                inbox = self._inbox(app, (value.get("metadata") or {}).get("phone_number_id"))
                if inbox is None:
                    if value.get("messages") or value.get("message_echoes"):
                        split.unrouted += 1
                    split.whole = False
                    continue
                parts.setdefault(inbox, []).append(change)
            for inbox, kept in parts.items():
                inboxes.add(inbox)
                if len(kept) != len(entry.get("changes") or []):
                    split.whole = False
                split.add(inbox, {**entry, "changes": kept})
        if len(inboxes) > 1:
            split.whole = False
        return split


def receipts(statuses: object) -> list[Receipt]:
    """``statuses`` items as receipts on our replies; ``sent`` says nothing ``reply.sent`` did not."""
    found: list[Receipt] = []
    if not isinstance(statuses, list):
        return found
    for status in statuses:
        if not isinstance(status, dict):
            continue
        mapped, wamid = STATUSES.get(str(status.get("status"))), status.get("id")
        if mapped is None or not isinstance(wamid, str) or not wamid:
            continue
        reason: ReplyFailure | None = None
        detail = None
        if mapped == "failed":
            errors = status.get("errors") if isinstance(status.get("errors"), list) else []
            first = errors[0] if errors and isinstance(errors[0], dict) else {}
            code = first.get("code")
            reason = (
                STATUS_FAILURES.get(code, "provider_error") if isinstance(code, int) else "provider_error"
            )
            detail = f"{code}: {first.get('title') or first.get('message') or 'failed'}"
        found.append(
            Receipt(
                message_id=wamid, status=mapped, at=_at(status.get("timestamp")), reason=reason, detail=detail
            )
        )
    return found


def _at(value: object) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(str(value)), UTC)
    except (ValueError, OverflowError, OSError):
        return None
