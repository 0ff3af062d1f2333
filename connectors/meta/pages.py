"""Messenger (``object = page``) and Instagram (``object = instagram``) through the app's hub.

Each entry is routed by its ``id`` (the Facebook Page, or the Instagram professional account) to the
inbox that names it (else to the app's inbox without a ``page_id``; else it is answered and counted
``unrouted``). ``delivery`` (Messenger: the mids delivered) and Instagram's ``read`` (the mid read)
are receipts on our replies; Messenger's ``read`` names only a watermark, not a message, and is
counted. Everything else goes through the pipeline; attachments are fetched after the commit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self

from connectors.media import MediaPolicy, start_fetcher
from connectors.meta.channel import MetaChannel, Receipt, Split
from connectors.meta.graph import GraphApi
from connectors.meta.hub import PREFIX, MetaHub, load_apps, meta_table, own_app_ids
from connectors.meta.media import url_downloader
from connectors.meta.sender import SendApiSender, send_api_spec
from connectors.meta.settings import GraphSettings, InstagramSettings, MessengerSettings
from core.channel import ChannelContext, ChannelEndpoint
from core.errors import ConfigError
from core.settings import Settings
from normalizers.messenger import INSTAGRAM, MESSENGER, OBJECTS, configure


@dataclass(frozen=True, slots=True, kw_only=True)
class Page:
    """One inbox's page or Instagram account (``page_id`` ``None``: the app's others)."""

    inbox: str
    tenant: str
    app: str
    page_id: str | None
    fetch_media: bool
    token: str = field(repr=False)


class PagesConnector:
    channel: str
    model: type[GraphSettings]

    def __init__(self, table: GraphSettings, pages: Mapping[str, Page]) -> None:
        self.table = table
        self.pages = dict(pages)

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        table = settings.channel(cls.channel, cls.model)
        if table is None:
            return None
        apps = load_apps(settings)
        pages: dict[str, Page] = {}
        seen: dict[tuple[str, str | None], str] = {}
        inboxes = getattr(table, "inboxes", {})
        for inbox, config in inboxes.items():
            where = f"channels.{cls.channel}.inboxes.{inbox}"
            if config.app not in apps:
                raise ConfigError(
                    f"names Meta app {config.app!r}, which is not in [channels.meta.apps]",
                    file=settings.source,
                    key=f"{where}.app",
                )
            token = config.access_token.get_secret_value() if config.access_token is not None else ""
            if not token:
                raise ConfigError(
                    "is required (attachments cannot be fetched nor replies sent without it)",
                    file=settings.source,
                    key=f"{where}.access_token",
                )
            route = (config.app, config.page_id)
            if route in seen:
                raise ConfigError(
                    f"routes the same page as inbox {seen[route]!r}",
                    file=settings.source,
                    key=f"{where}.page_id",
                )
            seen[route] = inbox
            pages[inbox] = Page(
                inbox=inbox,
                tenant=settings.inbox(inbox, key=where).tenant,
                app=config.app,
                page_id=config.page_id,
                fetch_media=config.fetch_media,
                token=token,
            )
        return cls(table, pages)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        return [
            ChannelEndpoint(inbox=p.inbox, kind="webhook", address=f"{base_url}{PREFIX}/{p.app}")
            for p in self.pages.values()
        ]

    def setup(self, ctx: ChannelContext) -> None:
        table, channel = self.table, self.channel
        http = ctx.http(table.api_base, timeout=table.api_timeout)
        apis = {
            inbox: GraphApi(http, table.api_version, p.token, timeout=table.api_timeout)
            for inbox, p in self.pages.items()
        }
        fetching = frozenset(inbox for inbox, p in self.pages.items() if p.fetch_media)
        fetcher = None
        if fetching:
            download = url_downloader({i: apis[i] for i in fetching}, max_bytes=table.media_max_bytes)
            fetcher = start_fetcher(ctx, channel, MediaPolicy.from_table(table, api_calls=2), download)
        hub = MetaHub.shared(ctx)
        handler = PagesWebhook(
            ctx,
            configure(channel, table.echoes, own_app_ids(ctx.settings)),
            {i: p.tenant for i, p in self.pages.items()},
            fetcher,
            fetching,
            meta_table(ctx.settings).ingest_timeout,
            pages=self.pages,
            object_kind=OBJECTS[channel],
        )
        for app in sorted({p.app for p in self.pages.values()}):
            hub.register(app, OBJECTS[channel], handler, ctx.metrics)
        hub.add_drain(handler.drain)
        sender = SendApiSender(channel, apis, {i: p.page_id for i, p in self.pages.items()}, ctx.blobs)
        ctx.add_sender(send_api_spec(sender))


class MessengerConnector(PagesConnector):
    channel = MESSENGER
    model = MessengerSettings


class InstagramConnector(PagesConnector):
    channel = INSTAGRAM
    model = InstagramSettings


class PagesWebhook(MetaChannel):
    def __init__(self, *args: Any, pages: Mapping[str, Page], object_kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.object_kind = object_kind
        self._by_page = {(p.app, p.page_id): inbox for inbox, p in pages.items()}

    def split(self, app: str, payload: Mapping[str, Any]) -> Split:
        split = Split()
        for entry in payload.get("entry") or []:
            page = entry.get("id")
            inbox = self._by_page.get((app, str(page))) if page is not None else None
            inbox = inbox or self._by_page.get((app, None))
            for key in ("messaging", "standby"):
                for item in entry.get(key) or []:
                    split.receipts.extend(receipts(item))
            if inbox is None:
                split.unrouted += 1
                split.whole = False
                continue
            split.add(inbox, entry)
        if len(split.parts) > 1:
            split.whole = False
        return split


def receipts(item: Mapping[str, Any]) -> list[Receipt]:
    """Messenger's ``delivery`` (every mid delivered) and Instagram's ``read`` (one mid)."""
    found: list[Receipt] = []
    delivery, read = item.get("delivery"), item.get("read")
    if isinstance(delivery, dict):
        at = _at(delivery.get("watermark"))
        found += [
            Receipt(message_id=mid, status="delivered", at=at)
            for mid in delivery.get("mids") or []
            if isinstance(mid, str) and mid
        ]
    if isinstance(read, dict) and isinstance(read.get("mid"), str) and read["mid"]:
        found.append(Receipt(message_id=read["mid"], status="read", at=_at(item.get("timestamp"))))
    return found


def _at(value: object) -> datetime | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return None
