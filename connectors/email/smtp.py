"""The SMTP listener: aiosmtpd inside the gateway's event loop.

Answers, per the connector contract: ``250`` only after every recipient inbox's copy is stored;
``451 4.3.0`` for anything transient (the sender retries, idempotency dedupes what was stored);
``554 5.6.0`` when the pipeline rejects the mail; ``550 5.1.1`` at RCPT for an address we do not
serve, so the listener is never an open relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
import socket
import ssl
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax

from connectors.base import ChannelContext, ChannelMetrics, Ingest
from connectors.email.data import DataState, read_data
from connectors.email.envelope import EnvelopeFactory, Router
from connectors.email.settings import EmailSettings, SmtpSettings
from core.channel import Refusal
from core.model import IngestResult, Outcome, RawEnvelope
from core.ratelog import RateLimitedLog
from normalizers.base import Normalizer

logger = logging.getLogger(__name__)


_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")

# aiosmtpd's fixed texts lack enhanced status codes (RFC 3463); the codes themselves are right.
_REWRITES = {
    b"552 Error: Too much mail data": b"552 5.3.4 Message too big for system",
    b"552 Error: message size exceeds fixed maximum message size": b"552 5.3.4 Message too big for system",
    b"500 Line too long (see RFC5321 4.5.3.1.6)": b"500 5.5.6 Line too long (see RFC 5321 4.5.3.1.6)",
}

TEMPFAIL = "451 4.3.0 Temporary failure storing the message, try again later"

# Replies that refuse a mail before the pipeline sees it, by their start, and the reason counted
# (ChannelMetrics.refused). Syntax and sequence errors (500, 501, 503) refuse a command, not a mail;
# a 554 after DATA is the pipeline's own rejection, counted there.
_REFUSALS: tuple[tuple[bytes, Refusal], ...] = (
    (b"552", "size"),
    (b"530", "auth"),
    (b"535", "auth"),
    (b"550 5.1.1", "auth"),  # a recipient that is not ours: relaying is refused
    (b"550 5.5.2", "malformed"),  # a bare CR
    (b"500 5.5.6", "malformed"),  # a line too long
)


def _refusal_reason(reply: bytes) -> Refusal | None:
    for start, reason in _REFUSALS:
        if reply.startswith(start):
            return reason
    return None


def _reason(text: str | None, default: str) -> str:
    """A reason safe to put on one SMTP reply line."""
    return _UNPRINTABLE.sub(" ", text or default).strip()[:200] or default


def _peer_ip(peer: Any) -> str:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


class ConnectionLimits:
    """Counts open sessions, overall and per client IP."""

    def __init__(self, total: int, per_ip: int) -> None:
        self._total = total
        self._per_ip = per_ip
        self._open: Counter[str] = Counter()
        self._count = 0
        # A flood of refusals is one line per 10 s, not one per connection.
        self.shed_log = RateLimitedLog(logger)

    def acquire(self, ip: str) -> bool:
        if self._count >= self._total or self._open[ip] >= self._per_ip:
            return False
        self._open[ip] += 1
        self._count += 1
        return True

    def release(self, ip: str) -> None:
        self._count -= 1
        self._open[ip] -= 1
        if self._open[ip] <= 0:
            del self._open[ip]


# GatewaySMTP._getaddr's results: (argument, local part limit) -> (address, rest of the line).
_PARSED_ADDRESSES: dict[tuple[str, int], tuple[str | None, str | None]] = {}
_PARSED_ADDRESSES_MAX = 4096


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with connection limits, enhanced status codes on its fixed replies, and DATA
    read in bulk."""

    def __init__(
        self, handler: SmtpHandler, *, limits: ConnectionLimits, metrics: ChannelMetrics | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("decode_data"):
            raise ValueError("GatewaySMTP keeps DATA as bytes: decode_data must be false")
        super().__init__(handler, **kwargs)
        self._data_handler = handler
        self._limits = limits
        self._metrics = metrics
        self._limited_ip: str | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called a second time after STARTTLS, with the TLS transport: count only the first.
        if self.transport is None and not self._refused:
            ip = _peer_ip(transport.get_extra_info("peername"))
            if not self._limits.acquire(ip):
                self._refused = True
                self._limits.shed_log("refusing SMTP connections at the connection limit (last from %s)", ip)
                if self._metrics is not None:
                    self._metrics.refused("rate_limit")
                # A cast, not an isinstance check: uvloop's transports have the methods of
                # asyncio.WriteTransport without subclassing it (the gateway runs on uvloop).
                writer = cast(asyncio.WriteTransport, transport)
                writer.write(b"421 4.7.0 Too many connections, try again later\r\n")
                writer.close()  # after the reply is flushed
                return
            self._limited_ip = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._limited_ip is not None:
            self._limits.release(self._limited_ip)
            self._limited_ip = None
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused:
            return None
        result: bool | None = super().eof_received()
        return result

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's reading of a MAIL FROM / RCPT TO argument, remembered per argument.

        aiosmtpd 1.4 runs the RFC 5322 header parser (and defines a typing.Protocol class) on each
        call: ~37 us, twice per mail, for arguments that keep coming back (the inbox address, a
        customer's or a relay's sender). The result depends on the argument and
        ``local_part_limit`` only; a failed parse, (None, None), is remembered too.
        """
        key = (arg, self.local_part_limit)
        found = _PARSED_ADDRESSES.get(key)
        if found is None:
            found = super()._getaddr(arg)
            if len(_PARSED_ADDRESSES) >= _PARSED_ADDRESSES_MAX:
                _PARSED_ADDRESSES.clear()
            _PARSED_ADDRESSES[key] = found
        return found

    @syntax("DATA")  # HELP lists and explains DATA as before
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4's DATA command with the body read by :func:`read_data`, not line by line.

        The checks before ``354``, the replies after the data and the state reset are aiosmtpd's.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        assert self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            state, content = await read_data(
                self._reader, size_limit=self.data_size_limit, line_limit=self.line_length_limit
            )
        except asyncio.CancelledError:
            # The connection went during DATA (aiosmtpd's eof_received / connection_lost cancel us).
            self._writer.close()
            raise
        if state is DataState.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif state is DataState.TOO_MUCH:
            await self.push("552 Error: Too much mail data")
        elif state is DataState.BARE_CR:
            await self.push("550 5.5.2 Message contains a bare CR (RFC 5321 2.3.8), not accepted")
        if state is not DataState.NOMINAL:
            self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state, typed
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._data_handler.handle_DATA(self, self.session, self.envelope)
        self.envelope = self._create_envelope()
        await self.push(status)

    async def push(self, status: bytes | str) -> None:
        raw = (
            status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii") if isinstance(status, str) else status
        )
        reply = _REWRITES.get(raw, raw)
        if reply[:1] in {b"4", b"5"}:
            # Every refusal, ours or aiosmtpd's (530, 535, 552 at MAIL FROM ...), logs one line: the
            # reply only, which never holds the mail, an address or a credential.
            peer = _peer_ip(self.session.peer if self.session is not None else None)
            text = _reason(reply.decode("ascii", "replace"), "?")
            logger.info("SMTP refusal for %s: %s", peer, text)
            reason = _refusal_reason(reply)
            if reason is not None and self._metrics is not None:
                self._metrics.refused(reason)
        await super().push(reply)


class SmtpHandler:
    """aiosmtpd handler hooks: recipient routing at RCPT, the ingest at DATA."""

    def __init__(
        self,
        smtp: SmtpSettings,
        email: EmailSettings,
        factory: EnvelopeFactory,
        ingest: Ingest,
        normalize: Normalizer,
        metrics: ChannelMetrics | None = None,
    ) -> None:
        self.metrics = metrics  # the listener's sessions count their refusals here
        self._smtp = smtp
        self._email = email
        self._router = Router(email)
        self._factory = factory
        self._ingest = ingest
        self._normalize = normalize
        self._trusted = tuple(ipaddress.ip_network(n, strict=False) for n in smtp.trusted_relays)
        self._trusted_ips: dict[str, bool] = {}
        self._users = {name: secret.get_secret_value().encode() for name, secret in smtp.users.items()}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no mail is being ingested (for shutdown, before the store closes)."""
        await self._idle.wait()

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if self._router.inbox_for(address) is None:
            return "550 5.1.1 Recipient address rejected: no such mailbox here"
        if len(envelope.rcpt_tos) >= self._smtp.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # GatewaySMTP refused bare CRs and made bare LFs CRLF while reading the data: see data.py.
        raw = envelope.original_content
        assert isinstance(raw, bytes)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._deliver(raw, session, envelope)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _deliver(self, raw: bytes, session: Session, envelope: Envelope) -> str:
        by_inbox: dict[str, list[str]] = {}
        for address in envelope.rcpt_tos:
            inbox = self._router.inbox_for(address)
            if inbox is not None:  # always, RCPT checked it; routing is recomputed, not trusted
                by_inbox.setdefault(inbox, []).append(address)
        ip = _peer_ip(session.peer)
        trusted_peer = bool(session.authenticated) or self._is_trusted(ip)
        ssl_info = session.ssl
        login = session.login_data if session.authenticated else None
        auth_user = login.decode("utf-8", "replace") if isinstance(login, bytes) else None
        envelopes = [
            await self._factory.build(
                raw,
                inbox=inbox,
                remote=ip,
                authserv_id=self._email.authserv_id_for(inbox) if trusted_peer else None,
                transport={
                    "transport": "smtp",
                    "mail_from": envelope.mail_from,
                    "rcpt_to": addresses,
                    "peer": ip,
                    "helo": session.host_name,
                    "tls": ssl_info is not None,
                    "tls_version": _tls_version(ssl_info),
                    "auth_user": auth_user,
                },
            )
            for inbox, addresses in by_inbox.items()
        ]
        try:
            async with asyncio.timeout(self._smtp.ingest_timeout):
                if len(envelopes) == 1:
                    # The usual mail, for one inbox: awaited in place, no task and no gather.
                    outcomes: list[IngestResult | BaseException] = [await self._ingest_one(envelopes[0])]
                else:
                    outcomes = await asyncio.gather(
                        *(self._ingest(e, self._normalize) for e in envelopes), return_exceptions=True
                    )
        except TimeoutError:
            logger.warning("ingest of a mail from %s timed out; answering 451", ip)
            return TEMPFAIL
        return _answer(outcomes)

    async def _ingest_one(self, envelope: RawEnvelope) -> IngestResult | BaseException:
        """One ingest, its exception returned as ``gather(..., return_exceptions=True)`` would."""
        try:
            return await self._ingest(envelope, self._normalize)
        except Exception as exc:
            return exc

    def _is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` is a trusted relay; remembered per address (a relay sends many mails)."""
        known = self._trusted_ips.get(ip)
        if known is None:
            if len(self._trusted_ips) >= 4096:
                self._trusted_ips.clear()
            known = self._trusted_ips[ip] = self._in_trusted_networks(ip)
        return known

    def _in_trusted_networks(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd authenticator: LOGIN/PLAIN against the configured users, compared in constant time."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        expected = self._users.get(auth_data.login.decode("utf-8", "replace"))
        # Compare even for an unknown user, so timing does not tell which users exist.
        ok = hmac.compare_digest(expected or b"\x00" * 32, auth_data.password) and expected is not None
        # Keep only the login on the session: the password has no business outliving the check.
        return AuthResult(
            success=ok, handled=False, auth_data=LoginPassword(auth_data.login, b"") if ok else None
        )

    async def handle_exception(self, error: Exception) -> str:
        logger.error("SMTP session error: %s", type(error).__name__, exc_info=error)
        return "451 4.3.0 Temporary server error, try again later"


def _tls_version(ssl_info: dict[str, Any] | None) -> str | None:
    if not ssl_info:
        return None
    obj = ssl_info.get("ssl_object")
    return obj.version() if isinstance(obj, ssl.SSLObject) else None


def _answer(outcomes: list[IngestResult | BaseException]) -> str:
    """One SMTP reply for all the inboxes' results: any transient fault wins, then a rejection."""
    rejected: IngestResult | None = None
    stored: list[IngestResult] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            logger.error("ingest raised %s; answering 451", type(outcome).__name__, exc_info=outcome)
            return TEMPFAIL
        if outcome.outcome == Outcome.RETRY or (not outcome.stored and outcome.outcome != Outcome.REJECTED):
            return TEMPFAIL
        if outcome.outcome == Outcome.REJECTED:
            rejected = rejected or outcome
        else:
            stored.append(outcome)
    if rejected is not None:
        return f"554 5.6.0 {_reason(rejected.reason, 'Message rejected')}"
    ids = [p.message_id for r in stored for p in r.placements]
    return f"250 2.0.0 OK {ids[0]}" if ids else "250 2.0.0 OK"


def tls_context(smtp: SmtpSettings) -> ssl.SSLContext | None:
    if smtp.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(smtp.tls.cert_file, smtp.tls.key_file)
    return context


class SmtpListener:
    """The listening server; ``start`` inside the running loop, ``stop`` on shutdown."""

    def __init__(self, smtp: SmtpSettings, handler: SmtpHandler) -> None:
        self._smtp = smtp
        self._handler = handler
        self._server: asyncio.Server | None = None
        # Weak: a session leaves the set when its connection is gone.
        self._sessions: weakref.WeakSet[GatewaySMTP] = weakref.WeakSet()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # aiosmtpd calls socket.getfqdn() per connection when no hostname is given: a DNS lookup
        # on the loop for every session. Resolve once, off the loop.
        hostname = self._smtp.hostname or await loop.run_in_executor(None, socket.getfqdn)
        context = tls_context(self._smtp)
        limits = ConnectionLimits(self._smtp.max_connections, self._smtp.max_connections_per_ip)
        factory: Callable[[], GatewaySMTP] = partial(
            self._session,
            partial(
                GatewaySMTP,
                self._handler,
                limits=limits,
                metrics=self._handler.metrics,
                loop=loop,
                hostname=hostname,
                ident="ticketgate",
                data_size_limit=self._smtp.max_message_size,
                enable_SMTPUTF8=True,
                decode_data=False,
                tls_context=context,
                require_starttls=bool(self._smtp.tls and self._smtp.tls.require_starttls),
                timeout=self._smtp.timeout,
                auth_required=self._smtp.auth_required,
                auth_require_tls=True,
                authenticator=self._handler.authenticate if self._smtp.users else None,
                # Without users, offer no AUTH at all (aiosmtpd would otherwise advertise and fail it).
                auth_exclude_mechanism=None if self._smtp.users else ["LOGIN", "PLAIN"],
            ),
        )
        self._server = await loop.create_server(factory, self._smtp.host, self._smtp.port)
        logger.info("SMTP listening on %s:%d", self._smtp.host, self.port)

    def _session(self, make: Callable[[], GatewaySMTP]) -> GatewaySMTP:
        session = make()
        self._sessions.add(session)
        return session

    async def stop(self, grace: float) -> None:
        """Stop accepting, let mails being stored finish (bounded), then close every session."""
        if self._server is None:
            return
        self._server.close()
        try:
            async with asyncio.timeout(grace):
                await self._handler.wait_idle()
        except TimeoutError:
            logger.warning("SMTP shutdown: mails still being stored after %.1fs; closing anyway", grace)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        await self._server.wait_closed()
        self._server = None


def setup_smtp(
    ctx: ChannelContext,
    smtp: SmtpSettings,
    email: EmailSettings,
    factory: EnvelopeFactory,
    normalize: Normalizer,
    shutdown_timeout: float,
) -> SmtpListener:
    """The SMTP listener, listening while the gateway runs."""
    listener = SmtpListener(smtp, SmtpHandler(smtp, email, factory, ctx.ingest, normalize, ctx.metrics))

    @contextlib.asynccontextmanager
    async def serving() -> AsyncIterator[None]:
        await listener.start()
        try:
            yield
        finally:
            await listener.stop(shutdown_timeout)

    ctx.add_lifecycle(serving)
    return listener
