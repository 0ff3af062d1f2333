"""Envelopes for the email normalizer's tests: a header block (``\\n`` line ends) and a body."""

from __future__ import annotations

from datetime import UTC, datetime

from core.model import RawEnvelope


def envelope(body: bytes, **meta: object) -> RawEnvelope:
    """Raw bytes as the SMTP listener hands them over, for inbox ``support@demo.localhost``."""
    return RawEnvelope(
        channel="email",
        tenant="t",
        inbox="support@demo.localhost",
        body=body,
        received_at=datetime(2024, 1, 1, tzinfo=UTC),
        meta=meta,
    )


def mail(headers: str, body: bytes = b"hello\r\n", **meta: object) -> RawEnvelope:
    """``headers`` with CRLF line ends (non-ASCII kept as UTF-8 or surrogate escapes), then ``body``."""
    raw = headers.strip().replace("\n", "\r\n").encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body
    return envelope(raw, **meta)
