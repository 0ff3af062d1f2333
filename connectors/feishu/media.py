"""Feishu images and files: the message-resource API downloads what a committed message names.

A media ref is ``{message_id}:{key}`` (an ``image_key`` or a ``file_key``); the shared
:class:`connectors.media.MediaFetcher` calls :func:`downloader` after the commit. Rate limits,
Feishu's 5xx, an unreachable API and a refused token are retried with the fetcher's capped backoff;
a resource Feishu no longer has (or one past ``media_max_bytes``) fails for good
(``media_failed``). The message is on the bus either way.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping

from connectors.feishu.api import TOKEN_INVALID, FeishuApi, FeishuError
from connectors.media import Download, Fetched, MediaGone, MediaUnavailable
from core.media import MediaFetch


def downloader(apis: Mapping[str, FeishuApi], *, max_bytes: int) -> Download:
    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this inbox no longer fetches media")
        message_id, _, key = fetch.ref.partition(":")
        if not message_id or not key:
            raise MediaGone(f"not a message resource: {fetch.ref!r}")
        try:
            kind = "image" if fetch.kind == "image" else "file"
            data, served, name = await api.resource(message_id, key, kind, max_bytes=max_bytes)
        except FeishuError as exc:
            if exc.transient or exc.code in TOKEN_INVALID:
                raise MediaUnavailable(str(exc)) from exc
            raise MediaGone(str(exc)) from exc
        filename = fetch.name or name
        content_type = (
            (served.split(";")[0].strip() if served and "/" in served else None)
            or fetch.content_type
            or (mimetypes.guess_type(filename)[0] if filename else None)
            or "application/octet-stream"
        )
        return Fetched(data=data, content_type=content_type, filename=filename)

    return download
