"""``[channels.meta]`` (the Meta apps: secrets and the endpoint) and the tables of the three channels
that arrive through them: ``[channels.whatsapp]``, ``[channels.messenger]``, ``[channels.instagram]``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.settings import ChannelSettings, Duration, Secret

MiB = 1024 * 1024
DEFAULT_GRAPH_BASE = "https://graph.facebook.com"
DEFAULT_GRAPH_VERSION = "v21.0"


class MetaAppSettings(ChannelSettings):
    """``[channels.meta.apps.<app>]``: one Meta app, reached at ``/meta/<app>``."""

    # App Dashboard > App settings > Basic > App secret: the key of X-Hub-Signature-256.
    app_secret: Secret | None = None
    # The secret being replaced during a rotation: both verify until it is removed.
    previous_app_secret: Secret | None = None
    # What the webhook's "Verify token" field in the App Dashboard says (the GET handshake).
    verify_token: Secret | None = None
    # The app's id (App Dashboard, top left). Messenger and Instagram echoes sent by this app (our
    # own replies) are never recorded as agent messages, whatever ``echoes`` says.
    app_id: str | None = Field(None, pattern=r"^\d+$")


class MetaSettings(ChannelSettings):
    """``[channels.meta]``: not a channel itself; the apps WhatsApp, Messenger and Instagram share."""

    # A batch of 1000 messaging items is well under this; media travel by id or URL, never inline.
    max_body_bytes: int = Field(4 * MiB, gt=0)
    # Meta waits about 20 s before it counts a delivery as failed and retries it.
    ingest_timeout: Duration = 8.0
    apps: dict[str, MetaAppSettings] = Field(min_length=1)


class GraphSettings(ChannelSettings):
    """What every Meta channel table has: the Graph API, media fetching, echoes."""

    # The Graph API (tests point it at a local server); the version is part of every path.
    api_base: str = DEFAULT_GRAPH_BASE
    api_version: str = Field(DEFAULT_GRAPH_VERSION, pattern=r"^v\d+\.\d+$")
    api_timeout: Duration = 30.0
    # "record": the business's own messages sent from another tool become agent_message events.
    echoes: Literal["ignore", "record"] = "ignore"
    media_concurrency: int = Field(4, ge=1, le=32)
    media_max_bytes: int = Field(100 * MiB, gt=0)
    # Media ids stay valid for 30 days after the message; URLs expire sooner. Retry for a day.
    media_retry_for: Duration = 86400.0
    media_first_backoff: Duration = 10.0
    media_max_backoff: Duration = 3600.0


class WhatsAppInboxSettings(ChannelSettings):
    """``[channels.whatsapp.inboxes.<inbox>]``: the phone number (or numbers) that inbox receives."""

    app: str
    # The business phone number's id (not the number): WhatsApp Manager > API Setup. Unset: every
    # number of the app that no other inbox names.
    phone_number_id: str | None = None
    # A system user's permanent token with whatsapp_business_messaging: fetches media, sends replies.
    access_token: Secret | None = None
    fetch_media: bool = True


class WhatsAppSettings(GraphSettings):
    """``[channels.whatsapp]``."""

    inboxes: dict[str, WhatsAppInboxSettings] = Field(min_length=1)


class PageInboxSettings(ChannelSettings):
    """``[channels.messenger.inboxes.<inbox>]`` / ``[channels.instagram.inboxes.<inbox>]``."""

    app: str
    # The Facebook Page id (Messenger) or the Instagram professional account id (Instagram). Unset:
    # every page / account of the app that no other inbox names.
    page_id: str | None = None
    # A Page access token with pages_messaging (Messenger) or instagram_manage_messages (Instagram).
    access_token: Secret | None = None
    fetch_media: bool = True


class MessengerSettings(GraphSettings):
    """``[channels.messenger]``."""

    inboxes: dict[str, PageInboxSettings] = Field(min_length=1)


class InstagramSettings(GraphSettings):
    """``[channels.instagram]``."""

    inboxes: dict[str, PageInboxSettings] = Field(min_length=1)
