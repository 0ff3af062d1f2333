"""The SMTP listener against real clients (smtplib, swaks, raw sockets) on a port of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import smtplib
import ssl
import threading
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from connectors.email.settings import EmailSettings
from core.errors import ConfigError
from core.model import IngestResult, Outcome
from tests.connectors.email.email_kit import (
    RETRY,
    FakeIngest,
    mail,
    running,
    self_signed,
    settings_for,
)
from tests.support.tools import require_tool

pytestmark = pytest.mark.integration

INBOXES = {
    "support": {"addresses": ["support@demo.localhost", "help@demo.localhost"]},
    "sales": {"domains": ["sales.localhost"]},
}


def config(**smtp: Any) -> dict[str, Any]:
    return {
        "smtp": {"host": "127.0.0.1", "port": 0, "hostname": "mx.test", **smtp},
        "inboxes": INBOXES,
        "trusted_authserv_id": "mx.trusted.example",
    }


def send(port: int, rcpts: list[str], raw: bytes, sender: str = "alice@customer.example", **kw: Any) -> Any:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(sender, rcpts, raw, **kw)


class RawSmtp:
    """A bare SMTP client over asyncio streams, for what smtplib refuses to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawSmtp:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    @classmethod
    async def at_mail_from(cls, port: int) -> RawSmtp:
        """A session past its greeting, EHLO and ``MAIL FROM:<a@customer.example>``."""
        client = await cls.connect(port)
        await client.reply()
        await client.command(b"EHLO client.test\r\n")
        await client.command(b"MAIL FROM:<a@customer.example>\r\n")
        return client

    async def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                return "".join(lines) or "<closed>"
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines)

    async def command(self, data: bytes) -> str:
        self.writer.write(data)
        await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def test_mail_is_ingested_with_its_exact_bytes_and_envelope(tmp_path: Path) -> None:
    raw = mail()
    async with running(config(), tmp_path) as gw:
        refused = await asyncio.to_thread(send, gw.smtp_port, ["Support@Demo.Localhost"], raw)
    assert refused == {}
    [envelope] = gw.ingest.envelopes
    assert envelope.channel == "email"
    assert envelope.inbox == "support"
    assert envelope.tenant == "demo"
    assert envelope.body == raw  # byte for byte: no Received header, no line-ending rewrite
    assert envelope.meta["transport"] == "smtp"
    assert envelope.meta["mail_from"] == "alice@customer.example"
    assert envelope.meta["rcpt_to"] == ["Support@Demo.Localhost"]
    assert envelope.meta["peer"] == "127.0.0.1"
    assert envelope.meta["helo"]
    assert envelope.meta["tls"] is False
    assert envelope.meta["authentication"] is None
    assert envelope.signature_verified is False


async def test_250_comes_only_after_the_store_answered(tmp_path: Path) -> None:
    ingest = FakeIngest()
    ingest.gate = asyncio.Event()
    async with running(config(), tmp_path, ingest=ingest) as gw:

        def client() -> None:
            with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as smtp:
                smtp.ehlo()
                smtp.mail("alice@customer.example")
                smtp.rcpt("support@demo.localhost")
                code, _ = smtp.data(mail())
                ingest.log.append(f"client got {code}")

        task = asyncio.create_task(asyncio.to_thread(client))
        await asyncio.wait_for(ingest.called.wait(), 10)
        ingest.gate.set()
        await task
    assert ingest.log == ["ingest called", "accepted", "client got 250"]


@pytest.mark.parametrize(
    ("answer", "code", "text"),
    [
        (RETRY, 451, "4.3.0"),
        (RuntimeError("store exploded"), 451, "4.3.0"),
        (
            IngestResult(outcome=Outcome.REJECTED, reason="not a mail\r\nfake: header"),
            554,
            "5.6.0 not a mail",
        ),
        (IngestResult(outcome=Outcome.DUPLICATE), 250, "2.0.0"),
        (IngestResult(outcome=Outcome.QUARANTINED, reason="broken MIME"), 250, "2.0.0"),
    ],
)
async def test_pipeline_outcomes_map_to_smtp_replies(
    tmp_path: Path, answer: IngestResult | BaseException, code: int, text: str
) -> None:
    ingest = FakeIngest()
    ingest.script = lambda envelope: answer
    async with running(config(), tmp_path, ingest=ingest) as gw:
        try:
            await asyncio.to_thread(send, gw.smtp_port, ["support@demo.localhost"], mail())
            got, reply = 250, "2.0.0"
        except smtplib.SMTPDataError as exc:
            error = exc.smtp_error
            got, reply = exc.smtp_code, error.decode() if isinstance(error, bytes) else error
    assert got == code
    assert reply.startswith(text)
    assert "\n" not in reply


async def test_a_slow_store_gets_451_not_a_hang(tmp_path: Path) -> None:
    ingest = FakeIngest()
    ingest.gate = asyncio.Event()  # never opened
    async with running(config(ingest_timeout=0.2), tmp_path, ingest=ingest) as gw:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await asyncio.to_thread(send, gw.smtp_port, ["support@demo.localhost"], mail())
    assert caught.value.smtp_code == 451


async def test_unknown_recipients_are_refused_so_it_is_never_an_open_relay(tmp_path: Path) -> None:
    async with running(config(), tmp_path) as gw:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
            await asyncio.to_thread(
                send, gw.smtp_port, ["victim@elsewhere.example", "nobody@demo.localhost"], mail()
            )
        # A mixed list: the known recipient gets the mail, the other is refused.
        refused = await asyncio.to_thread(
            send, gw.smtp_port, ["support@demo.localhost", "x@demo.localhost.evil.example"], mail()
        )
    for code, text in caught.value.recipients.values():
        assert code == 550
        assert text.startswith(b"5.1.1")
    assert refused["x@demo.localhost.evil.example"][0] == 550
    assert [e.inbox for e in gw.ingest.envelopes] == ["support"]


async def test_every_refusal_logs_one_line_without_the_mail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connectors.email.smtp")
    secret_body = "my password is hunter2"
    async with running(config(max_recipients=1), tmp_path) as gw:
        client = await RawSmtp.at_mail_from(gw.smtp_port)
        relay = await client.command(b"RCPT TO:<victim@elsewhere.example>\r\n")
        await client.command(b"RCPT TO:<support@demo.localhost>\r\n")
        too_many = await client.command(b"RCPT TO:<help@demo.localhost>\r\n")
        await client.command(b"DATA\r\n")
        bare_cr = await client.command(b"Subject: x\r\n\r\n" + secret_body.encode() + b"\r.\r\n.\r\n")
        await client.close()
    refusals = [r for r in caplog.records if r.name == "connectors.email.smtp" and "refus" in r.getMessage()]
    lines = [r.getMessage() for r in refusals]
    assert relay.startswith("550 5.1.1")
    assert too_many.startswith("452")
    assert bare_cr.startswith("550 5.5.2")
    assert len(lines) == 3, lines
    codes = ("550 5.1.1", "452 4.5.3", "550 5.5.2")
    assert all(code in line for code, line in zip(codes, lines, strict=True))
    assert all("127.0.0.1" in line for line in lines)
    assert not any(secret_body in r.getMessage() or "victim" in r.getMessage() for r in caplog.records)


async def test_each_inbox_gets_its_own_envelope_and_aliases_collapse(tmp_path: Path) -> None:
    raw = mail()
    rcpts = ["support@demo.localhost", "help@demo.localhost", "anyone@sales.localhost"]
    async with running(config(), tmp_path) as gw:
        await asyncio.to_thread(send, gw.smtp_port, rcpts, raw)
    by_inbox = {e.inbox: e for e in gw.ingest.envelopes}
    assert sorted(by_inbox) == ["sales", "support"]
    assert by_inbox["support"].meta["rcpt_to"] == ["support@demo.localhost", "help@demo.localhost"]
    assert by_inbox["sales"].meta["rcpt_to"] == ["anyone@sales.localhost"]
    assert by_inbox["support"].body == by_inbox["sales"].body == raw


async def test_one_inbox_failing_makes_451_and_the_retry_creates_no_duplicate(tmp_path: Path) -> None:
    ingest = FakeIngest()
    failures = {"sales": 1}

    def script(envelope: Any) -> IngestResult | None:
        if failures.get(envelope.inbox):
            failures[envelope.inbox] -= 1
            return RETRY
        return None

    ingest.script = script
    rcpts = ["support@demo.localhost", "x@sales.localhost"]
    async with running(config(), tmp_path, ingest=ingest) as gw:
        with pytest.raises(smtplib.SMTPDataError) as caught:
            await asyncio.to_thread(send, gw.smtp_port, rcpts, mail())
        await asyncio.to_thread(send, gw.smtp_port, rcpts, mail())  # the sender's retry
    assert caught.value.smtp_code == 451
    assert [(e.inbox, r.outcome) for e, r in zip(ingest.envelopes, ingest.results, strict=True)] == [
        ("support", Outcome.ACCEPTED),
        ("sales", Outcome.RETRY),
        ("support", Outcome.DUPLICATE),
        ("sales", Outcome.ACCEPTED),
    ]
    assert all(count == 1 for count in ingest.keys.values())
    assert len(ingest.keys) == 2


async def test_oversized_mail_gets_552_5_3_4(tmp_path: Path) -> None:
    big = mail(body="x" * 70 + ("\r\n" + "y" * 70) * 200)
    async with running(config(max_message_size=4096), tmp_path) as gw:
        # Declared size too big (SIZE= on MAIL FROM)...
        with pytest.raises(smtplib.SMTPSenderRefused) as declared:
            await asyncio.to_thread(
                send, gw.smtp_port, ["support@demo.localhost"], big, mail_options=["SIZE=20000"]
            )
        # ... and an undeclared one caught while reading DATA.
        client = await RawSmtp.at_mail_from(gw.smtp_port)
        await client.command(b"RCPT TO:<support@demo.localhost>\r\n")
        assert (await client.command(b"DATA\r\n")).startswith("354")
        answer = await client.command(big.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        await client.close()
    assert declared.value.smtp_code == 552
    assert declared.value.smtp_error.startswith(b"5.3.4")
    assert answer.startswith("552 5.3.4")
    assert gw.ingest.envelopes == []


async def test_recipient_limit(tmp_path: Path) -> None:
    async with running(config(max_recipients=2), tmp_path) as gw:
        client = await RawSmtp.at_mail_from(gw.smtp_port)
        first = await client.command(b"RCPT TO:<support@demo.localhost>\r\n")
        second = await client.command(b"RCPT TO:<a@sales.localhost>\r\n")
        third = await client.command(b"RCPT TO:<b@sales.localhost>\r\n")
        await client.close()
    assert first.startswith("250")
    assert second.startswith("250")
    assert third.startswith("452 4.5.3")


SMUGGLED = (
    b"MAIL FROM:<ceo@demo.localhost>\r\nRCPT TO:<support@demo.localhost>\r\nDATA\r\n"
    b"From: ceo@demo.localhost\r\nSubject: smuggled\r\nMessage-ID: <smuggled@evil>\r\n\r\npay now\r\n"
)


async def _smuggle(port: int, fake_end: bytes) -> tuple[str, str]:
    """One DATA hiding a second mail behind ``fake_end``; the replies to the DATA and to a NOOP."""
    client = await RawSmtp.at_mail_from(port)
    await client.command(b"RCPT TO:<support@demo.localhost>\r\n")
    assert (await client.command(b"DATA\r\n")).startswith("354")
    head = b"From: a@customer.example\r\nMessage-ID: <outer@customer.example>\r\n\r\n"
    body = head + b"hello" + fake_end + SMUGGLED
    answer = await client.command(body + b".\r\n")
    # Nothing more is pending: the smuggled commands were never executed as commands.
    after = await client.command(b"NOOP\r\n")
    await client.close()
    return answer, after


@pytest.mark.parametrize(
    ("fake_end", "refused"),
    [
        # A bare CR: refused (no client writes CR line ends; some MTAs honour CR.CR).
        *((end, True) for end in (b"\r.\r\n", b"\r\n.\r", b"\r.\r")),
        # A bare LF, as Postfix 3.9 reads it (smtpd_forbid_bare_newline = normalize): only CRLF.CRLF
        # ends DATA, a bare LF inside is a line end, and the smuggled "mail" is text of the one sent.
        *((end, False) for end in (b"\n.\n", b"\r\n.\n", b"\n.\r\n")),
    ],
)
async def test_smtp_smuggling_never_makes_a_second_mail(
    tmp_path: Path, fake_end: bytes, refused: bool
) -> None:
    async with running(config(), tmp_path) as gw:
        answer, after = await _smuggle(gw.smtp_port, fake_end)
    assert after.startswith("250"), after
    if refused:
        assert answer.startswith("550 5.5.2"), answer
        assert gw.ingest.envelopes == []
        return
    assert answer.startswith("250"), answer
    [envelope] = gw.ingest.envelopes
    assert b"Message-ID: <outer@customer.example>" in envelope.body
    assert b"\r\nMAIL FROM:<ceo@demo.localhost>\r\n" in envelope.body
    assert envelope.body.count(b"\n") == envelope.body.count(b"\r\n")  # stored with CRLF only


async def test_bare_lf_mail_from_smtplib_is_accepted_with_crlf_line_ends(tmp_path: Path) -> None:
    # smtplib sends bytes as they are: msg.as_bytes() has LF line ends, and lines starting with a dot
    # are stuffed after bare LFs too.
    msg = EmailMessage()
    msg["From"] = "alice@customer.example"
    msg["To"] = "support@demo.localhost"
    msg["Subject"] = "sloppy line ends"
    msg["Message-ID"] = "<lf@customer.example>"
    msg.set_content("first line\n.leading dot\n\nlast line\n")
    raw = msg.as_bytes()
    assert b"\r" not in raw
    async with running(config(), tmp_path) as gw:
        refused = await asyncio.to_thread(send, gw.smtp_port, ["support@demo.localhost"], raw)
    assert refused == {}
    [envelope] = gw.ingest.envelopes
    assert envelope.body.startswith(raw.replace(b"\n", b"\r\n"))
    assert b"\r\n.leading dot\r\n" in envelope.body
    assert envelope.body.count(b"\n") == envelope.body.count(b"\r\n")


async def _per_ip_limit(tmp_path: Path) -> tuple[str, str]:
    """Two sessions allowed per IP: the third connection's reply, then a later one's greeting."""
    async with running(config(max_connections_per_ip=2), tmp_path) as gw:
        first = await RawSmtp.connect(gw.smtp_port)
        second = await RawSmtp.connect(gw.smtp_port)
        assert (await first.reply()).startswith("220")
        assert (await second.reply()).startswith("220")
        third = await RawSmtp.connect(gw.smtp_port)
        refused = await third.reply()
        await third.close()
        await first.command(b"QUIT\r\n")
        await first.close()
        # The slot is free again once a session ended; retry until the server has seen the close.
        for _ in range(50):
            fourth = await RawSmtp.connect(gw.smtp_port)
            greeting = await fourth.reply()
            await fourth.close()
            if greeting.startswith("220"):
                break
        await second.close()
    return refused, greeting


def _assert_one_clean_refusal(caplog: pytest.LogCaptureFixture) -> None:
    limit_lines = [r for r in caplog.records if "connection limit" in r.getMessage()]
    assert len(limit_lines) == 1
    # Shedding is an operator's concern (a warning), and rate-limited, so a flood logs a few lines.
    assert limit_lines[0].levelno == logging.WARNING
    assert [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


async def test_per_ip_connection_limit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    refused, greeting = await _per_ip_limit(tmp_path)
    assert refused.startswith("421 4.7.0")
    assert greeting.startswith("220")
    _assert_one_clean_refusal(caplog)


def test_per_ip_connection_limit_under_uvloop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The gateway runs on uvloop (gateway/process.py), whose transports are not subclasses of
    # asyncio's transport classes.
    uvloop = pytest.importorskip("uvloop")
    caplog.set_level(logging.INFO)
    results: list[tuple[str, str]] = []

    def serve() -> None:
        loop = uvloop.new_event_loop()
        try:
            results.append(loop.run_until_complete(_per_ip_limit(tmp_path)))
        finally:
            loop.close()

    # In a thread of its own, so that a hang fails the test: a refused connection that the server
    # never closed made the listener's shutdown wait for it forever.
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the SMTP listener did not shut down"
    [(refused, greeting)] = results
    assert refused.startswith("421 4.7.0"), refused
    assert greeting.startswith("220")
    _assert_one_clean_refusal(caplog)


def _tls_client_context(cert: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert))


async def test_starttls_and_require_starttls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = {"cert_file": str(cert), "key_file": str(key), "require_starttls": True}
    async with running(config(tls=tls), tmp_path) as gw:

        def plain() -> Any:
            with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=10) as smtp:
                smtp.ehlo()
                return smtp.mail("alice@customer.example")

        def secure() -> Any:
            with smtplib.SMTP("localhost", gw.smtp_port, timeout=10) as smtp:
                smtp.starttls(context=_tls_client_context(cert))
                return smtp.sendmail("alice@customer.example", ["support@demo.localhost"], mail())

        refused = await asyncio.to_thread(plain)
        await asyncio.to_thread(secure)
    assert refused[0] == 530
    [envelope] = gw.ingest.envelopes
    assert envelope.meta["tls"] is True
    assert envelope.meta["tls_version"] in {"TLSv1.2", "TLSv1.3"}


TRUSTED_AR = (
    "Authentication-Results: mx.trusted.example; dkim=pass header.d=customer.example; "
    "spf=pass smtp.mailfrom=customer.example; dmarc=pass header.from=customer.example"
)


async def test_auth_for_relays_and_authenticated_sessions_carry_trust(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    smtp = {
        "tls": {"cert_file": str(cert), "key_file": str(key)},
        "users": {"relay": "s3cret-pass"},
        "auth_required": True,
        "trusted_relays": [],  # only AUTH makes a session trusted here
    }
    raw = mail(headers=[TRUSTED_AR])
    async with running(config(**smtp), tmp_path) as gw:

        def attempt(password: str | None) -> Any:
            with smtplib.SMTP("localhost", gw.smtp_port, timeout=10) as client:
                client.starttls(context=_tls_client_context(cert))
                if password is not None:
                    client.login("relay", password)
                return client.sendmail("alice@customer.example", ["support@demo.localhost"], raw)

        with pytest.raises(smtplib.SMTPSenderRefused) as anonymous:
            await asyncio.to_thread(attempt, None)
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            await asyncio.to_thread(attempt, "guess")
        await asyncio.to_thread(attempt, "s3cret-pass")
    assert anonymous.value.smtp_code == 530
    assert wrong.value.smtp_code == 535
    [envelope] = gw.ingest.envelopes
    assert envelope.meta["auth_user"] == "relay"
    assert envelope.meta["authentication"]["dmarc"] == "pass"
    assert envelope.meta["authentication"]["header_from"] == "customer.example"
    assert envelope.signature_verified is True


async def test_authentication_results_are_believed_only_from_trusted_relays(tmp_path: Path) -> None:
    forged = "Authentication-Results: mx.trusted.example; dmarc=pass header.from=bank.example"
    raw = mail(headers=[TRUSTED_AR, forged])
    async with running(config(), tmp_path) as trusted:  # default: loopback is a trusted relay
        await asyncio.to_thread(send, trusted.smtp_port, ["support@demo.localhost"], raw)
    async with running(config(trusted_relays=["192.0.2.0/24"]), tmp_path) as untrusted:
        await asyncio.to_thread(send, untrusted.smtp_port, ["support@demo.localhost"], raw)
    verdict = trusted.ingest.envelopes[0].meta["authentication"]
    # The topmost header of the trusted authserv-id counts, never one further down.
    assert verdict["header_from"] == "customer.example"
    assert verdict["dkim"] == [{"result": "pass", "domain": "customer.example"}]
    assert untrusted.ingest.envelopes[0].meta["authentication"] is None


async def test_the_real_normalizer_marks_the_sender_verified_only_with_trust(tmp_path: Path) -> None:
    from normalizers.email import normalize_email

    raw = mail(headers=[TRUSTED_AR])
    async with running(config(), tmp_path, normalize=normalize_email) as trusted:
        await asyncio.to_thread(send, trusted.smtp_port, ["support@demo.localhost"], raw)
    async with running(config(trusted_relays=[]), tmp_path, normalize=normalize_email) as untrusted:
        await asyncio.to_thread(send, untrusted.smtp_port, ["support@demo.localhost"], raw)
    [[verified]] = trusted.ingest.messages
    [[claimed]] = untrusted.ingest.messages
    assert [(i.value, i.verified) for i in verified.identities] == [("alice@customer.example", True)]
    assert [(i.value, i.verified) for i in claimed.identities] == [("alice@customer.example", False)]


async def test_a_mail_without_from_is_answerable_through_its_envelope_sender(tmp_path: Path) -> None:
    from normalizers.email import normalize_email

    raw = b"Subject: no From here\r\nMessage-ID: <nofrom@customer.example>\r\n\r\nhello\r\n"
    async with running(config(), tmp_path, normalize=normalize_email) as gw:
        await asyncio.to_thread(send, gw.smtp_port, ["support@demo.localhost"], raw, "bob@customer.example")
        await asyncio.to_thread(send, gw.smtp_port, ["support@demo.localhost"], raw, "")  # null sender
    [[claimed], [nobody]] = gw.ingest.messages
    assert [(i.value, i.verified) for i in claimed.identities] == [("bob@customer.example", False)]
    assert claimed.extra["sender_source"] == "mail_from"
    assert nobody.identities == ()
    assert "no_usable_sender" in nobody.extra["sender_flags"]


async def test_swaks_delivers_and_is_refused_for_a_foreign_domain(tmp_path: Path) -> None:
    swaks = require_tool("swaks", "swaks")
    async with running(config(), tmp_path) as gw:

        async def run(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                swaks,
                "--server",
                "127.0.0.1",
                "--port",
                str(gw.smtp_port),
                "--from",
                "bob@customer.example",
                "--helo",
                "client.test",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(process.communicate(), 30)
            return process.returncode or 0, out.decode()

        ok_code, ok_out = await run(
            "--to",
            "support@demo.localhost",
            "--header",
            "Subject: swaks test",
            "--body",
            "sent with swaks",
        )
        bad_code, bad_out = await run("--to", "someone@gmail.example")
    assert ok_code == 0, ok_out
    assert "<-  250 2.0.0" in ok_out
    [envelope] = gw.ingest.envelopes
    assert b"Subject: swaks test" in envelope.body
    assert envelope.meta["helo"] == "client.test"
    assert bad_code != 0
    assert "550 5.1.1" in bad_out


async def test_shutdown_lets_a_mail_being_stored_finish(tmp_path: Path) -> None:
    ingest = FakeIngest()
    ingest.gate = asyncio.Event()
    async with running(config(), tmp_path, ingest=ingest) as gw:
        sending = asyncio.create_task(
            asyncio.to_thread(send, gw.smtp_port, ["support@demo.localhost"], mail())
        )
        await asyncio.wait_for(ingest.called.wait(), 10)
        stopping = asyncio.create_task(gw.runner.cleanup())
        ingest.gate.set()
        await stopping
        assert await sending == {}  # the client got its 250 before the listener closed
    assert ingest.log[-1] == "accepted"


@pytest.mark.parametrize(
    ("smtp", "message"),
    [
        ({"users": {"relay": "x"}}, "configure [channels.email.smtp.tls]"),
        ({"auth_required": True, "tls": {"cert_file": "c", "key_file": "k"}}, "needs at least one entry"),
        ({"trusted_relays": ["not a network"]}, "does not appear to be"),
    ],
)
def test_bad_smtp_settings_fail_at_start(tmp_path: Path, smtp: dict[str, Any], message: str) -> None:
    settings = settings_for(config(**smtp), tmp_path)
    with pytest.raises(ConfigError, match=r"channels\.email") as caught:
        settings.channel("email", EmailSettings)
    assert message in str(caught.value)


def test_an_address_in_two_inboxes_or_an_unknown_inbox_fails_at_start(tmp_path: Path) -> None:
    from connectors.email import EmailConnector

    twice = {
        **config(),
        "inboxes": {"support": {"addresses": ["a@x.example"]}, "sales": {"addresses": ["A@x.example"]}},
    }
    with pytest.raises(ConfigError, match="configured for inboxes"):
        EmailConnector.from_settings(settings_for(twice, tmp_path))
    unknown = {**config(), "inboxes": {"nope": {"addresses": ["a@x.example"]}}}
    with pytest.raises(ConfigError, match=r"channels\.email\.inboxes\.nope"):
        EmailConnector.from_settings(settings_for(unknown, tmp_path))
