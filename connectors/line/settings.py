"""``[channels.line]``: one LINE Official Account (Messaging API channel) per inbox, each answered at
``POST /line/{inbox}``."""

from __future__ import annotations

from pydantic import Field

from core.settings import ChannelSettings, Duration, Secret

MiB = 1024 * 1024
DEFAULT_API_BASE = "https://api.line.me"
# The content API (message images, video, audio, files) lives on its own host.
DEFAULT_DATA_API_BASE = "https://api-data.line.me"


class LineInboxSettings(ChannelSettings):
    """``[channels.line.inboxes.<inbox id>]``: the Messaging API channel that receives for that inbox."""

    # LINE Developers console, channel "Basic settings" > Channel secret: signs every webhook.
    channel_secret: Secret | None = None
    # The secret being replaced during a rotation ("Issue" in the console): both are accepted.
    previous_channel_secret: Secret | None = None
    # "Messaging API" tab > Channel access token (long-lived): the content API and the replies.
    channel_access_token: Secret | None = None
    # Fetch images, video, audio and files through the content API after the answer.
    fetch_media: bool = True
    # Answer with the event's reply token while it lasts (free, not counted in the monthly quota);
    # otherwise, and on every retry, push (idempotent through X-Line-Retry-Key).
    reply_with_token: bool = True


class LineSettings(ChannelSettings):
    """``[channels.line]``."""

    api_base: str = DEFAULT_API_BASE
    data_api_base: str = DEFAULT_DATA_API_BASE
    # A delivery is a few KiB of JSON; media travel by message id, never in the body.
    max_body_bytes: int = Field(1 * MiB, gt=0)
    # LINE expects an answer within about 2 s (and redelivers, when enabled, after a failure).
    ingest_timeout: Duration = 1.5
    api_timeout: Duration = 30.0
    media_max_bytes: int = Field(50 * MiB, gt=0)
    media_concurrency: int = Field(4, ge=1, le=32)
    # LINE keeps message content for a limited time (days); retry for a day before giving up.
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0
    # A reply token is valid for about a minute after the event; use it only well within that.
    reply_token_ttl: Duration = 50.0
    # Sends per second per inbox (LINE allows 2,000 requests per second to the push API).
    send_rate: float = Field(50.0, gt=0)
    inboxes: dict[str, LineInboxSettings] = Field(min_length=1)
