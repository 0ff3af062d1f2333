"""The email channel: an SMTP listener and IMAP mailboxes, both feeding ``normalizers.email``.

``[channels.email]`` is validated by :class:`connectors.email.settings.EmailSettings`; the SMTP
listener and each IMAP poller are ``cleanup_ctx`` entries of the gateway's application.
"""

from __future__ import annotations

from typing import Self

from aiohttp import web

from connectors.base import Ingest
from connectors.email.envelope import EnvelopeFactory
from connectors.email.imap import ImapPollers, Observer, pollers_for, setup_imap
from connectors.email.settings import EmailSettings
from connectors.email.smtp import SmtpListener, setup_smtp
from connectors.email.state import StoreState
from core.settings import Settings
from gateway.keys import STORE
from normalizers.base import Normalizer


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

    def setup(self, app: web.Application, ingest: Ingest) -> None:
        normalize = self._normalize
        if normalize is None:
            from gateway.registry import normalizer_for

            normalize = normalizer_for("email")
        factory = EnvelopeFactory.from_settings(self.settings, self.email)
        timeout = self.settings.server.shutdown_timeout
        if self.email.smtp is not None:
            self.smtp = setup_smtp(app, self.email.smtp, self.email, factory, ingest, normalize, timeout)
        if self.email.imap:
            state = StoreState(app[STORE], prefix="email/")
            self.imap = ImapPollers(
                pollers_for(self.email, factory, state, ingest, normalize, self._observer)
            )
            setup_imap(app, self.imap, timeout)
