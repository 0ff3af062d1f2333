"""Slack files: how the bot token downloads one (the shared media queue and fetcher do the rest).

A message names its files by id; the callback is answered once the message is committed and its
fetches are queued (insert-if-absent, so a redelivery adds nothing). The shared
:class:`connectors.media.MediaFetcher` then calls :func:`downloader`: files.info for the file's
current private URL (Slack Connect files from another organisation are only reachable that way),
then the download with the bot token, only from the configured file hosts. Unreachable, rate-limited,
Slack's 5xx and a refused token are retried with the fetcher's capped backoff (a token can be
fixed); a deleted file, one past ``media_max_bytes`` or on another host fails for good
(``media_failed``). The message is on the bus either way.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping

from connectors.media import Download, Fetched, MediaGone, MediaUnavailable
from connectors.slack.api import AUTH_ERRORS, SlackError, WebApi
from core.media import MediaFetch

GONE = frozenset({"file_not_found", "file_deleted", "host_not_allowed", "too_large", "no_file_object",
                  "no_url"})


def downloader(apis: Mapping[str, WebApi], *, max_bytes: int, hosts: frozenset[str]) -> Download:
    """files.info, then the private URL with the bot token."""

    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this installation no longer fetches files")
        try:
            info = await api.file_info(fetch.ref)
            if info.get("mode") in ("tombstone", "hidden_by_limit"):
                raise MediaGone(f"Slack keeps no bytes for this file (mode {info.get('mode')})")
            size = info.get("size")
            if isinstance(size, int) and size > max_bytes:
                raise MediaGone(f"file of {size} bytes is over media_max_bytes")
            url = info.get("url_private_download") or info.get("url_private")
            if not isinstance(url, str) or not url:
                raise SlackError("files.info", "no_url")
            data, served_type = await api.download(url, max_bytes=max_bytes, hosts=hosts)
        except SlackError as exc:
            if exc.error in GONE:
                raise MediaGone(str(exc)) from exc
            if exc.transient or exc.error in AUTH_ERRORS or exc.error.startswith("http_"):
                raise MediaUnavailable(str(exc)) from exc
            raise MediaGone(str(exc)) from exc
        name = info.get("name") if isinstance(info.get("name"), str) else None
        content_type = (
            fetch.content_type
            or _plain_type(info.get("mimetype"))
            or _plain_type(served_type)
            or (mimetypes.guess_type(name)[0] if name else None)
            or "application/octet-stream"
        )
        return Fetched(data=data, content_type=content_type, filename=fetch.name or name)

    return download


def _plain_type(value: object) -> str | None:
    if not isinstance(value, str) or "/" not in value:
        return None
    return value.split(";", 1)[0].strip() or None
