"""Replies by email: one SMTP transaction per reply through the configured smarthost (aiosmtplib).

The mail threads on the customer's: ``In-Reply-To`` is the Message-ID of the mail being answered,
``References`` the thread's Message-IDs (theirs and our earlier replies'), and the subject carries
the thread's ``[#TG-n]`` tag, so the customer's answer joins the thread by any of them. Its own
``Message-ID`` is ``<reply_id@domain>``: the same over every attempt, so a reply sent again after a
crash is the same mail to every client that drops a repeated Message-ID, and the customer's answer
finds the thread by it. ``Auto-Submitted`` is left off (a person wrote it); ``X-Ticketgate-Reply``
names the reply, so our own mail looping back is quarantined instead of becoming a ticket
(:data:`normalizers.email.parse.REPLY_HEADER`), and ``X-Loop`` carries the loop marker.

SMTP answers map to the reply's outcome: 2xx sent; 4xx, a dropped connection or a timeout retried;
5xx (RFC 5321 permanent) ended (``recipient_unreachable`` for 550/551/553 on RCPT, ``too_large``
for 552, ``rejected`` otherwise); refused credentials (535) retried as ``auth`` (an operator fixes
the password and the replies still go out, within the retry budget).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from email.message import EmailMessage
from email.utils import format_datetime, formataddr
from typing import Any

import aiosmtplib

from connectors.base import ChannelContext
from connectors.email.settings import EmailSettings, SmarthostSettings
from core.channel import OutboundReply, SendError, SenderSpec, Sent
from core.errors import ConfigError
from core.settings import Settings
from normalizers.email.parse import DEFAULT_LOOP_MARKER, REPLY_HEADER
from normalizers.html import to_text as html_to_text

logger = logging.getLogger(__name__)

_MAX_REFERENCES = 20  # RFC 5322 3.6.4 allows trimming; keep the first and the latest ones
_TAG = "[#TG-{number}]"
_RE = ("re:", "aw:", "sv:", "回复:", "答复:", "回复：", "答复：")


class EmailSender:
    """Builds and sends one reply mail per call (``core.channel.Sender``)."""

    def __init__(
        self,
        smarthost: SmarthostSettings,
        senders: Mapping[str, str],
        *,
        ctx: ChannelContext,
        loop_marker: str = DEFAULT_LOOP_MARKER,
    ) -> None:
        self._smarthost = smarthost
        self._senders = senders  # inbox -> From address
        self._ctx = ctx
        self._loop_marker = loop_marker
        # Idle connections to the smarthost with when they went idle, newest last: a reply reuses
        # one (TLS and AUTH done once), as MTAs expect of a client sending many mails.
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._tls: ssl.SSLContext | None = None
        if smarthost.security != "none":
            self._tls = ssl.create_default_context(
                cafile=str(smarthost.ca_file) if smarthost.ca_file is not None else None
            )

    def from_address(self, inbox: str) -> str:
        address = self._senders.get(inbox)
        if address is None:
            raise SendError("unsupported", f"email inbox {inbox} has no address to send from", permanent=True)
        return address

    def message_id(self, reply_id: str, from_address: str) -> str:
        """``reply_id@domain``, without angle brackets (as inbound Message-IDs are kept)."""
        domain = self._smarthost.message_id_domain or from_address.rpartition("@")[2]
        return f"{reply_id}@{domain}"

    async def build(self, reply: OutboundReply) -> tuple[EmailMessage, str, str]:
        """The mail, its envelope sender and its recipient."""
        sender = self.from_address(reply.inbox)
        answering = reply.answering
        # The customer's Reply-To only when their From is verified (DMARC/DKIM of a trusted relay):
        # otherwise a forged From with the forger's Reply-To would get the real customer's answer.
        recipient = (_reply_to(answering) if reply.recipient.verified else None) or reply.recipient.value
        mail = EmailMessage()
        mail["From"] = formataddr((_display_name(self._smarthost.from_name, reply.agent_name), sender))
        mail["To"] = recipient
        mail["Subject"] = subject_for(reply.subject, reply.thread_number)
        mail["Date"] = format_datetime(self._ctx.clock.now())
        mail["Message-ID"] = f"<{self.message_id(reply.reply_id, sender)}>"
        answered = reply.answering_external_id
        if answered and not answering.get("synthetic_message_id"):
            mail["In-Reply-To"] = f"<{answered}>"
        references = _references(reply.references, answered)
        if references:
            mail["References"] = " ".join(f"<{r}>" for r in references)
        mail["X-Loop"] = self._loop_marker
        mail[REPLY_HEADER] = reply.reply_id
        text = reply.text or (html_to_text(reply.html) if reply.html else "")
        mail.set_content(text or "", cte="quoted-printable" if not text.isascii() else "7bit")
        if reply.html:
            mail.add_alternative(reply.html, subtype="html")
        for attachment in reply.attachments:
            data = await self._ctx.blobs.read(attachment.sha256)
            if data is None:
                raise SendError("rejected", f"attachment {attachment.name}: blob is gone", permanent=True)
            maintype, _, subtype = attachment.content_type.partition("/")
            mail.add_attachment(
                data,
                maintype=maintype or "application",
                subtype=subtype or "octet-stream",
                filename=attachment.name,
            )
        return mail, sender, recipient

    async def send(self, reply: OutboundReply) -> Sent:
        mail, sender, recipient = await self.build(reply)
        try:
            client = await self._connection()
            try:
                refused, answer = await client.send_message(mail, sender=sender, recipients=[recipient])
            except BaseException:
                # Reused only after a clean transaction: after a refusal, a timeout or a cancel the
                # server's state (or the stream) is unclear.
                _close(client)
                raise
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0] if exc.recipients else None
            raise _smtp_error(
                first.code if first else 550, first.message if first else str(exc), rcpt=True
            ) from exc
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise SendError("auth", f"{exc.code} {exc.message}", permanent=False) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _smtp_error(exc.code, exc.message) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise SendError("provider_error", f"{type(exc).__name__}: {exc}", permanent=False) from exc
        if refused:
            _close(client)
            code, message = next(iter(refused.values()))
            raise _smtp_error(code, message, rcpt=True)
        await self._release(client)
        message_id = self.message_id(reply.reply_id, sender)
        return Sent(provider_message_id=message_id, detail={"smtp": answer[:200]})

    async def _connection(self) -> aiosmtplib.SMTP:
        """An idle connection that still answers (``RSET``), or a new one (connected, TLS, AUTH)."""
        now = time.monotonic()
        while self._idle:
            client, since = self._idle.pop()
            if now - since > self._smarthost.idle_timeout or not client.is_connected:
                await _quit(client)
                continue
            try:
                await client.rset()  # the server may have dropped it meanwhile: nothing was sent yet
                return client
            except (aiosmtplib.SMTPException, OSError):
                _close(client)
        host = self._smarthost
        client = aiosmtplib.SMTP(
            hostname=host.host,
            port=host.port,
            use_tls=host.security == "tls",
            start_tls=host.security == "starttls",
            tls_context=self._tls,
            timeout=host.timeout,
            username=host.username,
            password=host.password.get_secret_value() if host.password is not None else None,
        )
        await client.connect()
        return client

    async def _release(self, client: aiosmtplib.SMTP) -> None:
        if len(self._idle) < self._smarthost.connections and client.is_connected:
            self._idle.append((client, time.monotonic()))
        else:
            await _quit(client)

    async def close(self) -> None:
        """Say QUIT on the idle connections (at shutdown)."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client) for client, _ in idle))


async def _quit(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        if client.is_connected:
            await client.quit()
    _close(client)


def _close(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        client.close()


def _smtp_error(code: int, message: str, *, rcpt: bool = False) -> SendError:
    detail = f"{code} {message}".strip()
    if 400 <= code < 500 or code < 200:
        return SendError("rate_limited" if code == 421 else "provider_error", detail, permanent=False)
    if code == 552:
        return SendError("too_large", detail, permanent=True)
    if rcpt and code in (550, 551, 553):
        return SendError("recipient_unreachable", detail, permanent=True)
    return SendError("rejected", detail, permanent=True)


def subject_for(subject: str | None, number: int) -> str:
    """``Re: <thread subject> [#TG-n]``: the tag once, ``Re:`` once."""
    tag = _TAG.format(number=number)
    base = (subject or "").strip()
    if tag not in base:
        base = f"{base} {tag}".strip()
    if not base.lower().startswith(_RE):
        base = f"Re: {base}"
    return base


def _display_name(from_name: str | None, agent: str | None) -> str:
    if agent and from_name:
        return f"{agent} ({from_name})"
    return agent or from_name or ""


def _reply_to(answering: Mapping[str, Any]) -> str | None:
    """The customer's Reply-To, where they asked answers to go."""
    given = answering.get("reply_to")
    if isinstance(given, list) and given and isinstance(given[0], str):
        return given[0]
    return None


def _references(known: Sequence[str], answered: str | None) -> list[str]:
    ids = [r for r in known if r and "@" in r and not r.endswith("@ticketgate.invalid")]
    if answered and answered in ids:
        # The answered mail last, as a client writing a reply to it would put it.
        ids = [r for r in ids if r != answered] + [answered]
    elif answered and "@" in answered and not answered.endswith("@ticketgate.invalid"):
        ids.append(answered)
    if len(ids) > _MAX_REFERENCES:
        ids = ids[:1] + ids[-(_MAX_REFERENCES - 1) :]
    return ids


def setup_sender(ctx: ChannelContext, settings: Settings, email: EmailSettings) -> EmailSender | None:
    """Register the email sender when a smarthost is configured; each inbox sends from its
    configured ``from_address`` or its first address."""
    smarthost = email.smarthost
    if smarthost is None:
        return None
    senders: dict[str, str] = {}
    for inbox_id, inbox in email.inboxes.items():
        address = smarthost.from_address or (inbox.addresses[0] if inbox.addresses else None)
        if address is not None:
            senders[inbox_id] = address
    for account in email.imap.values():
        if account.inbox not in senders and smarthost.from_address is not None:
            senders[account.inbox] = smarthost.from_address
        elif account.inbox not in senders and "@" in account.username:
            senders[account.inbox] = account.username
    if not senders:
        raise ConfigError(
            "the smarthost needs an address to send from: set from_address or give the inboxes addresses",
            file=settings.source,
            key="channels.email.smarthost.from_address",
        )
    sender = EmailSender(smarthost, senders, ctx=ctx, loop_marker=email.loop_marker or DEFAULT_LOOP_MARKER)
    ctx.add_sender(SenderSpec(sender=sender, rate=smarthost.rate, burst=smarthost.burst))

    @contextlib.asynccontextmanager
    async def connections() -> AsyncIterator[None]:
        try:
            yield
        finally:
            await sender.close()

    ctx.add_lifecycle(connections)
    return sender


__all__ = ["EmailSender", "setup_sender", "subject_for"]
