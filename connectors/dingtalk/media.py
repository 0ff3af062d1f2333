"""DingTalk media: the robot file download API gives a short-lived URL for a message's
``downloadCode``; the shared fetcher calls :func:`downloader` after the commit. Throttling, 5xx,
an unreachable API and a refused token are retried with the fetcher's backoff; an unknown or
expired code (DingTalk keeps files for a limited time) or one past ``media_max_bytes`` fails for good."""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping

from connectors.dingtalk.api import TOKEN_REFUSED, DingTalkApi, DingTalkError
from connectors.media import Download, Fetched, MediaGone, MediaUnavailable
from core.media import MediaFetch


def downloader(apis: Mapping[str, DingTalkApi], *, max_bytes: int) -> Download:
    async def download(fetch: MediaFetch) -> Fetched:
        api = apis.get(fetch.account)
        if api is None:
            raise MediaGone("this inbox no longer fetches media")
        robot_code, _, code = fetch.ref.partition(":")
        if not robot_code or not code:
            raise MediaGone(f"not a robot download code: {fetch.ref!r}")
        try:
            data, served = await api.download(robot_code, code, max_bytes=max_bytes)
        except DingTalkError as exc:
            if exc.transient or exc.code in TOKEN_REFUSED:
                raise MediaUnavailable(str(exc)) from exc
            raise MediaGone(str(exc)) from exc
        content_type = (
            (served.split(";")[0].strip() if served and "/" in served else None)
            or fetch.content_type
            or (mimetypes.guess_type(fetch.name)[0] if fetch.name else None)
            or "application/octet-stream"
        )
        return Fetched(data=data, content_type=content_type, filename=fetch.name)

    return download
