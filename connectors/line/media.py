"""LINE media: the content API downloads what a committed message names by its message id.

The webhook is answered once the message is committed and its fetches are queued
(insert-if-absent); the shared :class:`connectors.media.MediaFetcher` then calls
:func:`downloader`. LINE answers 202 while a video or audio is still being prepared, 429 when
rate-limited and 5xx when busy: all retried with the fetcher's capped backoff. 404 (the content is
gone: LINE keeps it for a limited time) and 413 (past ``media_max_bytes``) fail for good
(``media_failed``). The message is on the bus either way.
"""

from __future__ import annotations

from collections.abc import Mapping

from connectors.line.api import LineApi, LineApiError
from connectors.media import Download, Fetched, MediaGone, MediaUnavailable
from core.media import MediaFetch

_GONE = frozenset({400, 403, 404, 410, 413})


def downloader(apis: Mapping[str, LineApi], *, max_bytes: int) -> Download:
    """The content API call for one fetch, its errors sorted into gone (no retry) and unavailable."""

    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this inbox no longer fetches media")
        try:
            content = await api.content(fetch.ref, max_bytes=max_bytes)
        except LineApiError as exc:
            if exc.status in _GONE:
                raise MediaGone(exc.describe()) from exc
            raise MediaUnavailable(exc.describe()) from exc
        content_type = content.content_type or fetch.content_type or "application/octet-stream"
        return Fetched(data=content.data, content_type=content_type.split(";")[0].strip(),
                       filename=fetch.name)

    return download
