"""The listener's per-mail checks that are written for speed give the answers of the plain ones."""

from __future__ import annotations

import asyncio
import re
import smtplib
from pathlib import Path

import pytest

from connectors.email.data import DataState, read_data
from connectors.email.trust import authentication_results, verdict
from tests.connectors.email.email_kit import running

_REFERENCE = re.compile(rb"\r(?!\n)")  # a lone CR (RFC 5321 2.3.8), as a pattern
_BARE_LF = re.compile(rb"(?<!\r)\n")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"no line ends",
        b"a\r\nb\r\n",
        b"a\nb",
        b"a\rb",
        b"\n\r",  # LF then CR: two lone ones, although the counts of each are equal
        b"a\r\r\n",
        b"a\r\n\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"x\r\n" * 1000 + b"\r",
    ],
)
async def test_bare_line_end_checks_agree_with_the_rfc_pattern(raw: bytes) -> None:
    """read_data's counting checks refuse exactly the mails the RFC's pattern finds a lone CR in, and
    turn exactly the lone LFs into CRLF."""
    reader = asyncio.StreamReader(limit=1001)
    reader.feed_data(raw + b"\r\n.\r\n")
    reader.feed_eof()
    state, content = await read_data(reader, size_limit=None, line_limit=1001)
    normalized = _BARE_LF.sub(b"\r\n", raw)
    bare = _REFERENCE.search(normalized) is not None
    assert state is (DataState.BARE_CR if bare else DataState.NOMINAL)
    assert content == (b"" if bare else normalized.replace(b"\r\n.", b"\r\n") + b"\r\n")


def test_authentication_results_header_names_are_case_insensitive() -> None:
    raw = (
        b"AUTHENTICATION-RESULTS: mx.example; dmarc=pass header.from=customer.example\r\n"
        b"From: a@customer.example\r\n\r\nbody mentioning Authentication-Results: x\r\n"
    )
    assert authentication_results(raw) == ["mx.example; dmarc=pass header.from=customer.example"]
    found = verdict(raw, "mx.example")
    assert found is not None
    assert found["dmarc"] == "pass"


def test_no_authentication_results_header_means_no_verdict() -> None:
    raw = b"From: a@customer.example\r\n\r\nAuthentication-Results: mx.example; dmarc=pass\r\n"
    assert authentication_results(raw) == []
    assert verdict(raw, "mx.example") is None


@pytest.mark.integration
async def test_envelope_addresses_read_the_same_every_time(tmp_path: Path) -> None:
    """MAIL FROM / RCPT TO arguments are parsed once and remembered: repeats must answer alike."""
    email = {
        "smtp": {"host": "127.0.0.1", "port": 0, "hostname": "mx.test"},
        "inboxes": {"support": {"addresses": ["support@demo.localhost"]}},
    }
    commands = [
        "MAIL FROM:<a@customer.example> SIZE=100",
        "RCPT TO:<support@demo.localhost>",
        "RSET",
        "MAIL FROM:<@>",
        "MAIL FROM:<a@customer.example>",
        "RCPT TO:<nobody@demo.localhost>",
        "RCPT TO:<>",
        "RSET",
    ]

    def session(port: int) -> list[int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo()
            return [client.docmd(command)[0] for _ in range(3) for command in commands]

    async with running(email, tmp_path) as gw:
        codes = await asyncio.to_thread(session, gw.smtp_port)
    first = codes[: len(commands)]
    assert first == [250, 250, 250, 553, 250, 550, 550, 250]
    assert codes == first * 3
