"""Media of WeChat-family messages: what a committed callback announces, and how it is downloaded.

The callback is answered once the message is committed and its media are in the channel's fetch
queue; the generic :class:`connectors.media.MediaFetcher` downloads them after the answer through the
account's :class:`~connectors.wechat.api.WeChatApi` (WeChat keeps temporary media for three days,
so failures are retried for that long). Desks fetch them from the gateway's ``/media/`` endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime

from connectors.media import (
    Download,
    Fetched,
    MediaFetcher,
    MediaGone,
    MediaPolicy,
    MediaUnavailable,
    Now,
)
from connectors.wechat.api import ApiError, ApiUnavailable, TooLargeMedia, WeChatApi
from core.channel import ChannelMetrics, MediaQueue
from core.events import media_path
from core.media import MediaFetch
from core.model import CanonicalMessage

FETCHED_KINDS = frozenset({"image", "voice", "video", "file"})
# A media id WeChat does not know (or no longer keeps): retrying cannot help.
GONE_ERRORS = frozenset({40007, 46004})


def media_key(channel: str, inbox: str, ref: str) -> str:
    """The stable name of one media file; also the path under ``/media/`` that serves it."""
    return media_path(channel, inbox, ref)


def fetches_for(messages: Sequence[CanonicalMessage], *, account: str, now: datetime) -> list[MediaFetch]:
    """The fetches a committed callback's messages announce (images, voice, video, files)."""
    fetches: dict[str, MediaFetch] = {}
    for message in messages:
        for media in message.media:
            if media.kind not in FETCHED_KINDS or not media.ref:
                continue
            key = media_key(message.channel, message.inbox, media.ref)
            fetches.setdefault(
                key,
                MediaFetch(
                    key=key,
                    channel=message.channel,
                    inbox=message.inbox,
                    account=account,
                    ref=media.ref,
                    kind=media.kind,
                    name=media.name,
                    content_type=media.content_type,
                    created_at=now,
                ),
            )
    return list(fetches.values())


def downloader(apis: Mapping[str, WeChatApi], *, max_bytes: int) -> Download:
    """Download a queued fetch through its account's API, the errors sorted into gone and unavailable."""

    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("no API credentials for this account any more")
        try:
            media = await api.media(fetch.ref, max_bytes=max_bytes)
        except TooLargeMedia as exc:
            raise MediaGone(exc.errmsg) from exc
        except ApiError as exc:
            if exc.errcode in GONE_ERRORS:
                raise MediaGone(str(exc)) from exc
            raise MediaUnavailable(str(exc)) from exc
        except ApiUnavailable as exc:
            raise MediaUnavailable(exc.reason) from exc
        return Fetched(data=media.data, content_type=media.content_type, filename=media.filename)

    return download


class WeChatMedia:
    """The media of one WeChat-family channel: queued for the accounts with API credentials, fetched
    through their APIs."""

    def __init__(
        self, channel: str, accounts: frozenset[str], policy: MediaPolicy, *, now: Now | None = None
    ) -> None:
        self.accounts = accounts
        self.policy = policy
        self.fetcher = MediaFetcher(channel, policy, now=now)

    def bind(self, queue: MediaQueue, metrics: ChannelMetrics | None = None) -> None:
        self.fetcher.bind(queue, metrics)

    async def enqueue(self, messages: Sequence[CanonicalMessage], account: str) -> None:
        """Durably queue the media of committed messages (before the channel is answered)."""
        if account in self.accounts:
            await self.fetcher.enqueue(fetches_for(messages, account=account, now=self.fetcher.now()))

    def running(self, apis: Mapping[str, WeChatApi]) -> AbstractAsyncContextManager[None]:
        """Fetch through ``apis`` for the duration of the block."""
        return self.fetcher.running(downloader(apis, max_bytes=self.policy.max_bytes))

    async def run_once(self) -> int:
        return await self.fetcher.run_once()


__all__ = ["MediaPolicy", "WeChatMedia", "downloader", "fetches_for", "media_key"]
