"""Settings of the email channel: the ``[channels.email]`` table with its SMTP listener and IMAP accounts."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.settings import ChannelSettings, Duration, Secret

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Deliberately loose: an address is "local@domain"; the MTA upstream already enforced syntax.
_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+$")
_DOMAIN = re.compile(r"^[A-Za-z0-9.-]+$")


class EmailInboxSettings(ChannelSettings):
    """``[channels.email.inboxes.<inbox>]``: the addresses and domains whose mail goes to ``<inbox>``."""

    addresses: tuple[str, ...] = ()
    # Catch-all: every address of these domains (an exact address elsewhere wins).
    domains: tuple[str, ...] = ()
    # Overrides the channel-wide trusted_authserv_id for this inbox.
    trusted_authserv_id: str | None = None

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if not _ADDRESS.match(address):
                raise ValueError(f"not an email address: {address!r}")
        return tuple(a.lower() for a in value)

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for domain in value:
            if not _DOMAIN.match(domain):
                raise ValueError(f"not a domain: {domain!r}")
        return tuple(d.lower().rstrip(".") for d in value)


class SmtpTlsSettings(ChannelSettings):
    """``[channels.email.smtp.tls]``: STARTTLS with a certificate chain and key in PEM files."""

    cert_file: Path
    key_file: Path
    # Refuse MAIL until the client ran STARTTLS (only for private relays: public MTAs may not have TLS).
    require_starttls: bool = False


class SmtpSettings(ChannelSettings):
    """``[channels.email.smtp]``: the listener."""

    host: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    # Name in the greeting and EHLO answer; the machine's FQDN when unset.
    hostname: str | None = None
    max_message_size: int = Field(25 * 1024 * 1024, gt=0)
    max_recipients: int = Field(100, gt=0)
    max_connections: int = Field(512, gt=0)
    max_connections_per_ip: int = Field(20, gt=0)
    # Idle time allowed between commands (and for the whole DATA transfer) before the session closes.
    timeout: Duration = 300.0
    # Time given to the store for one mail; then 451 and the sender retries (idempotency dedupes).
    ingest_timeout: Duration = 60.0
    tls: SmtpTlsSettings | None = None
    # AUTH for relays (e.g. an MTA that forwards to us); only offered after STARTTLS.
    users: dict[str, Secret] = Field(default_factory=dict, repr=False)
    auth_required: bool = False
    # Networks whose sessions may carry a believed Authentication-Results header (an authenticated
    # session is believed too). Anyone else could write that header themselves.
    trusted_relays: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

    @field_validator("trusted_relays")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)
        return value

    @model_validator(mode="after")
    def _auth_needs_tls(self) -> SmtpSettings:
        if (self.users or self.auth_required) and self.tls is None:
            raise ValueError("AUTH sends passwords: configure [channels.email.smtp.tls] to offer it")
        if self.auth_required and not self.users:
            raise ValueError("auth_required = true needs at least one entry in users")
        return self


class ImapAccountSettings(ChannelSettings):
    """``[channels.email.imap.<name>]``: one mailbox account polled (or IDLEd) for new mail."""

    host: str
    port: int | None = Field(None, ge=1, le=65535)  # 993 with implicit TLS, 143 otherwise
    # Implicit TLS (IMAPS). With tls = false, starttls = true upgrades the plain connection.
    tls: bool = True
    starttls: bool = False
    # Verify the server certificate against this CA file instead of the system store.
    ca_file: Path | None = None
    username: str
    password: Secret | None = Field(None, repr=False)
    # OAuth2 access token for XOAUTH2 (Gmail, Microsoft 365); used instead of the password.
    oauth2_token: Secret | None = Field(None, repr=False)
    folders: tuple[str, ...] = ("INBOX",)
    inbox: str
    poll_interval: Duration = 60.0
    use_idle: bool = True
    # IDLE is re-issued before servers drop it (RFC 2177: at most every 29 minutes).
    idle_interval: Duration = 25 * 60.0
    processed_action: Literal["seen", "move"] = "seen"
    processed_folder: str | None = None
    # Without a watermark (first start, UIDVALIDITY changed): fetch unseen mail only, or everything.
    rescan: Literal["unseen", "all"] = "unseen"
    # Believe Authentication-Results written by this authserv-id (the mailbox provider's MTA).
    trusted_authserv_id: str | None = None
    timeout: Duration = 30.0
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 300.0
    max_message_size: int = Field(25 * 1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ImapAccountSettings:
        if self.password is None and self.oauth2_token is None:
            raise ValueError("set password or oauth2_token")
        if self.tls and self.starttls:
            raise ValueError("tls (implicit TLS) and starttls exclude each other")
        if self.processed_action == "move" and not self.processed_folder:
            raise ValueError("processed_action = 'move' needs processed_folder")
        if not self.folders:
            raise ValueError("folders must name at least one folder")
        if self.processed_folder is not None and self.processed_folder in self.folders:
            raise ValueError("processed_folder must not be one of the polled folders")
        return self

    @property
    def effective_port(self) -> int:
        return self.port if self.port is not None else (993 if self.tls else 143)


class SmarthostSettings(ChannelSettings):
    """``[channels.email.smarthost]``: where replies are sent (the organisation's outgoing MTA)."""

    host: str
    port: int = Field(587, ge=1, le=65535)
    # "starttls": upgrade the plain connection and refuse to send without it (submission, 587);
    # "tls": TLS from the first byte (smtps, 465); "none": plain (a relay on the same host only).
    security: Literal["starttls", "tls", "none"] = "starttls"
    # Verify the server certificate against this CA file instead of the system store.
    ca_file: Path | None = None
    username: str | None = None
    password: Secret | None = Field(None, repr=False)
    # The sender of replies; the inbox's first address when unset (docs/replies.md).
    from_address: str | None = None
    # The name shown with it ("Demo support"); with an agent's name: "Ada (Demo support)".
    from_name: str | None = None
    # Domain of the Message-IDs of replies: the from address's when unset.
    message_id_domain: str | None = None
    timeout: Duration = Field(30.0, gt=0)
    # Connections kept open between replies (TLS and AUTH once), and how long one may stay idle
    # (below the server's own idle timeout; Postfix drops a client after 300 s).
    connections: int = Field(4, ge=0)
    idle_timeout: Duration = Field(30.0, ge=0)
    # Sends per second and burst per inbox (the smarthost's own limit, e.g. 14/s for SES).
    rate: float = Field(10.0, gt=0)
    burst: int = Field(10, ge=1)

    @field_validator("from_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None and not _ADDRESS.match(value):
            raise ValueError(f"not an email address: {value!r}")
        return value

    @model_validator(mode="after")
    def _auth(self) -> SmarthostSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password for AUTH, or neither")
        if self.password is not None and self.security == "none":
            raise ValueError("AUTH sends the password: use security = 'starttls' or 'tls'")
        return self


class EmailSettings(ChannelSettings):
    """``[channels.email]``."""

    smtp: SmtpSettings | None = None
    # Replies out (gateway.replies); without it email threads cannot be answered through ticketgate.
    smarthost: SmarthostSettings | None = None
    inboxes: dict[str, EmailInboxSettings] = Field(default_factory=dict)
    imap: dict[str, ImapAccountSettings] = Field(default_factory=dict)
    # Default authserv-id whose Authentication-Results are believed (SMTP: from trusted relays only).
    trusted_authserv_id: str | None = None
    # Our own X-Loop marker; mail carrying it is our own mail coming back.
    loop_marker: str | None = None

    @field_validator("imap", "inboxes")
    @classmethod
    def _names(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if not _NAME.match(name):
                raise ValueError(f"name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        return value

    @model_validator(mode="after")
    def _routable(self) -> EmailSettings:
        if self.smtp is not None and not any(i.addresses or i.domains for i in self.inboxes.values()):
            raise ValueError(
                "the SMTP listener needs [channels.email.inboxes.<inbox>] with addresses or domains"
            )
        owner: dict[str, str] = {}
        for inbox_id, inbox in self.inboxes.items():
            for key in (*inbox.addresses, *(f"@{d}" for d in inbox.domains)):
                if key in owner:
                    raise ValueError(f"{key!r} is configured for inboxes {owner[key]!r} and {inbox_id!r}")
                owner[key] = inbox_id
        return self

    def authserv_id_for(self, inbox_id: str) -> str | None:
        inbox = self.inboxes.get(inbox_id)
        if inbox is not None and inbox.trusted_authserv_id is not None:
            return inbox.trusted_authserv_id
        return self.trusted_authserv_id
