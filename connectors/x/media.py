"""X media: DM images, GIFs and videos, fetched by URL after the answer.

A DM names its media by URL (``media[].ref``): images on ton.twitter.com, which wants the
receiving account's OAuth 1.0a signature, GIFs and videos on video.twimg.com. Only URLs under
``media_hosts`` are fetched (anything else fails for good: a signed payload should never name
another host). 429 and 5xx are retried with the fetcher's capped backoff; 401, 403, 404 and a file
past ``media_max_bytes`` fail for good (``media_failed``). The message is on the bus either way.
"""

from __future__ import annotations

import mimetypes
import posixpath
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from connectors.media import Download, Fetched, MediaGone, MediaUnavailable
from connectors.x.api import XApi, XApiError
from connectors.x.oauth import OAuth1
from core.media import MediaFetch


def downloader(
    api: XApi, auths: Mapping[str, OAuth1 | None], *, hosts: Sequence[str], max_bytes: int
) -> Download:
    """The download of one fetch, signed with the credentials of the account (inbox) that received it."""

    async def download(fetch: MediaFetch) -> Fetched:
        if fetch.account not in auths:
            raise MediaGone("this inbox no longer fetches media")
        if not any(fetch.ref.startswith(prefix) for prefix in hosts):
            raise MediaGone("the media URL is not under channels.x.media_hosts")
        try:
            got = await api.download(auths[fetch.account], fetch.ref, max_bytes=max_bytes)
        except XApiError as exc:
            if exc.transient:
                raise MediaUnavailable(str(exc)) from exc
            raise MediaGone(str(exc)) from exc
        name = posixpath.basename(urlsplit(fetch.ref).path) or None
        content_type = (got.content_type or fetch.content_type
                        or (mimetypes.guess_type(name)[0] if name else None) or "application/octet-stream")
        return Fetched(data=got.data, content_type=content_type.split(";")[0].strip(), filename=name)

    return download
