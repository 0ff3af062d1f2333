"""Provider-held media that the gateway fetches after a message is committed: the durable queue's record."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

MediaState = Literal["pending", "done", "failed"]


@dataclass(frozen=True, slots=True, kw_only=True)
class MediaFetch:
    """One provider-held media file (a WeChat ``media_id``) the gateway fetches after the commit.

    ``key`` is the media's stable name, ``{channel}/{inbox}/{ref}``, under which desks fetch it
    (``{public_url}/media/{key}``); it is unique. ``account`` names the connector's credentials
    (the Official Account or WeCom app that received it). Pending rows are due at
    ``next_attempt_at``; a done row names its blob (``sha256``, readable with ``read_blob``).
    """

    key: str
    channel: str
    inbox: str
    account: str
    ref: str
    kind: str
    created_at: datetime
    state: MediaState = "pending"
    attempts: int = 0
    next_attempt_at: datetime | None = None
    sha256: str | None = None
    size: int | None = None
    content_type: str | None = None
    name: str | None = None
    error: str | None = None
