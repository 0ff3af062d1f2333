"""``[channels.webchat]``: the live web chat's settings (secrets, limits, the allow-list per inbox)."""

from __future__ import annotations

from typing import Self
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from core.settings import ChannelSettings, Duration, Secret

KiB = 1024
MiB = 1024 * KiB

# What a visitor may upload unless an inbox says otherwise: pictures, PDFs, plain text and office
# documents. A type ending in "/*" allows the whole family.
DEFAULT_UPLOAD_TYPES = (
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "application/zip",
    "application/msword",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    "application/vnd.ms-excel",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
)


def _origins(value: tuple[str, ...]) -> tuple[str, ...]:
    normalized = []
    for origin in value:
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"{origin!r} is not an origin such as 'https://www.example.com'")
        normalized.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(normalized)


class WebchatInboxSettings(ChannelSettings):
    """``[channels.webchat.inboxes.<inbox id>]``: one chat (one widget configuration)."""

    # Signs a site's user ids: HMAC-SHA256(identity_secret, user_id [+ "\n" + email]), hex.
    identity_secret: Secret | None = None
    previous_identity_secret: Secret | None = None
    # Sites that may embed the widget (the socket's and the upload's Origin); the gateway's own
    # pages always may.
    allowed_origins: tuple[str, ...] = ()
    # App WebViews (H5 pages from file:// or a custom scheme) send no usable Origin.
    allow_missing_origin: bool = False
    # Serve the demo page at /chat/<inbox> (development and trying the widget out).
    demo_page: bool = False
    title: str | None = None
    title_zh: str | None = None
    greeting: str | None = None
    greeting_zh: str | None = None
    upload_types: tuple[str, ...] = DEFAULT_UPLOAD_TYPES
    # Bearer keys of the desk for /chat/<inbox>/agent/*: agent typing and read receipts to the
    # widget, and the visitors' typing and read receipts as a stream. Unset: those routes answer 404.
    agent_keys: tuple[Secret, ...] = ()

    @field_validator("allowed_origins")
    @classmethod
    def _allowed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _origins(value)


class WebchatSettings(ChannelSettings):
    """``[channels.webchat]``."""

    # Signs the visitor session tokens the widget keeps in localStorage (fail closed when missing).
    session_secret: Secret | None = None
    previous_session_secret: Secret | None = None
    # A token older than this starts a new session (its visitor is a new anonymous identity).
    session_ttl: Duration = 90 * 86400.0
    # Open sockets, all inboxes together; past it a new socket is refused (HTTP 503) so that idle
    # chats can never take the connections the rest of the gateway needs. Unset: half of
    # server.max_connections; set, it must leave 64 of them to the rest of the gateway.
    max_sockets: int | None = Field(None, ge=1)
    max_sockets_per_ip: int = Field(50, ge=1)
    # WebSocket pings; a client that does not answer one within this is dropped.
    heartbeat: Duration = Field(25.0, gt=0)
    # A socket on which the visitor did nothing (no message, typing or read receipt) this long is
    # closed (code 4408); the widget reconnects when the visitor comes back.
    idle_timeout: Duration = Field(30 * 60.0, gt=0)
    # The first frame (hello) must arrive within this after the upgrade.
    hello_timeout: Duration = Field(10.0, gt=0)
    max_text_chars: int = Field(5_000, ge=1)
    max_frame_bytes: int = Field(64 * KiB, ge=1024)
    max_upload_bytes: int = Field(10 * MiB, gt=0)
    # Per visitor (session) and per client IP: messages and uploads.
    messages_per_minute: float = Field(30.0, gt=0)
    message_burst: int = Field(10, ge=1)
    ip_messages_per_minute: float = Field(600.0, gt=0)
    ip_message_burst: int = Field(100, ge=1)
    # Every frame of a visitor (messages, typing, receipts, pings); past it the socket is closed
    # (code 4429) and the widget reconnects after a pause.
    frames_per_minute: float = Field(300.0, gt=0)
    frame_burst: int = Field(60, ge=1)
    # New sockets and sessions per client IP.
    connects_per_minute: float = Field(60.0, gt=0)
    connect_burst: int = Field(30, ge=1)
    rate_limit_max_clients: int = Field(100_000, ge=1)
    # Below the widget's patience: a store that does not answer by then gets a "retry", not a hang.
    ingest_timeout: Duration = 8.0
    # Agent replies kept per conversation for a visitor who comes back (the oldest go first).
    held_replies: int = Field(200, ge=1)
    # How often an instance looks for replies another instance sent to a visitor connected here
    # (several gateways on one store); one store read per inbox each time.
    bulletin_interval: Duration = Field(0.5, gt=0)
    inboxes: dict[str, WebchatInboxSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _per_ip_below_total(self) -> Self:
        if self.max_sockets is not None and self.max_sockets_per_ip > self.max_sockets:
            raise ValueError("max_sockets_per_ip must not exceed max_sockets")
        return self
