"""``[channels.x]``: X (Twitter) Account Activity API webhooks, one per X app at ``/x/{app}``, each
routing its subscribed accounts (``for_user_id``) to inboxes."""

from __future__ import annotations

from pydantic import Field, field_validator

from core.settings import ChannelSettings, Duration, Secret

MiB = 1024 * 1024
DEFAULT_API_BASE = "https://api.x.com"
# Where DM media lives: images on ton.twitter.com (OAuth 1.0a), videos and GIFs on video.twimg.com.
DEFAULT_MEDIA_HOSTS = ("https://ton.twitter.com/", "https://video.twimg.com/", "https://pbs.twimg.com/")


class XAccountSettings(ChannelSettings):
    """``[channels.x.apps.<app>.accounts."<user id>"]``: one subscribed X account and its inbox."""

    inbox: str
    # The account's OAuth 1.0a access token and secret (developer portal, "Keys and tokens", or the
    # account's own authorization of the app): DM images and the replies. Required unless
    # fetch_media = false; without them the account cannot be answered.
    access_token: Secret | None = None
    access_token_secret: Secret | None = None
    # Fetch the images, GIFs and videos of this account's direct messages.
    fetch_media: bool = True


class XAppSettings(ChannelSettings):
    """``[channels.x.apps.<app>]``: one X app (its webhook URL is ``/x/<app>``)."""

    # "Keys and tokens" > API Key and Secret (the consumer key and secret). The secret answers the
    # CRC challenge and signs every delivery (x-twitter-webhooks-signature).
    consumer_key: Secret | None = None
    consumer_secret: Secret | None = None
    # The secret being replaced during a rotation: deliveries signed with it are still accepted.
    previous_consumer_secret: Secret | None = None
    accounts: dict[str, XAccountSettings] = Field(min_length=1)

    @field_validator("accounts")
    @classmethod
    def _user_ids(cls, value: dict[str, XAccountSettings]) -> dict[str, XAccountSettings]:
        for user_id in value:
            if not user_id.isdigit():
                raise ValueError(f"account {user_id!r}: accounts are keyed by the numeric X user id")
        return value


class XSettings(ChannelSettings):
    """``[channels.x]``."""

    api_base: str = DEFAULT_API_BASE
    # A delivery is a few KiB of JSON; media travel by URL.
    max_body_bytes: int = Field(1 * MiB, gt=0)
    # X expects an answer within 3 s (the CRC challenge too) and retries a failed delivery.
    ingest_timeout: Duration = 2.0
    api_timeout: Duration = 30.0
    # Media URLs are fetched only under these prefixes (a signed payload still names the host).
    media_hosts: tuple[str, ...] = DEFAULT_MEDIA_HOSTS
    media_max_bytes: int = Field(50 * MiB, gt=0)
    media_concurrency: int = Field(4, ge=1, le=32)
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0
    # DM sends per second per inbox (X allows a few hundred per 15 minutes per account).
    send_rate: float = Field(0.2, gt=0)
    send_burst: int = Field(5, ge=1)
    apps: dict[str, XAppSettings] = Field(min_length=1)
