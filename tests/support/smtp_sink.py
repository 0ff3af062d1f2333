"""A local SMTP smarthost for reply tests and benchmarks: aiosmtpd in the running loop, keeping
every mail it accepted (a ledger), refusing on demand (``451`` a few times, ``550`` on RCPT), with
optional STARTTLS and AUTH."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import default
from functools import partial
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> Message:
        return BytesParser(policy=default).parsebytes(self.raw)


@dataclass
class SmtpSink:
    """``await sink.start()``; ``sink.port``; ``sink.mails`` in arrival order."""

    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: tuple[Path, Path] | None = None
    users: dict[str, str] = field(default_factory=dict)
    refuse_data: int = 0  # answer DATA with 451 this many times first
    refuse_rcpt: set[str] = field(default_factory=set)  # answer RCPT with 550 for these
    delay: float = 0.0  # seconds DATA takes (replies in flight for a kill)
    drop_on_rset: bool = False  # close the connection instead of answering RSET (a stale client)
    connections: int = 0  # sessions opened so far
    mails: list[Received] = field(default_factory=list)
    attempts: int = 0
    _server: asyncio.Server | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if self.tls_cert is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(str(self.tls_cert[0]), str(self.tls_cert[1]))
        factory = partial(
            _Server,
            _Handler(self),
            sink=self,
            hostname="sink.localhost",
            tls_context=tls,
            require_starttls=tls is not None,
            authenticator=self._authenticate if self.users else None,
            auth_required=bool(self.users),
            auth_require_tls=True,
            loop=loop,
        )
        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword):
            user, password = data.login.decode(), data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        async with asyncio.timeout(timeout):
            while len(self.mails) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return list(self.mails)


class _Server(SMTP):
    """aiosmtpd's server, counting sessions and able to drop one on RSET."""

    def __init__(self, handler: Any, *, sink: SmtpSink, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._sink.connections += 1
        super().connection_made(transport)

    async def smtp_RSET(self, arg: str) -> None:
        if self._sink.drop_on_rset and self.transport is not None:
            self.transport.close()
            return
        await super().smtp_RSET(arg)


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address.lower() in self._sink.refuse_rcpt:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        sink = self._sink
        sink.attempts += 1
        if sink.delay:
            await asyncio.sleep(sink.delay)
        if sink.refuse_data > 0:
            sink.refuse_data -= 1
            return "451 4.3.0 Try again later"
        content = envelope.original_content or envelope.content or b""
        raw = content if isinstance(content, bytes) else content.encode()
        sink.mails.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos), raw))
        sink._arrived.set()
        return f"250 2.0.0 Queued as sink-{len(sink.mails)}"
