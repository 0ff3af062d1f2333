"""Telegram media: what a committed update announces, and how getFile downloads it.

A message names its files by ``file_id``; the webhook is answered once the message is committed and
its fetches are queued (insert-if-absent, so a redelivery adds nothing). The shared
:class:`connectors.media.MediaFetcher` then claims them and calls :func:`downloader`: ``getFile``
for the file's path, then ``/file/bot<token>/<path>``. Unreachable, 429 and 5xx are retried with
the fetcher's capped backoff; a file over the Bot API's 20 MB limit or an unknown file_id fails for
good (``media_failed``). The message is on the bus either way.
"""

from __future__ import annotations

import mimetypes
import posixpath
from collections.abc import Mapping

from connectors.media import Download, Fetched, MediaGone, MediaUnavailable, fetches_for
from connectors.telegram.api import BotApi, BotApiError
from core.media import MediaFetch


def downloader(apis: Mapping[str, BotApi], *, max_bytes: int) -> Download:
    """getFile, then the download; Bot API errors sorted into gone (no retry) and unavailable."""

    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this bot no longer fetches media")
        try:
            file = await api.get_file(fetch.ref)
            if file.file_size is not None and file.file_size > max_bytes:
                raise MediaGone(f"file of {file.file_size} bytes is over the Bot API download limit")
            if file.file_path is None:
                raise MediaGone("getFile gave no file_path")
            data = await api.download(file.file_path, max_bytes=max_bytes)
        except BotApiError as exc:
            if exc.transient and not exc.too_big:
                raise MediaUnavailable(str(exc)) from exc
            raise MediaGone(str(exc)) from exc
        basename = posixpath.basename(file.file_path)
        content_type = fetch.content_type or mimetypes.guess_type(basename)[0] or "application/octet-stream"
        return Fetched(data=data, content_type=content_type, filename=fetch.name or basename or None)

    return download


__all__ = ["downloader", "fetches_for"]
