"""Meta media, fetched after the commit through the shared fetch loop (``connectors.media``).

WhatsApp names media by id: ``GET /{media-id}`` gives a short-lived URL, which is downloaded with the
access token. Messenger and Instagram give the attachment's CDN URL itself (signed, no token: the
token is never sent to it). Unreachable, throttled and 5xx answers, and a refused WhatsApp token
(fixed meanwhile, the id is still good), are retried with the fetcher's capped backoff; an unknown
or expired id, an expired CDN URL or a file past the bound fails for good (``media_failed``). The
message is on the bus either way.
"""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Mapping

from connectors.media import Download, Fetched, MediaGone, MediaUnavailable
from connectors.meta.graph import AUTH, GraphApi, GraphError
from core.media import MediaFetch


def whatsapp_downloader(apis: Mapping[str, GraphApi], *, max_bytes: int) -> Download:
    """Media id -> URL -> bytes, with the inbox's token."""

    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this inbox no longer fetches media")
        try:
            info = await api.media_info(fetch.ref)
            if info.file_size is not None and info.file_size > max_bytes:
                raise MediaGone(f"file of {info.file_size} bytes is over media_max_bytes")
            data, served_type = await api.download(info.url, max_bytes=max_bytes, authorized=True)
        except GraphError as exc:
            raise _sorted(exc, token=True) from exc
        if info.sha256 is not None and hashlib.sha256(data).hexdigest() != info.sha256:
            # A truncated or corrupted download: WhatsApp said what the file's digest is.
            raise MediaUnavailable("the download does not match the sha256 WhatsApp gave")
        content_type = (
            fetch.content_type or info.mime_type or _plain(served_type) or "application/octet-stream"
        )
        return Fetched(
            data=data, content_type=content_type, filename=fetch.name or _name(fetch, content_type)
        )

    return download


def url_downloader(apis: Mapping[str, GraphApi], *, max_bytes: int) -> Download:
    """An attachment's URL -> bytes, without the token."""

    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this inbox no longer fetches media")
        try:
            data, served_type = await api.download(fetch.ref, max_bytes=max_bytes, authorized=False)
        except GraphError as exc:
            raise _sorted(exc) from exc
        content_type = _plain(served_type) or fetch.content_type or "application/octet-stream"
        return Fetched(
            data=data, content_type=content_type, filename=fetch.name or _name(fetch, content_type)
        )

    return download


def _sorted(exc: GraphError, *, token: bool = False) -> Exception:
    if exc.status == 413:
        return MediaGone(str(exc))
    if token and (exc.code in AUTH or exc.status == 401):
        # Our token expired or lost a permission: the media id stays valid for 30 days, so keep
        # trying (within media_retry_for) while someone fixes the token; logged on every attempt.
        return MediaUnavailable(str(exc))
    # 404 from a CDN whose signed URL has not propagated yet, as well as throttling, is worth a retry.
    if exc.transient or exc.status in (404, 408):
        return MediaUnavailable(str(exc))
    return MediaGone(str(exc))


def _plain(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return content_type.split(";", 1)[0].strip() or None


def _name(fetch: MediaFetch, content_type: str) -> str:
    extension = mimetypes.guess_extension(content_type.split(";", 1)[0].strip()) or ""
    stem = fetch.ref if len(fetch.ref) <= 64 and "/" not in fetch.ref else fetch.kind
    return f"{stem}{extension}"
