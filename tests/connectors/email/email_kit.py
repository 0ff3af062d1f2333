"""Shared pieces of the email transport tests: settings, a scriptable fake ingest, a running app."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.parser
import email.policy
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connectors.email import EmailConnector
from connectors.email.imap import Observer
from core.model import CanonicalMessage, IngestResult, Outcome, Placement, RawEnvelope
from core.settings import Settings
from gateway.store.sqlite import SQLiteStore
from tests.support.channels import set_up


def stored(message_id: str = "m-1") -> IngestResult:
    return IngestResult(
        outcome=Outcome.ACCEPTED,
        placements=(
            Placement(
                message_id=message_id, thread_id="t-1", customer_id="c-1", sequence=1, is_new_thread=True
            ),
        ),
    )


RETRY = IngestResult(outcome=Outcome.RETRY, reason="store unavailable", retry_after=0.05)


def message_id_of(raw: bytes) -> str:
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return str(parsed["Message-ID"]).strip()


Script = Callable[[RawEnvelope], "IngestResult | BaseException | None"]


class FakeIngest:
    """Records envelopes and answers like the pipeline would.

    Idempotent like the store: a (inbox, Message-ID) key stored before answers DUPLICATE. ``script``
    may override the answer per envelope (return a result or an exception to raise; None = default).
    ``gate``, when set, holds every call until it is opened.
    """

    def __init__(self, normalize_check: bool = False) -> None:
        self.envelopes: list[RawEnvelope] = []
        self.results: list[IngestResult] = []
        self.keys: dict[str, int] = {}  # idempotency key -> times ACCEPTED
        self.script: Script | None = None
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()
        self.log: list[str] = []
        self.messages: list[Sequence[CanonicalMessage]] = []
        self._changed = asyncio.Condition()

    async def __call__(self, envelope: RawEnvelope, normalize: Callable[[RawEnvelope], Any]) -> IngestResult:
        self.envelopes.append(envelope)
        self.log.append("ingest called")
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        # As the pipeline does: normalizing is part of ingest.
        self.messages.append(normalize(envelope))
        answer = self.script(envelope) if self.script is not None else None
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            key = f"{envelope.inbox}/{message_id_of(envelope.body)}"
            if key in self.keys:
                answer = IngestResult(outcome=Outcome.DUPLICATE, placements=stored().placements)
            else:
                self.keys[key] = 1
                answer = stored(f"m-{len(self.keys)}")
        self.results.append(answer)
        self.log.append(answer.outcome.value)
        async with self._changed:
            self._changed.notify_all()
        return answer

    async def wait_for(self, predicate: Callable[[FakeIngest], bool], within: float = 20.0) -> None:
        """Waits (without sleeping) until ``predicate`` holds after some call."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def accepted(self) -> list[RawEnvelope]:
        return [
            e for e, r in zip(self.envelopes, self.results, strict=False) if r.outcome == Outcome.ACCEPTED
        ]


def fake_normalize(envelope: RawEnvelope) -> list[CanonicalMessage]:
    """Stand-in normalizer: the tests here are about the transport."""
    return [
        CanonicalMessage(
            channel=envelope.channel,
            tenant=envelope.tenant,
            inbox=envelope.inbox,
            external_id=message_id_of(envelope.body),
            received_at=envelope.received_at,
        )
    ]


def settings_for(email: Mapping[str, Any], tmp_path: Path) -> Settings:
    return Settings.model_validate(
        {
            "store": {
                "path": str(tmp_path / "data" / "ticketgate.db"),
                "blob_dir": str(tmp_path / "data" / "blobs"),
            },
            "server": {"shutdown_timeout": 5},
            "tenants": {"demo": {}},
            "inboxes": {"support": {"tenant": "demo"}, "sales": {"tenant": "demo"}},
            "channels": {"email": dict(email)},
        }
    )


@dataclass
class Running:
    connector: EmailConnector
    ingest: FakeIngest
    runner: web.AppRunner
    tmp_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def smtp_port(self) -> int:
        assert self.connector.smtp is not None
        return self.connector.smtp.port


@asynccontextmanager
async def running(
    email: Mapping[str, Any],
    tmp_path: Path,
    *,
    ingest: FakeIngest | None = None,
    normalize: Callable[[RawEnvelope], Sequence[CanonicalMessage]] = fake_normalize,
    observer: Observer | None = None,
) -> AsyncIterator[Running]:
    """The email connector mounted on an aiohttp application, started and stopped as the gateway does."""
    settings = settings_for(email, tmp_path)
    built = EmailConnector.from_settings(settings)
    assert built is not None
    connector = EmailConnector(settings, built.email, normalize=normalize, observer=observer)
    ingest = ingest or FakeIngest()
    app = web.Application()
    # A real store: the IMAP watermarks live in it.
    store = SQLiteStore(settings.store, settings.outbox)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        yield
        await store.close()

    app.cleanup_ctx.append(store_ctx)
    set_up(app, connector, ingest, settings=settings, store=store)
    runner = web.AppRunner(app)
    await runner.setup()  # runs the cleanup_ctx entries up to their yield: SMTP listens, pollers run
    try:
        yield Running(connector=connector, ingest=ingest, runner=runner, tmp_path=tmp_path)
    finally:
        await runner.cleanup()


async def read_state(tmp_path: Path, key: str) -> Any:
    """A value the email connector keeps in the store, read after the gateway stopped."""
    settings = settings_for({}, tmp_path)
    store = SQLiteStore(settings.store, settings.outbox)
    await store.open()
    try:
        raw = await store.state_get(f"email/{key}")
    finally:
        await store.close()
    return json.loads(raw) if raw is not None else None


def self_signed(tmp_path: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """A throwaway certificate and key for STARTTLS tests."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def mail(
    *,
    message_id: str = "<m1@customer.example>",
    to: str = "support@demo.localhost",
    sender: str = "alice@customer.example",
    body: str = "Hello, my order 1234 has not arrived.",
    headers: Sequence[str] = (),
) -> bytes:
    lines = [
        *headers,
        f"From: Alice <{sender}>",
        f"To: {to}",
        "Subject: Where is my order?",
        f"Message-ID: {message_id}",
        "Date: Mon, 02 Nov 2026 10:00:00 +0000",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        body,
        "",
    ]
    return "\r\n".join(lines).encode()
