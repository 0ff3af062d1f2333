"""The email channel: an SMTP listener and IMAP mailboxes, both feeding ``normalizers.email``, and
replies out through a smarthost (:mod:`connectors.email.sender`).

``[channels.email]`` is validated by :class:`connectors.email.settings.EmailSettings`; the SMTP
listener and each IMAP poller are ``cleanup_ctx`` entries of the gateway's application.
"""

from __future__ import annotations

from typing import Self

from connectors.base import ChannelContext
from connectors.email.envelope import EnvelopeFactory
from connectors.email.imap import ImapPollers, Observer, pollers_for, setup_imap
from connectors.email.sender import EmailSender, setup_sender
from connectors.email.settings import EmailSettings
from connectors.email.smtp import SmtpListener, setup_smtp
from connectors.email.state import JsonState
from core.channel import ChannelDescriptor, ChannelEndpoint
from core.model import IdentityKind
from core.settings import Settings
from normalizers.base import Normalizer
from normalizers.email import EmailLimits, make_email_normalizer, normalize_email


class EmailConnector:
    """Builds the SMTP listener and the IMAP pollers from ``[channels.email]``."""

    name = "email"

    def __init__(
        self,
        settings: Settings,
        email: EmailSettings,
        *,
        normalize: Normalizer | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.email = email
        self._normalize = normalize
        self._observer = observer
        self.smtp: SmtpListener | None = None
        self.imap: ImapPollers | None = None
        self.sender: EmailSender | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Self | None:
        email = settings.channel("email", EmailSettings)
        if email is None:
            return None
        for inbox_id in email.inboxes:
            settings.inbox(inbox_id, key=f"channels.email.inboxes.{inbox_id}")
        for name, account in email.imap.items():
            settings.inbox(account.inbox, key=f"channels.email.imap.{name}.inbox")
        return cls(settings, email)

    def describe_endpoints(self, base_url: str) -> list[ChannelEndpoint]:
        """The SMTP listener with the addresses of each inbox, and each IMAP folder polled."""
        found = []
        smtp = self.email.smtp
        if smtp is not None:
            listener = f"smtp://{_host_port(smtp.host, smtp.port)}"
            for inbox_id, inbox in self.email.inboxes.items():
                routed = [*inbox.addresses, *(f"*@{domain}" for domain in inbox.domains)]
                if routed:
                    address = f"{listener} for {', '.join(routed)}"
                    found.append(ChannelEndpoint(inbox=inbox_id, kind="smtp", address=address))
        for account in self.email.imap.values():
            scheme = "imaps" if account.tls else "imap"
            server = _host_port(account.host, account.effective_port)
            for folder in account.folders:
                address = f"{scheme}://{server}/{folder} as {account.username}"
                found.append(ChannelEndpoint(inbox=account.inbox, kind="imap", address=address))
        return found

    def setup(self, ctx: ChannelContext) -> None:
        normalize = self._normalize or normalizer_from(self.settings)
        factory = EnvelopeFactory.from_settings(self.settings, self.email, compute=ctx.compute)
        timeout = self.settings.server.shutdown_timeout
        if self.email.smtp is not None:
            self.smtp = setup_smtp(ctx, self.email.smtp, self.email, factory, normalize, timeout)
        if self.email.imap:
            self.imap = ImapPollers(
                pollers_for(self.email, factory, JsonState(ctx.state), ctx.ingest, normalize, self._observer)
            )
            setup_imap(ctx, self.imap, timeout)
        # Replies out through the smarthost, when one is configured.
        self.sender = setup_sender(ctx, self.settings, self.email)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def normalizer_from(settings: Settings) -> Normalizer:
    """The email normalizer bounded by the largest message either transport accepts."""
    email = settings.channel("email", EmailSettings)
    sizes = [] if email is None else [
        *([email.smtp.max_message_size] if email.smtp is not None else []),
        *(account.max_message_size for account in email.imap.values()),
    ]
    if not sizes:
        return normalize_email
    return make_email_normalizer(EmailLimits(max_bytes=max(sizes)))


DESCRIPTOR = ChannelDescriptor(
    name="email",
    connector=EmailConnector,
    normalizer=normalize_email,
    configure=normalizer_from,
    settings=EmailSettings,
    identity_kinds=frozenset({IdentityKind.EMAIL}),
    deadline=300.0,  # RFC 5321 4.5.3.2.6: a client waits 10 minutes for the reply to DATA's end
)
