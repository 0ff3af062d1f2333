"""Email: RFC 5322 bytes -> canonical messages (pure; the SMTP and IMAP transports live in connectors/)."""

from normalizers.email.parse import EmailLimits, make_email_normalizer, normalize_email

__all__ = ["EmailLimits", "make_email_normalizer", "normalize_email"]
